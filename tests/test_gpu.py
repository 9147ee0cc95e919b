"""
GPU paths (skipped without CUDA), each against an fp64 reference and bounded by the repeated forward's own error
(STYLE habit 7). As flash-attn's own tests do, the bound is per tensor, on the largest error::

    max |grouped - ref_fp64| <= 2 * max |repeated - ref_fp64| + 1e-5

(element by element it would fail by chance wherever the repeated forward happens to round close to the reference).

Two levels, for every GPU attention path and for bf16 and fp32 where the path runs in that dtype:

- the split attention alone, on random q/k/v: the output and dq, dk, dv. "repeated" is the packed-row attention
  computed densely (SDPA with a boolean (T, T) mask) in the same dtype, the reference the same in fp64;
- the model through the trainer: per-token log-probs, entropies and every parameter gradient of the shared-prefix
  forward, "repeated" is GRPOTrainer's forward of the same rows on the same model, the reference the same weights in
  fp64 with eager attention and plain logits (no TRL kernel).

Paths (`PATHS`), and how each is reached on CUDA:

| path                | model attn_implementation | dtypes      | kernel                                           |
| ------------------- | ------------------------- | ----------- | ------------------------------------------------ |
| `varlen_torch`      | sdpa                      | bf16        | torch.nn.attention.varlen.varlen_attn (2 calls)  |
| `flash_attention_2` | flash_attention_2         | bf16        | flash_attn_varlen_func (2 calls), if installed    |
| `flex`              | flex_attention            | bf16, fp32  | one compiled flex_attention with a BlockMask      |
| `sdpa_masks`        | sdpa                      | bf16, fp32  | per-group SDPA with block masks (bf16: varlen off) |
| `eager`             | eager                     | bf16, fp32  | per-group eager attention with additive masks     |

Every test asserts which split function ran, so a silent fallback (say, no varlen kernel in this torch) fails
instead of passing as another path.
"""

import contextlib
import importlib.util
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import grpo_args, make_batch, prompt_dataset, tiny_tokenizer, token_count_reward
from test_attention import dense_packed_mask
from test_equivalence import layout_batch
from transformers import AutoModelForCausalLM
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from trl import GRPOTrainer

import prefix_grouper_trl.integration as integration
from prefix_grouper_trl import PrefixGroupedGRPOTrainer
from prefix_grouper_trl.layout import build_group_layout

pytestmark = pytest.mark.gpu

EPS = 1e-5
HEADS, KV_HEADS = 4, 2
# A long layout: prefixes and suffixes that cross the kernels' 64/128-token tiles, a suffix of one token, two groups.
LONG_CASE = ([300, 300, 300, 77, 77], [130, 1, 64, 200, 5], [0, 0, 0, 1, 1])
KERNEL_CASES = ["uneven_groups", "empty_completions", "prompt_of_one_token", "shuffled_rows", "long"]
MODEL_CASES = ["uneven_groups", "empty_completions", "shuffled_rows", "long"]


def _has_flash_attn_2() -> bool:
    # flash-attn 4 also installs a `flash_attn` package (only `flash_attn.cute`), so look for flash-attn 2's function.
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:
        return False
    return True


def _has_torch_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


# path -> (base attn_implementation, dtypes it runs in, the split function the dispatcher must call)
PATHS = {
    "varlen_torch": ("sdpa", (torch.bfloat16,), "split_attention_varlen"),
    "flash_attention_2": ("flash_attention_2", (torch.bfloat16,), "split_attention_varlen"),
    "flex": ("flex_attention", (torch.bfloat16, torch.float32), "split_attention_flex"),
    "sdpa_masks": ("sdpa", (torch.bfloat16, torch.float32), "split_attention"),
    "eager": ("eager", (torch.bfloat16, torch.float32), "split_attention"),
}
PATH_DTYPES = [
    pytest.param(path, dtype, id=f"{path}-{str(dtype).removeprefix('torch.')}")
    for path, (_, dtypes, _) in PATHS.items()
    for dtype in dtypes
]
SPLIT_FUNCTIONS = ("split_attention", "split_attention_varlen", "split_attention_flex")


def gpu_config(head_dim: int = 64) -> Qwen2Config:
    """A 2-layer Qwen2 with GQA 4:2 and a head size the flash and flex kernels take (they need >= 16)."""
    hidden = HEADS * head_dim
    return Qwen2Config(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def gpu_model(attn_implementation: str, dtype: torch.dtype, head_dim: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    config = gpu_config(head_dim)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    # Eval mode: no dropout, and transformers compiles flex attention once per training flag, not twice.
    return model.cuda().eval()


def batch_for(case: str):
    if case == "long":
        return make_batch(*LONG_CASE, seed=0)
    return layout_batch(case)


@contextlib.contextmanager
def path_selected(path: str, monkeypatch):
    """Force `path` where the dispatcher has a choice, and count the calls of each split function."""
    if path == "varlen_torch" and not _has_torch_varlen():
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    if path == "flash_attention_2" and not _has_flash_attn_2():
        pytest.skip("flash-attn 2 is not installed")
    if path == "sdpa_masks":
        monkeypatch.setattr(integration, "_torch_varlen", lambda *args, **kwargs: None)
    calls = dict.fromkeys(SPLIT_FUNCTIONS, 0)

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    for name in SPLIT_FUNCTIONS:
        monkeypatch.setattr(integration, name, counting(name, getattr(integration, name)))
    yield calls
    expected = PATHS[path][2]
    ran = {name: count for name, count in calls.items() if count}
    assert set(ran) == {expected}, f"{path}: expected only {expected} to run, the dispatcher called {ran or 'nothing'}"


def assert_within_repeated_error(name: str, grouped, repeated, reference, eps: float = EPS) -> tuple[float, float]:
    """The per-tensor bound of the module docstring; names the tensor and the worst index when it fails."""
    grouped, repeated, reference = (x.detach().double() for x in (grouped, repeated, reference))
    assert grouped.shape == reference.shape == repeated.shape, f"{name}: shapes differ"
    for label, values in (("grouped", grouped), ("repeated", repeated), ("fp64 reference", reference)):
        assert torch.isfinite(values).all(), f"{name}: non-finite values in the {label} result"
    grouped_error, repeated_error = (grouped - reference).abs(), (repeated - reference).abs()
    bound = 2 * repeated_error.max().item() + eps
    worst = grouped_error.max().item() if grouped_error.numel() else 0.0
    if worst > bound:
        index = tuple(int(i) for i in torch.unravel_index(grouped_error.argmax(), grouped_error.shape))
        raise AssertionError(
            f"{name}: max |grouped - ref64| = {worst:.3g} at {index} (grouped {grouped[index].item():.8g}, "
            f"ref64 {reference[index].item():.8g}) > 2 * max |repeated - ref64| + {eps} = {bound:.3g}"
        )
    return worst, repeated_error.max().item() if repeated_error.numel() else 0.0


# ----------------------------------------------------------------------------------------------------------------
# The split attention alone.


def gaussian(generator, *shape) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device="cuda", dtype=torch.float64)


def dense_attention(q, k, v, layout, scale):
    """The packed row's attention, dense: (1, H, T, D) -> (1, T, H, D). Reference only."""
    mask = dense_packed_mask(layout).to(q.device).view(1, 1, layout.packed_tokens, layout.packed_tokens)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)


def attention_and_grads(function, q, k, v, weights):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = function(q, k, v)
    (out.double() * weights).sum().backward()
    return {"output": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


@pytest.mark.parametrize("path, dtype", PATH_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_split_attention_kernel_within_the_dense_error(monkeypatch, path, dtype, head_dim, case):
    if path == "flex" and head_dim != 64:
        pytest.skip("flex: one head size keeps the compiled kernels under dynamo's recompile limit")
    base = PATHS[path][0]
    input_ids, attention_mask, logits_to_keep = batch_for(case)
    layout = build_group_layout(input_ids.cuda(), attention_mask.cuda(), logits_to_keep)
    module = gpu_model(base, dtype, head_dim).model.layers[0].self_attn
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = gaussian(generator, 1, HEADS, layout.packed_tokens, head_dim)
    k, v = (gaussian(generator, 1, KV_HEADS, layout.packed_tokens, head_dim) for _ in "kv")
    weights = gaussian(generator, 1, layout.packed_tokens, HEADS, head_dim)
    scale = module.scaling

    reference = attention_and_grads(lambda q, k, v: dense_attention(q, k, v, layout, scale), q, k, v, weights)
    low = tuple(x.to(dtype) for x in (q, k, v))
    repeated = attention_and_grads(lambda q, k, v: dense_attention(q, k, v, layout, scale), *low, weights)

    def grouped_attention(q, k, v):
        out, _ = integration._dispatch(
            base, module, q, k, v, None, prefix_group_layout=layout, scaling=scale, dropout=0.0
        )
        return out

    with path_selected(path, monkeypatch):
        grouped = attention_and_grads(grouped_attention, *low, weights)
    for name in reference:
        label = f"{path}/{dtype}/{case}/d{head_dim} {name}"
        assert_within_repeated_error(label, grouped[name], repeated[name], reference[name])


# ----------------------------------------------------------------------------------------------------------------
# The model, through the trainer.


def trainer_logps_entropies_grads(method, model, batch, weights):
    model.zero_grad(set_to_none=True)
    input_ids, attention_mask, logits_to_keep = batch
    logps, entropies, _ = method(model, input_ids, attention_mask, logits_to_keep, compute_entropy=True)
    ((logps.double() * weights) + (entropies.double() * weights.flip(0))).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), entropies.detach(), grads


def reference_logps_entropies_grads(model, batch, weights, temperature: float):
    """
    The same weights in fp64, eager attention, full logits: what TRL's fused head computes, without it. Each row runs
    alone and unpadded, with the position ids the repeated forward gives its tokens (their columns), so no attention
    mask is involved (fully masked padding rows are where low-precision masks go wrong, not what is tested here).
    """
    input_ids, attention_mask, logits_to_keep = batch
    reference = AutoModelForCausalLM.from_config(gpu_config(), attn_implementation="eager", dtype=torch.float64)
    reference.load_state_dict({name: value.double() for name, value in model.state_dict().items()})
    reference = reference.cuda().eval()
    rows = []
    for row in range(input_ids.size(0)):
        columns = attention_mask[row].nonzero()[:, 0]
        row_logits = reference(input_ids=input_ids[row, columns][None], position_ids=columns[None]).logits[0]
        rows.append(row_logits.new_zeros(input_ids.size(1), row_logits.size(-1)).index_copy(0, columns, row_logits))
    logits = torch.stack(rows)[:, -logits_to_keep - 1 : -1]
    log_probs = (logits / temperature).log_softmax(-1)
    completion_mask = attention_mask[:, -logits_to_keep:].bool()
    logps = log_probs.gather(-1, input_ids[:, -logits_to_keep:, None])[..., 0].masked_fill(~completion_mask, 0)
    entropies = -(log_probs.exp() * log_probs).sum(-1).masked_fill(~completion_mask, 0)
    ((logps * weights) + (entropies * weights.flip(0))).sum().backward()
    grads = {name: p.grad.detach() for name, p in reference.named_parameters() if p.grad is not None}
    return logps.detach(), entropies.detach(), grads


@pytest.mark.parametrize("path, dtype", PATH_DTYPES)
@pytest.mark.parametrize("case", MODEL_CASES)
def test_trainer_logps_entropies_and_gradients_within_the_repeated_error(tmp_path, monkeypatch, path, dtype, case):
    base = PATHS[path][0]
    if path == "flash_attention_2" and not _has_flash_attn_2():
        pytest.skip("flash-attn 2 is not installed")
    trainer = PrefixGroupedGRPOTrainer(
        model=gpu_model(base, dtype),
        reward_funcs=token_count_reward,
        args=grpo_args(tmp_path, use_cpu=False, bf16=dtype == torch.bfloat16),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
    )
    model = trainer.model
    batch = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in batch_for(case))
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(batch[0].size(0), batch[2], generator=generator, dtype=torch.float64).cuda()

    with path_selected(path, monkeypatch):
        grouped = trainer_logps_entropies_grads(trainer._get_per_token_logps_and_entropies, model, batch, weights)
    repeated_method = partial(GRPOTrainer._get_per_token_logps_and_entropies, trainer)
    repeated = trainer_logps_entropies_grads(repeated_method, model, batch, weights)
    reference = reference_logps_entropies_grads(model, batch, weights, trainer.temperature)

    label = f"{path}/{dtype}/{case}"
    assert_within_repeated_error(f"{label} log-probs", grouped[0], repeated[0], reference[0])
    assert_within_repeated_error(f"{label} entropies", grouped[1], repeated[1], reference[1])
    assert grouped[2].keys() == repeated[2].keys() == reference[2].keys() and grouped[2]
    for name in reference[2]:
        assert_within_repeated_error(f"{label} grad {name}", grouped[2][name], repeated[2][name], reference[2][name])
