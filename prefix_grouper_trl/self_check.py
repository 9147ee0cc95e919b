"""
A one-time check that a model's grouped forward is its repeated forward, on a small probe batch.

The split attention and the registered mixers cover every token mixer we know by type. Custom modeling code can mix
tokens anywhere (a convolution inside an MLP, a forward hook, remote code), and nothing can recognise that by name. So
before a model is trained, its grouped forward is compared once with the repeated forward it replaces::

    probe batch   group A: prompt of 9 tokens, two completions (5 and 4 tokens)
                  group B: prompt of 6 tokens (left-padded by 3), one completion (3 tokens)

    1. equal:     the backbone's output at every real token equals the repeated forward's (per token, relative)
    2. no leak:   changing completion A1's tokens leaves every other completion's output unchanged

Both run without gradients and with dropout off (eval mode), so dropout is never a mismatch. When either fails, every
module's output is compared the same way and the error names the first module (in the order modules finish) whose
output differs: the module that mixes tokens outside what prefix grouping splits.
"""

import contextlib
from dataclasses import dataclass

import torch

from .layout import LAYOUT_KWARG, GroupLayout, build_group_layout

# Per-token relative difference ||grouped - repeated|| / ||repeated|| allowed. A token mixer the packed row breaks
# (a completion reading another completion, a state not carried over from the prompt) moves its first tokens by
# O(1); rounding moves them by ~1e-6 in float32 (more with TF32 matmuls on a GPU) and ~1e-2 in bfloat16.
TOLERANCE = {torch.float64: 1e-2, torch.float32: 1e-2, torch.bfloat16: 1e-1, torch.float16: 1e-1}

PROBE_PROMPT_LENS = [9, 9, 6]
PROBE_COMPLETION_LENS = [5, 4, 3]
PROBE_GROUPS = [0, 0, 1]


class GroupedForwardMismatch(ValueError):
    """The grouped forward of a model differs from its repeated forward (see the module docstring)."""


@dataclass
class ProbeReport:
    max_difference: float
    max_leak: float
    tolerance: float
    layout: GroupLayout


def _special_token_ids(config) -> set[int]:
    ids = set()
    for cfg in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        for name, value in vars(cfg).items():
            if (name.endswith("_token_id") or name.endswith("_token_index")) and isinstance(value, int):
                ids.add(value)
            elif name.endswith("_token_id") and isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
    return ids


def probe_batch(config, device) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """
    The probe micro-batch, TRL-style (left-padded prompts, right-padded completions), from a fixed generator (the
    global random state is untouched), avoiding special token ids (image placeholders would ask for pixels).

    Returns `input_ids (3, L)`, `attention_mask (3, L)`, `logits_to_keep`, and `changed_input_ids`: the same batch
    with completion A1 (row 0) replaced by other tokens.
    """
    vocab = config.get_text_config().vocab_size
    special = _special_token_ids(config)
    allowed = torch.tensor([t for t in range(vocab) if t not in special][:4096] or [0])
    generator = torch.Generator().manual_seed(0)

    def draw(n):
        return allowed[torch.randint(0, allowed.numel(), (n,), generator=generator)]

    pad = getattr(config.get_text_config(), "pad_token_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < vocab else int(allowed[0])
    width_prompt, width_completion = max(PROBE_PROMPT_LENS), max(PROBE_COMPLETION_LENS)
    prompts = {group: draw(PROBE_PROMPT_LENS[PROBE_GROUPS.index(group)]) for group in set(PROBE_GROUPS)}
    rows, masks = [], []
    for prompt_len, completion_len, group in zip(PROBE_PROMPT_LENS, PROBE_COMPLETION_LENS, PROBE_GROUPS):
        left, right = width_prompt - prompt_len, width_completion - completion_len
        rows.append(torch.cat([torch.full((left,), pad), prompts[group], draw(completion_len), torch.full((right,), pad)]))
        masks.append(torch.cat([torch.zeros(left), torch.ones(prompt_len + completion_len), torch.zeros(right)]))
    input_ids, attention_mask = torch.stack(rows), torch.stack(masks).long()
    changed = input_ids.clone()
    changed[0, width_prompt : width_prompt + PROBE_COMPLETION_LENS[0]] = draw(PROBE_COMPLETION_LENS[0])
    return input_ids.to(device), attention_mask.to(device), width_completion, changed.to(device)


def _main_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    last = getattr(output, "last_hidden_state", None)
    return last if isinstance(last, torch.Tensor) else None


@contextlib.contextmanager
def _recorded_outputs(backbone: torch.nn.Module):
    """Record the main output tensor of every module of `backbone`, in the order the modules finish."""
    records: list[tuple[str, torch.nn.Module, torch.Tensor]] = []
    handles = []
    for name, module in backbone.named_modules():

        def hook(module, args, output, name=name):
            tensor = _main_tensor(output)
            if tensor is not None and tensor.dim() >= 2:
                records.append((name, module, tensor.detach()))

        handles.append(module.register_forward_hook(hook))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _token_difference(grouped: torch.Tensor, repeated_rows: torch.Tensor) -> torch.Tensor:
    """Per packed token: ||grouped - repeated|| / ||repeated||, NaN-aware (NaN in both is equal, in one is inf)."""
    g, r = grouped.flatten(1).double(), repeated_rows.flatten(1).double()
    g_nan, r_nan = g.isnan(), r.isnan()
    mismatch = (g_nan != r_nan).any(1)
    g, r = g.masked_fill(g_nan | r_nan, 0), r.masked_fill(g_nan | r_nan, 0)
    diff = (g - r).norm(dim=1) / r.norm(dim=1).clamp(min=1e-12)
    return diff.masked_fill(mismatch, float("inf"))


def _at_packed_positions(repeated: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """`(B, L, ...)` -> `(T, ...)`: the repeated forward's value at each packed token's row and column."""
    return repeated[layout.token_rows, layout.position_ids[0]]


def _first_differing_module(grouped_records, repeated_records, layout, tolerance) -> tuple[str, str, float] | None:
    """`(name, class name, difference)` of the first module whose output differs between the two runs."""
    repeated_by_call: dict[str, list[torch.Tensor]] = {}
    for name, _, tensor in repeated_records:
        repeated_by_call.setdefault(name, []).append(tensor)
    seen: dict[str, int] = {}
    for name, module, tensor in grouped_records:
        index = seen.get(name, 0)
        seen[name] = index + 1
        candidates = repeated_by_call.get(name, [])
        if index >= len(candidates):
            continue
        repeated = candidates[index]
        if tensor.shape[:2] != (1, layout.packed_tokens) or repeated.shape[0] != layout.batch_size:
            continue
        if tensor.shape[2:] != repeated.shape[2:] or repeated.dim() != tensor.dim():
            continue
        difference = float(_token_difference(tensor[0], _at_packed_positions(repeated, layout)).max())
        if difference > tolerance:
            return (name or "<backbone>", type(module).__name__, difference)
    return None


def _compute_dtype(inner_model) -> torch.dtype:
    """The dtype the probe computes in: autocast's where it is on, else the parameters'."""
    for device_type in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    parameter = next((p for p in inner_model.parameters() if p.is_floating_point()), None)
    return parameter.dtype if parameter is not None else torch.float32


def check_grouped_forward(model, inner_model, grouped_forward_context, check_layout=None, device=None) -> ProbeReport:
    """
    Compare the grouped and the repeated forward of `model` on the probe batch.

    Args:
        model: what the trainer calls (possibly a PEFT / DDP / DeepSpeed wrapper of `inner_model`).
        inner_model: the transformers `PreTrainedModel`; its `base_model` (the backbone) is what is compared.
        grouped_forward_context: `() -> context manager` for the grouped call (no mask building, see integration.py).
        check_layout: `(layout) -> None`, called after the grouped run; it may raise a more specific error (a model
            whose layers did not receive the layout).

    Raises:
        GroupedForwardMismatch: naming the first differing module.
    """
    backbone = inner_model.base_model
    device = device or next(p.device for p in inner_model.parameters())
    input_ids, attention_mask, logits_to_keep, changed_ids = probe_batch(inner_model.config, device)
    layout = build_group_layout(input_ids, attention_mask, logits_to_keep)
    changed_layout = build_group_layout(changed_ids, attention_mask, logits_to_keep)
    tolerance = TOLERANCE.get(_compute_dtype(inner_model), 1e-1)
    extra = {"logits_to_keep": 1}

    def grouped(probe_layout):
        with grouped_forward_context():
            model(input_ids=probe_layout.input_ids, position_ids=probe_layout.position_ids,
                  **{LAYOUT_KWARG: probe_layout}, **extra)

    was_training = inner_model.training
    inner_model.eval()
    try:
        with torch.no_grad():
            with _recorded_outputs(backbone) as repeated_records:
                model(input_ids=input_ids, attention_mask=attention_mask, **extra)
            with _recorded_outputs(backbone) as grouped_records:
                grouped(layout)
            with _recorded_outputs(backbone) as changed_records:
                grouped(changed_layout)
    finally:
        inner_model.train(was_training)
    if check_layout is not None:
        check_layout(layout)

    def backbone_output(records):
        outputs = [tensor for name, _, tensor in records if name == ""]
        return outputs[-1]

    repeated_out = backbone_output(repeated_records)
    grouped_out = backbone_output(grouped_records)
    differences = _token_difference(grouped_out[0], _at_packed_positions(repeated_out, layout))
    columns = layout.position_ids[0]
    # Tokens completion A1's content may change legitimately: its own suffix (row 0, from the repeated prompt token on).
    own_suffix = (layout.token_rows == 0) & (columns >= layout.prompt_width - 1)
    leaks = _token_difference(backbone_output(changed_records)[0], grouped_out[0])[~own_suffix]
    report = ProbeReport(float(differences.max()), float(leaks.max()), tolerance, layout)
    if report.max_difference <= tolerance and report.max_leak <= tolerance:
        return report

    culprit = _first_differing_module(grouped_records, repeated_records, layout, tolerance)
    where = (
        f"from {culprit[0]} ({culprit[1]}) on (per-token relative difference {culprit[2]:.3g})"
        if culprit is not None
        else f"at the backbone's output (per-token relative difference {report.max_difference:.3g})"
    )
    leak = (
        f" A completion's output also changed when another completion of its prompt changed (by {report.max_leak:.3g}):"
        " tokens of one completion reach another."
        if report.max_leak > tolerance
        else ""
    )
    raise GroupedForwardMismatch(
        f"Prefix grouping self-check failed for {type(inner_model).__name__}: on a probe batch its shared-prefix "
        f"forward differs from the repeated forward {where}, beyond the {tolerance:g} allowed.{leak} Something in "
        "this model mixes tokens outside the layers prefix grouping splits (attention, and the recurrent and "
        "convolution mixers in prefix_grouper_trl.mixers): a convolution or recurrence we do not know, custom "
        "modeling code, or a forward hook. Training it grouped would give wrong log-probs and gradients. Set "
        "prefix_grouping=False to train it with GRPOTrainer's repeated forward, or register a handler for that module "
        "class with prefix_grouper_trl.mixers.register_mixer."
    )
