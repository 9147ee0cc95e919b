"""
One attention layer, forward+backward, on the packed row of one point: the shipped split attention and variants,
to see where the attention time goes and what a change would buy (seconds per run, not minutes).

    python -m benchmarks.bench_attention                                   # P=2048 C=128 G=8, cpu-small's heads
    python -m benchmarks.bench_attention --prompt-len 512 --completion-len 256 --group-size 16
    python -m benchmarks.bench_attention --prompt-len 128 --completion-len 32 --group-size 2 --num-groups 64
    python -m benchmarks.bench_attention --calibrate    # the cost model's per-call overhead, in query-key pairs

Variants (all on the same random q/k/v of the packed row, (1, H, T, D) / (1, H_kv, T, D)):

    shipped      prefix_grouper_trl.attention.split_attention with sdpa, as the trainer runs it on a CPU (groups
                 bucketed into shared calls where its cost model says so, else the per-group loop)
    loop         the per-group loop forced: per group, the prefix call and the suffixes batched per suffix
    rectangle    the per-group loop, every group's suffixes as one S x (P-1+S) block-mask call
    lse_merge    prototype (not in the library): suffix queries x prefix keys as one dense call (no mask, native GQA)
                 plus each suffix x its own keys as one batched causal call, merged by log-sum-exp; backward by
                 calling the flash backward of each piece with the merged output and log-sum-exp (exact)
    prefix       the prefix causal calls alone, all groups in one call (the floor of every grouped variant)
    repeated     what GRPOTrainer's forward pays: G rows of P+C tokens, causal, native GQA (for scale)

Outputs and input gradients of every grouped variant are checked against `shipped`.

`--calibrate` measures `CALL_OVERHEAD_PAIRS` of `prefix_grouper_trl/attention.py`: the same small groups through the
per-group loop (two calls per group) and bucketed (two calls in all), their difference per saved call, divided by the
time of one query-key pair in a large call.
"""

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

from prefix_grouper_trl import attention as pg_attention
from prefix_grouper_trl.layout import build_group_layout

from .common import MODEL_SHAPES, Point, build_model, make_micro_batch


@contextmanager
def _forced(loop: bool = False, batched_suffixes: bool | None = None, bucketed: bool = False):
    """
    Force the library's choices: `loop` runs the per-group loop (no call shared by groups, which is what
    `MAX_CALL_KEY_ELEMENTS = 0` means); `bucketed` takes the buckets whenever there are any (gathers counted free);
    `batched_suffixes` picks the loop's suffix call, the block-mask rectangle (False) or the batch per suffix (True).
    Otherwise the library's own rules.
    """
    saved = pg_attention._batching_pays, pg_attention.MAX_CALL_KEY_ELEMENTS, pg_attention.GATHER_PAIRS_PER_TOKEN
    if batched_suffixes is not None:
        def forced(prefix_len, suffix_lens):
            return batched_suffixes and len(suffix_lens) > 1 and prefix_len > 0

        pg_attention._batching_pays = forced
    if loop:
        pg_attention.MAX_CALL_KEY_ELEMENTS = 0
    if bucketed:
        pg_attention.GATHER_PAIRS_PER_TOKEN = 0
    try:
        yield
    finally:
        pg_attention._batching_pays, pg_attention.MAX_CALL_KEY_ELEMENTS, pg_attention.GATHER_PAIRS_PER_TOKEN = saved


class _MergedSuffixAttention(torch.autograd.Function):
    """
    Suffix attention of one group as two flash calls merged by log-sum-exp.

    q_s (1, H, S, D) with S = n * C (n equal suffixes), k_p / v_p (1, H_kv, P, D), k_s / v_s (1, H_kv, S, D).
    Piece 1: q_s x [prefix], no mask. Piece 2: per suffix, q x own keys, causal (batched over suffixes).
    """

    @staticmethod
    def forward(ctx, q_s, k_p, v_p, k_s, v_s, n, scale):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out_1, lse_1 = flash(q_s, k_p, v_p, 0.0, False, scale=scale)

        def per_suffix(x):  # (1, h, n*C, D) -> (n, h, C, D)
            return x[0].unflatten(1, (n, -1)).transpose(0, 1)

        q_b, k_b, v_b = per_suffix(q_s), per_suffix(k_s), per_suffix(v_s)
        out_2, lse_2 = flash(q_b, k_b, v_b, 0.0, True, scale=scale)
        out_2 = out_2.transpose(0, 1).flatten(1, 2).unsqueeze(0)  # (1, H, S, D)
        lse_2 = lse_2.transpose(0, 1).flatten(1, 2).unsqueeze(0)  # (1, H, S)
        lse = torch.logaddexp(lse_1, lse_2)
        out = out_1 * (lse_1 - lse).exp().unsqueeze(-1) + out_2 * (lse_2 - lse).exp().unsqueeze(-1)
        ctx.save_for_backward(q_s, k_p, v_p, k_s, v_s, out, lse)
        ctx.n, ctx.scale = n, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_s, k_p, v_p, k_s, v_s, out, lse = ctx.saved_tensors
        n, scale = ctx.n, ctx.scale
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad_out = grad_out.contiguous()
        dq_1, dk_p, dv_p = backward(grad_out, q_s, k_p, v_p, out, lse, 0.0, False, scale=scale)

        def per_suffix(x):
            return x[0].unflatten(1, (n, -1)).transpose(0, 1).contiguous()

        def back(x):  # (n, h, C, D) -> (1, h, n*C, D)
            return x.transpose(0, 1).flatten(1, 2).unsqueeze(0)

        lse_b = lse[0].unflatten(1, (n, -1)).transpose(0, 1).contiguous()
        dq_2, dk_s, dv_s = backward(
            per_suffix(grad_out), per_suffix(q_s), per_suffix(k_s), per_suffix(v_s), per_suffix(out), lse_b,
            0.0, True, scale=scale,
        )
        return dq_1 + back(dq_2), dk_p, dv_p, back(dk_s), back(dv_s), None, None


def lse_merge_attention(query, key, value, layout, scale):
    """Prototype split attention: prefix causal + `_MergedSuffixAttention` per group (equal suffix lengths)."""
    flash_causal = torch.nn.functional.scaled_dot_product_attention
    pieces = []
    sizes = [prefix_len + sum(suffix_lens) for _, prefix_len, suffix_lens in layout.group_segments()]
    for (q, k, v), (_, prefix_len, suffix_lens) in zip(
        zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2)), layout.group_segments()
    ):
        if len(set(suffix_lens)) != 1 or prefix_len == 0:
            raise ValueError("the lse_merge prototype needs equal suffix lengths and a prefix")
        split = [prefix_len, q.size(2) - prefix_len]
        (q_p, q_s), (k_p, k_s), (v_p, v_s) = q.split(split, 2), k.split(split, 2), v.split(split, 2)
        pieces.append(flash_causal(q_p, k_p, v_p, is_causal=True, scale=scale, enable_gqa=True))
        pieces.append(_MergedSuffixAttention.apply(q_s, k_p, v_p, k_s, v_s, len(suffix_lens), scale))
    return torch.cat(pieces, dim=2).transpose(1, 2)  # (1, T, H, D)


def _timed(fn, reps: int) -> str:
    """Median wall and process-CPU milliseconds (CPU time is what to compare on a busy host, at one thread)."""
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return f"{statistics.median(cpus) * 1e3:8.1f} ms CPU {statistics.median(walls) * 1e3:8.1f} ms wall"


def _row_inputs(packed: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    """Random q, k, v `(1, h, T, D)` laid out token-major as a model's projections leave them, and a gradient."""
    generator = torch.Generator().manual_seed(seed)
    inputs = [
        torch.randn(1, packed, h, head_dim, generator=generator).transpose(1, 2).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    ]
    return inputs, torch.randn(1, packed, heads, head_dim, generator=generator)


def _split_step(module, batch, inputs, grad, loop: bool = False, batched_suffixes: bool | None = None):
    """
    `run() -> (out, input grads)`: one layer's split attention forward+backward on a layout whose plan is built
    once, under the forced choices (see `_forced`), and reused by every run, as the layers of one forward reuse it.
    """
    layout = build_group_layout(*batch)

    def run():
        for tensor in inputs:
            tensor.grad = None
        out, _ = pg_attention.split_attention(
            pg_attention.sdpa_sharing_kv_heads, False, module, *inputs, layout, scaling=module.scaling, dropout=0.0
        )
        out.backward(grad)
        return out.detach(), [tensor.grad.clone() for tensor in inputs]

    with _forced(loop, batched_suffixes):
        run()  # builds and caches the plan
    run.layout = layout
    return run


def _calls_of(layout) -> int:
    plan = next(value for key, value in layout._mask_cache.items() if key[0] == "split")
    if plan.bucketed is not None:
        return len(plan.bucketed.calls)
    return sum(1 + (prefix_len > 0) for prefix_len in layout.prefix_lens)


def calibrate(model, shape: str, reps: int) -> dict:
    """
    The cost model's constants (`prefix_grouper_trl/attention.py`), from the minimum CPU time of `reps` interleaved
    runs of each: two sets of equal groups through the per-group loop and bucketed (small groups, where the calls
    saved dominate; longer ones, where the bucketed path's gathers do), solved for the cost of a call and of a
    gathered token; and a large call's time per query-key pair, which expresses both in pairs.
    """
    module = model.model.layers[0].self_attn
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    width = heads * head_dim
    points = {"small": Point(64, 16, 2, num_groups=32), "long": Point(512, 32, 2, num_groups=32),
              "large": Point(1024, 64, 8)}
    runs = {}
    for name, point in points.items():
        batch = make_micro_batch(point, config.vocab_size)
        inputs, grad = _row_inputs(build_group_layout(*batch).packed_tokens, heads, kv_heads, head_dim)
        runs[name] = _split_step(module, batch, inputs, grad, loop=True)
        if name != "large":
            with _forced(bucketed=True):
                runs[name + " bucketed"] = _split_step(module, batch, inputs, grad)
    seconds = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.process_time()
            run()
            seconds[name].append(time.process_time() - start)
    best = {name: min(values) for name, values in seconds.items()}
    calls = {name: _calls_of(run.layout) for name, run in runs.items()}
    # loop - bucketed = calls saved x per call - tokens x per token, for both sets.
    rows = []
    for name in ("small", "long"):
        layout = runs[name].layout
        tokens = sum(layout.prefix_lens) + sum(sum(lens) for lens in layout.suffix_lens)
        rows.append((calls[name] - calls[name + " bucketed"], -tokens, best[name] - best[name + " bucketed"]))
    (a, b, e), (c, d, f) = rows
    determinant = a * d - b * c
    per_call, per_token = (e * d - b * f) / determinant, (a * f - e * c) / determinant
    large = runs["large"].layout
    per_pair = best["large"] / pg_attention.planned_attention_pairs(large.prefix_lens, large.suffix_lens, width)
    threads = torch.get_num_threads()
    return {
        "width": width, "threads": threads, "per_call_us": per_call * 1e6, "per_token_us": per_token * 1e6,
        "per_pair_ns": per_pair * 1e9,
        # The library's constants: pairs of width CALL_OVERHEAD_WIDTH on one thread (it scales the call's by the
        # threads and the width; a gathered token costs memory traffic proportional to the width, like a pair).
        "call_pairs": per_call / per_pair * width / pg_attention.CALL_OVERHEAD_WIDTH / threads,
        "token_pairs": per_token / per_pair,
        "calls": calls, "best_ms": {name: value * 1e3 for name, value in best.items()},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--num-groups", type=int, default=1)
    parser.add_argument("--shape", choices=sorted(MODEL_SHAPES), default="cpu-small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--calibrate", action="store_true", help="measure the cost model's per-call overhead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = build_model(args.shape)
    if args.calibrate:
        result = calibrate(model, args.shape, max(args.reps, 9))
        print(f"calls: {result['calls']}; minimum CPU ms: "
              + ", ".join(f"{name} {value:.1f}" for name, value in result["best_ms"].items()))
        print(f"width {result['width']}, {result['threads']} thread(s): per call {result['per_call_us']:.0f} us, per "
              f"gathered token {result['per_token_us']:.2f} us, per query-key pair {result['per_pair_ns']:.1f} ns")
        print(f"CALL_OVERHEAD_PAIRS = {result['call_pairs']:.0f} (the library's: {pg_attention.CALL_OVERHEAD_PAIRS}), "
              f"GATHER_PAIRS_PER_TOKEN = {result['token_pairs']:.1f} (the library's: "
              f"{pg_attention.GATHER_PAIRS_PER_TOKEN})")
        return
    point = Point(args.prompt_len, args.completion_len, args.group_size, args.num_groups)
    module = model.model.layers[0].self_attn
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    batch = make_micro_batch(point, config.vocab_size)
    packed = build_group_layout(*batch).packed_tokens
    inputs, grad = _row_inputs(packed, heads, kv_heads, head_dim)

    def lse_merge():
        for tensor in inputs:
            tensor.grad = None
        out = lse_merge_attention(*inputs, build_group_layout(*batch), module.scaling)
        out.backward(grad)
        return out.detach(), [tensor.grad.clone() for tensor in inputs]

    rows, width = point.rows, point.prompt_len + point.completion_len
    repeated_inputs = [torch.randn(rows, h, width, head_dim, requires_grad=True) for h in (heads, kv_heads, kv_heads)]

    def repeated():
        out = torch.nn.functional.scaled_dot_product_attention(*repeated_inputs, is_causal=True, enable_gqa=True)
        out.sum().backward()

    prefix_len = point.prompt_len - 1
    prefix_inputs = [torch.randn(point.num_groups, h, prefix_len, head_dim, requires_grad=True)
                     for h in (heads, kv_heads, kv_heads)]

    def prefix_only():
        out = torch.nn.functional.scaled_dot_product_attention(*prefix_inputs, is_causal=True, enable_gqa=True)
        out.sum().backward()

    variants = {
        "shipped": _split_step(module, batch, inputs, grad),
        "loop": _split_step(module, batch, inputs, grad, loop=True),
        "rectangle": _split_step(module, batch, inputs, grad, loop=True, batched_suffixes=False),
    }
    try:
        lse_merge()
        variants["lse_merge"] = lse_merge
    except ValueError as error:
        print(f"lse_merge skipped: {error}")
    expected_out, expected_grads = variants["shipped"]()
    print(f"{point.label()}, packed T={packed}, one layer ({heads} heads / {kv_heads} kv, head dim {head_dim}), "
          f"fwd+bwd, {args.threads} thread(s), median of {args.reps}; shipped makes "
          f"{_calls_of(variants['shipped'].layout)} calls, the loop {_calls_of(variants['loop'].layout)}")
    for name, fn in variants.items():
        out, grads = fn()
        worst = max([(out - expected_out).abs().max().item()]
                    + [(g - e).abs().max().item() for g, e in zip(grads, expected_grads)])
        print(f"  {name:10s} {_timed(fn, args.reps)}   max |diff| to shipped {worst:.1e}")
    print(f"  {'prefix':10s} {_timed(prefix_only, args.reps)}   (the prefix causal calls alone: the floor of every "
          f"grouped variant)")
    print(f"  {'repeated':10s} {_timed(repeated, args.reps)}   (GRPOTrainer's {rows} rows x {width})")


if __name__ == "__main__":
    main()
