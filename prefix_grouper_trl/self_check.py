"""
A one-time check that a model's grouped forward is its repeated forward, on a small probe batch.

The split attention and the registered mixers cover every token mixer we know by type. Custom modeling code can mix
tokens anywhere (a convolution inside an MLP, a forward hook, remote code), and nothing can recognise that by name. So
before a model is trained, its grouped forward is compared once with the repeated forward it replaces::

    probe batch   group A: prompt of 9 tokens, two completions (5 and 4 tokens)
                  group B: prompt of 6 tokens (left-padded by 3), one completion (3 tokens)

    1. equal:     every module's output at every real token equals the repeated forward's (relative to the module's
                  largest token), the backbone's output included
    2. no leak:   changing completion A1's tokens leaves every other token's module outputs unchanged

Both run without gradients and with dropout off (eval mode), so dropout is never a mismatch. Modules are compared
where their output has one row per token (a mixer's inner modules on its padded batches are not); the error names the
first module, in the order modules finish, whose output differs, and the child of its decoder layer that holds it:
the module that mixes tokens outside what prefix grouping splits.
"""

import contextlib
from dataclasses import dataclass

import torch

from .layout import LAYOUT_KWARG, GroupLayout, build_group_layout

# Difference allowed between a module's grouped and repeated outputs, max_t ||g_t - r_t|| / max_t ||r_t||. A token
# mixer the packed row breaks moves the tokens it mixes wrongly by O(0.1-1) of the module's output (a tiny random
# model's Mamba layer without its prompt state: 0.04; a convolution reading the previous completion: 0.5); rounding
# moves them by ~1e-6 in float32 (more with TF32 on a GPU) and ~1e-2 in bfloat16, where only the larger errors are
# seen (the leak test, shapes unchanged, stays sharp there).
TOLERANCE = {torch.float64: 2e-3, torch.float32: 2e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}

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
        padding = torch.full((left,), pad), torch.full((right,), pad)
        rows.append(torch.cat([padding[0], prompts[group], draw(completion_len), padding[1]]))
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
def _recorded_outputs(backbone: torch.nn.Module, prefix: str = ""):
    """
    Record the main output tensor of every module of `backbone`, in the order the modules finish, named as in the
    whole model (`prefix` is the backbone's own name there; the backbone itself is recorded as "").
    """
    records: list[tuple[str, torch.nn.Module, torch.Tensor]] = []
    handles = []
    for name, module in backbone.named_modules():
        name = f"{prefix}.{name}" if prefix and name else name

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


def _difference(grouped: torch.Tensor, reference: torch.Tensor) -> float:
    """
    max over tokens of ||grouped_t - reference_t||, over max over tokens of ||reference_t|| (both `(T, ...)`).

    Normalised by the module's largest token, so a module whose outputs are all near zero (where rounding is large
    relative to each token) is not a false alarm, while a wrong token of ordinary size is. NaN in both is equal; NaN
    in one only is an infinite difference.
    """
    g, r = grouped.flatten(1).double(), reference.flatten(1).double()
    g_nan, r_nan = g.isnan(), r.isnan()
    if (g_nan != r_nan).any():
        return float("inf")
    g, r = g.masked_fill(g_nan, 0), r.masked_fill(r_nan, 0)
    scale = r.norm(dim=1).max().clamp(min=1e-30) if r.numel() else 1.0
    return float((g - r).norm(dim=1).max() / scale) if r.numel() else 0.0


def _at_packed_positions(repeated: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """`(B, L, ...)` -> `(T, ...)`: the repeated forward's value at each packed token's row and column."""
    return repeated[layout.token_rows, layout.position_ids[0]]


def _token_aligned(records, layout: GroupLayout, repeated: bool):
    """
    `{(name, call index): (module, tensor (T, ...))}`: the recorded outputs laid out one row per packed token.

    Grouped runs record `(1, T, ...)` tensors; the repeated run records `(B, L, ...)` ones, mapped to the packed
    tokens' rows and columns. Outputs of other shapes (channel-first convolutions, flattened router logits, a mixer's
    inner modules on its padded batches) are skipped.
    """
    width = layout.prompt_width + layout.logits_to_keep
    aligned, calls = {}, {}
    for name, module, tensor in records:
        index = calls.get(name, 0)
        calls[name] = index + 1
        if repeated and tensor.shape[:2] == (layout.batch_size, width):
            aligned[(name, index)] = (module, _at_packed_positions(tensor, layout))
        elif not repeated and tensor.shape[:2] == (1, layout.packed_tokens):
            aligned[(name, index)] = (module, tensor[0])
    return aligned


def _differing_modules(records, reference_records, layout, reference_is_repeated: bool, keep=None):
    """`[(name, class name, difference)]` of every token-aligned module output, in the order modules finish."""
    reference = _token_aligned(reference_records, layout, reference_is_repeated)
    found = []
    for (name, index), (module, tensor) in _token_aligned(records, layout, repeated=False).items():
        other = reference.get((name, index))
        if other is None or other[1].shape != tensor.shape:
            continue
        other = other[1]
        if keep is not None:
            tensor, other = tensor[keep], other[keep]
        found.append((name or "<backbone>", type(module).__name__, _difference(tensor, other)))
    return found


def _layer_child(model: torch.nn.Module, name: str) -> tuple[str, str] | None:
    """`(name, class name)` of the child of a decoder layer that holds module `name` (what a user would change)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            ancestor = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            return None
        if isinstance(ancestor, GradientCheckpointingLayer):
            child_name = ".".join(parts[: i + 1])
            return child_name, type(model.get_submodule(child_name)).__name__
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
    prefix = next((name for name, module in inner_model.named_modules() if module is backbone), "")
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
            with _recorded_outputs(backbone, prefix) as repeated_records:
                model(input_ids=input_ids, attention_mask=attention_mask, **extra)
            try:
                with _recorded_outputs(backbone, prefix) as grouped_records:
                    grouped(layout)
                with _recorded_outputs(backbone, prefix) as changed_records:
                    grouped(changed_layout)
            except (RuntimeError, TypeError, IndexError, KeyError, AttributeError) as error:
                raise GroupedForwardMismatch(
                    f"Prefix grouping self-check failed for {type(inner_model).__name__}: its shared-prefix forward "
                    f"fails on a probe batch ({type(error).__name__}: {error}), where its repeated forward runs. "
                    "Some layer of this model does not work on a packed row (an attention or a token mixer prefix "
                    "grouping does not know). Set prefix_grouping=False to train it with GRPOTrainer's repeated "
                    "forward."
                ) from error
    finally:
        inner_model.train(was_training)
    if check_layout is not None:
        check_layout(layout)

    differences = _differing_modules(grouped_records, repeated_records, layout, reference_is_repeated=True)
    columns = layout.position_ids[0]
    # Tokens completion A1's content may change legitimately: its own suffix (row 0, from the repeated prompt token
    # on).
    others = ~((layout.token_rows == 0) & (columns >= layout.prompt_width - 1))
    leaks = _differing_modules(changed_records, grouped_records, layout, reference_is_repeated=False, keep=others)
    if not any(name == "<backbone>" for name, _, _ in differences):
        raise RuntimeError(
            f"Prefix grouping self-check: the backbone of {type(inner_model).__name__} returned no hidden states "
            "shaped like its input; cannot compare the grouped and the repeated forward. Set prefix_grouping=False."
        )
    report = ProbeReport(
        max(d for _, _, d in differences), max((d for _, _, d in leaks), default=0.0), tolerance, layout
    )
    if report.max_difference <= tolerance and report.max_leak <= tolerance:
        return report

    culprit = next(((n, c, d) for n, c, d in differences if d > tolerance), None)
    leaker = next(((n, c, d) for n, c, d in leaks if d > tolerance), None)
    first = culprit or leaker
    block = _layer_child(inner_model, first[0])
    where = f"from {block[0]} ({block[1]}) on" if block is not None else f"from {first[0]} ({first[1]}) on"
    where += f" (first at {first[0]}, relative difference {first[2]:.3g})"
    leak = (
        f" A completion's output also changed when another completion of its prompt changed ({leaker[0]}, by "
        f"{leaker[2]:.3g}): tokens of one completion reach another."
        if leaker is not None
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
