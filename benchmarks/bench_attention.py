"""
One attention layer, forward+backward, on the packed row of one point: the shipped split attention and variants,
to see where the attention time goes and what a change would buy (seconds per run, not minutes).

    python -m benchmarks.bench_attention                                   # P=2048 C=128 G=8, cpu-small's heads
    python -m benchmarks.bench_attention --prompt-len 512 --completion-len 256 --group-size 16

Variants (all on the same random q/k/v of the packed row, (1, H, T, D) / (1, H_kv, T, D)):

    shipped      prefix_grouper_trl.attention.split_attention with transformers' sdpa, as the trainer runs it
    rectangle    the same, every group's suffixes as one S x (P-1+S) block-mask call
    batched      the same, every group's suffixes batched per suffix, [prefix | own] keys, mask (n, 1, C, P-1+C)
    lse_merge    prototype (not in the library): suffix queries x prefix keys as one dense call (no mask, native GQA)
                 plus each suffix x its own keys as one batched causal call, merged by log-sum-exp; backward by
                 calling the flash backward of each piece with the merged output and log-sum-exp (exact)
    prefix       the prefix causal calls alone (the floor of every grouped variant)
    repeated     what GRPOTrainer's forward pays: G rows of P+C tokens, causal, native GQA (for scale)

Outputs and input gradients of every grouped variant are checked against `shipped`.
"""

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from prefix_grouper_trl import attention as pg_attention
from prefix_grouper_trl.layout import build_group_layout

from .common import MODEL_SHAPES, Point, build_model, make_micro_batch


@contextmanager
def _suffix_rule(batched: bool | None):
    """Force the library's choice between the block-mask call and the batched suffixes (None: its own rule)."""
    original = pg_attention._batching_pays
    if batched is not None:
        def forced(prefix_len, suffix_lens):
            return batched and len(suffix_lens) > 1 and prefix_len > 0

        pg_attention._batching_pays = forced
    try:
        yield
    finally:
        pg_attention._batching_pays = original


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--num-groups", type=int, default=1)
    parser.add_argument("--shape", choices=sorted(MODEL_SHAPES), default="cpu-small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    point = Point(args.prompt_len, args.completion_len, args.group_size, args.num_groups)
    model = build_model(args.shape)
    module = model.model.layers[0].self_attn
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    batch = make_micro_batch(point, config.vocab_size)
    packed = build_group_layout(*batch).packed_tokens
    generator = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(1, h, packed, head_dim, generator=generator).requires_grad_() for h in (heads, kv_heads, kv_heads)
    ]
    grad = torch.randn(1, packed, heads, head_dim, generator=generator)

    def grouped(rule):
        def run():
            for tensor in inputs:
                tensor.grad = None
            layout = build_group_layout(*batch)  # fresh plan cache, so the forced rule applies
            with _suffix_rule(rule):
                out, _ = pg_attention.split_attention(
                    sdpa_attention_forward, False, module, *inputs, layout, scaling=module.scaling, dropout=0.0
                )
            out.backward(grad)
            return out.detach(), [tensor.grad.clone() for tensor in inputs]

        return run

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

    variants = {"shipped": grouped(None), "rectangle": grouped(False), "batched": grouped(True)}
    try:
        lse_merge()
        variants["lse_merge"] = lse_merge
    except ValueError as error:
        print(f"lse_merge skipped: {error}")
    expected_out, expected_grads = variants["shipped"]()
    print(f"{point.label()}, packed T={packed}, one layer ({heads} heads / {kv_heads} kv, head dim {head_dim}), "
          f"fwd+bwd, {args.threads} thread(s), median of {args.reps}")
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
