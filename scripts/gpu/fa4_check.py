"""
flash-attn 4 (PyPI `flash-attn-4`, the CuTe DSL kernels, `flash_attn.cute`) on the GPU machine: does its varlen
kernel run forward and backward there, and can it back the shared-prefix varlen path?

    python scripts/gpu/fa4_check.py          # run by `bash scripts/gpu/run_checks.sh fa4` (docs/GPU_CHECKS.md)

Checks, in bf16, head sizes 64 and 128, GQA, each against an fp64 reference and bounded by dense bf16 SDPA's own
error (max |fa4 - ref64| <= 2 * max |sdpa_bf16 - ref64| + 1e-5, per tensor: output, dq, dk, dv):

1. plain causal varlen (three sequences of different lengths);
2. the packed row of `split_attention_varlen` with flash-attn 4 as its `VarlenFn`: the suffix call has queries
   shorter than their keys, so this also checks that flash-attn 4 aligns causality bottom-right as flash-attn 2 does.

Then times one attention layer's forward+backward of `split_attention_varlen` for the Qwen2.5-1.5B shape (12 query
heads, 2 kv heads, head size 128) at prompt 8192, completion 512, group 8, with flash-attn 4 and with torch's
`varlen_attn` (the path `sdpa` takes on CUDA). Prints one PASS/FAIL line per check and exits 1 if any failed.

Needs only torch and this checkout: without trl installed, `prefix_grouper_trl`'s torch-only modules are loaded
without running the package's `__init__` (which imports the trainer).
"""

import importlib.util
import inspect
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
EPS = 1e-5


def import_core():
    """`layout` and `attention` of this checkout (torch-only modules)."""
    if importlib.util.find_spec("trl") is None and "prefix_grouper_trl" not in sys.modules:
        package = types.ModuleType("prefix_grouper_trl")
        package.__path__ = [str(REPO / "prefix_grouper_trl")]
        sys.modules["prefix_grouper_trl"] = package
    sys.path.insert(0, str(REPO))
    from prefix_grouper_trl import attention, layout

    return layout, attention


def fa4_varlen_fn():
    """flash-attn 4's varlen kernel with the `VarlenFn` contract of `split_attention_varlen`."""
    from flash_attn.cute import flash_attn_varlen_func

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        result = flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
            softmax_scale=scale, causal=True,
        )
        return result[0] if isinstance(result, tuple) else result

    return varlen


def torch_varlen_fn():
    """torch's varlen flash kernel, causal bottom-right. torch 2.11 has no `enable_gqa` keyword (its flash path takes
    fewer kv heads as they are); newer torch has it."""
    from torch.nn.attention.varlen import varlen_attn

    gqa = {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0), **gqa)

    return varlen


def gaussian(generator, *shape, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device="cuda", dtype=dtype)


def trl_batch(prompt_lens, completion_lens, group_of_row, seed=0):
    """TRL's micro-batch layout: prompts left-padded, completions right-padded; rows of a group share the prompt."""
    generator = torch.Generator().manual_seed(seed)
    width_prompt, width_completion = max(prompt_lens), max(max(completion_lens), 1)
    prompts, rows, masks = {}, [], []
    for prompt_len, completion_len, group in zip(prompt_lens, completion_lens, group_of_row):
        prompt = prompts.setdefault(group, torch.randint(4, 1000, (prompt_len,), generator=generator))
        completion = torch.randint(4, 1000, (completion_len,), generator=generator)
        left, right = width_prompt - prompt_len, width_completion - completion_len
        pad_left, pad_right = torch.zeros(left, dtype=torch.long), torch.zeros(right, dtype=torch.long)
        rows.append(torch.cat([pad_left, prompt, completion, pad_right]))
        masks.append(torch.cat([pad_left, torch.ones(prompt_len + completion_len, dtype=torch.long), pad_right]))
    return torch.stack(rows), torch.stack(masks), width_completion


def errors_bound(name, got: dict, low: dict, reference: dict) -> tuple[bool, str]:
    parts, ok = [], True
    for key in reference:
        error = (got[key].double() - reference[key]).abs().max().item()
        baseline = (low[key].double() - reference[key]).abs().max().item()
        passed = bool(torch.isfinite(got[key]).all()) and error <= 2 * baseline + EPS
        ok &= passed
        parts.append(f"{key} {error:.2e} (sdpa {baseline:.2e}){'' if passed else ' FAIL'}")
    return ok, f"{name}: " + ", ".join(parts)


def run_with_grads(function, q, k, v, weights):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = function(q, k, v)
    (out.double() * weights).sum().backward()
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def check_plain_varlen(head_dim, heads, kv_heads, lengths=(257, 64, 1000)) -> tuple[bool, str]:
    """Token-major (total, H, D) causal varlen vs per-sequence SDPA."""
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = gaussian(generator, total, heads, head_dim)
    k, v = (gaussian(generator, total, kv_heads, head_dim) for _ in "kv")
    weights = gaussian(generator, total, heads, head_dim)
    scale = head_dim**-0.5

    def per_sequence_sdpa(q, k, v):
        outputs = []
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            qs, ks, vs = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
            outputs.append(out[0].transpose(0, 1))
        return torch.cat(outputs)

    fa4 = fa4_varlen_fn()
    reference = run_with_grads(per_sequence_sdpa, q, k, v, weights)
    low = tuple(x.bfloat16() for x in (q, k, v))
    baseline = run_with_grads(per_sequence_sdpa, *low, weights)
    got = run_with_grads(lambda q, k, v: fa4(q, k, v, cu, cu, max(lengths), max(lengths), scale), *low, weights)
    return errors_bound(f"plain causal varlen d{head_dim} {heads}:{kv_heads}", got, baseline, reference)


def info_torch_routed_fa4(head_dim=128, heads=12, kv_heads=2) -> str:
    """
    torch >= 2.11 can route its own flash kernels to flash-attn 4 (`activate_flash_attention_impl("FA4")`, marked a
    prototype there). Report whether `varlen_attn`, causal, then runs forward and backward within the same bound;
    informational: our varlen path does not use it.
    """
    try:
        import torch.nn.attention._fa4  # noqa: F401  (registers "FA4" with torch's registry)
        from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as error:
        return f"not in torch {torch.__version__}: {error}"
    lengths = (257, 64, 1000)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(sum(lengths), heads, head_dim, generator=generator, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lengths), kv_heads, head_dim, generator=generator, device="cuda", dtype=torch.bfloat16)
            for _ in "kv")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    activate_flash_attention_impl("FA4")
    try:
        out = varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), window_size=(-1, 0))
        out.float().square().sum().backward()
        finite = all(bool(torch.isfinite(x).all()) for x in (out, q.grad, k.grad, v.grad))
        return f"forward+backward ran, finite: {finite}"
    except Exception as error:
        return f"{type(error).__name__}: {str(error)[:300]}"
    finally:
        restore_flash_attention_impl()


def packed_layout(layout_module, prompt_lens, completion_lens, groups):
    input_ids, attention_mask, logits_to_keep = trl_batch(prompt_lens, completion_lens, groups)
    return layout_module.build_group_layout(input_ids.cuda(), attention_mask.cuda(), logits_to_keep)


def dense_mask(attention_module, layout):
    group, suffix = attention_module.packed_token_ids(layout, torch.device("cuda"))
    q_index = torch.arange(layout.packed_tokens, device="cuda")[:, None]
    k_index = torch.arange(layout.packed_tokens, device="cuda")[None, :]
    visible = (suffix[k_index] == -1) | (suffix[k_index] == suffix[q_index])
    visible = (group[q_index] == group[k_index]) & (k_index <= q_index) & visible
    return visible.view(1, 1, layout.packed_tokens, layout.packed_tokens)


def check_split_attention(layout_module, attention_module, head_dim, heads, kv_heads) -> tuple[bool, str]:
    # Two groups; prefixes and suffixes across tile boundaries; a one-token suffix.
    layout = packed_layout(layout_module, [300, 300, 300, 77, 77], [130, 1, 64, 200, 5], [0, 0, 0, 1, 1])
    mask = dense_mask(attention_module, layout)
    generator = torch.Generator(device="cuda").manual_seed(1)
    q = gaussian(generator, 1, heads, layout.packed_tokens, head_dim)
    k, v = (gaussian(generator, 1, kv_heads, layout.packed_tokens, head_dim) for _ in "kv")
    weights = gaussian(generator, 1, layout.packed_tokens, heads, head_dim)
    scale = head_dim**-0.5

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)

    fa4 = fa4_varlen_fn()

    def split(q, k, v):
        return attention_module.split_attention_varlen(fa4, q, k, v, layout, scaling=scale)[0]

    reference = run_with_grads(dense, q, k, v, weights)
    low = tuple(x.bfloat16() for x in (q, k, v))
    baseline = run_with_grads(dense, *low, weights)
    got = run_with_grads(split, *low, weights)
    return errors_bound(f"split_attention_varlen with fa4 d{head_dim} {heads}:{kv_heads}", got, baseline, reference)


def time_split_attention(layout_module, attention_module, varlen, reps=10) -> float:
    """Median ms of one layer's split-attention forward+backward, Qwen2.5-1.5B heads, P=8192, C=512, G=8."""
    layout = packed_layout(layout_module, [8192] * 8, [512] * 8, [0] * 8)
    heads, kv_heads, head_dim = 12, 2, 128
    generator = torch.Generator(device="cuda").manual_seed(2)
    q = gaussian(generator, 1, heads, layout.packed_tokens, head_dim, dtype=torch.bfloat16)
    k, v = (gaussian(generator, 1, kv_heads, layout.packed_tokens, head_dim, dtype=torch.bfloat16) for _ in "kv")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    grad = gaussian(generator, 1, layout.packed_tokens, heads, head_dim, dtype=torch.bfloat16)
    times = []
    for rep in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = attention_module.split_attention_varlen(varlen, q, k, v, layout, scaling=head_dim**-0.5)[0]
        out.backward(grad)
        end.record()
        torch.cuda.synchronize()
        if rep >= 3:
            times.append(start.elapsed_time(end))
        q.grad = k.grad = v.grad = None
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available():
        print("fa4_check: no CUDA device here")
        return 2
    capability = torch.cuda.get_device_capability()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, compute capability {capability}")
    try:
        start = time.perf_counter()
        import flash_attn.cute  # noqa: F401
        from importlib.metadata import version

        print(f"flash-attn-4 {version('flash-attn-4')} imported in {time.perf_counter() - start:.1f}s")
    except Exception as error:  # report why, whatever it is (missing library, driver, ...)
        print(f"FAIL import flash_attn.cute: {type(error).__name__}: {error}")
        return 1
    layout_module, attention_module = import_core()
    results = []
    for head_dim, heads, kv_heads in ((64, 14, 2), (128, 12, 2)):
        for check in (check_plain_varlen, lambda *a: check_split_attention(layout_module, attention_module, *a)):
            start = time.perf_counter()
            try:
                ok, line = check(head_dim, heads, kv_heads)
            except Exception as error:
                ok, line = False, f"d{head_dim}: {type(error).__name__}: {str(error)[:400]}"
            results.append(ok)
            print(f"{'PASS' if ok else 'FAIL'} {line}  [{time.perf_counter() - start:.1f}s incl. JIT]", flush=True)
    print(f"INFO torch varlen_attn routed to flash-attn 4: {info_torch_routed_fa4()}", flush=True)
    if all(results):
        candidates = {"flash-attn-4": fa4_varlen_fn, "torch varlen_attn": torch_varlen_fn}
        for name, make_varlen in candidates.items():
            try:
                varlen = make_varlen()
                ms = time_split_attention(layout_module, attention_module, varlen)
                print(f"timing: split attention fwd+bwd, 1 layer, 1.5B heads, P=8192 C=512 G=8: {name} {ms:.2f} ms")
            except Exception as error:
                print(f"timing: {name} failed: {type(error).__name__}: {str(error)[:300]}")
    print(f"fa4_check: {sum(results)}/{len(results)} checks passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
