"""
Log-prob forward+backward: GRPOTrainer vs PrefixGroupedGRPOTrainer vs the paper's reference, over a grid.

    python -m benchmarks.bench_logprob              # the whole grid + targets (CPU, hours on 2 cores, see README)
    python -m benchmarks.bench_logprob --quick      # 4 one-group points, 2 multi-group points + the targets
    python -m benchmarks.bench_logprob --targets    # only the target point, the small-groups point, the mask check
    python -m benchmarks.bench_logprob --device cuda   # Qwen2.5-1.5B-shaped model, bf16 (not run on CPU hosts)

The grid: one group per micro-batch (P x C x G), and several groups per micro-batch (groups x P x C x G). Every point
runs in a fresh process (see `common.run_point_case`); results are appended to `benchmarks/results/logprob.csv` and
the run's tables and plots are written to `benchmarks/results/`. The README explains the FLOP model, the memory
probe, the chunks of micro-batches too large for the host, and the targets printed at the end.
"""

import argparse
import contextlib
import csv
import dataclasses
import functools
import itertools
import os
import statistics
import sys
import time

import torch

from .common import (
    MODEL_SHAPES,
    PATHS,
    RESULTS_DIR,
    IsolatedRunner,
    Point,
    PointCase,
    append_csv,
    environment,
    flop_counts,
    markdown_table,
    package_code_note,
    plan_chunks,
    run_memory_case,
    run_point_case,
    split_lengths,
)

GRID_PROMPT_LENS = (512, 1024, 2048, 4096)
GRID_COMPLETION_LENS = (64, 256)
GRID_GROUP_SIZES = (2, 4, 8, 16)
# Several groups per micro-batch (issue 13): groups x P x C x G.
MULTI_GROUP_COUNTS = (4, 16, 64)
MULTI_PROMPT_LENS = (128, 512)
MULTI_COMPLETION_LENS = (32, 128)
MULTI_GROUP_SIZES = (2, 4, 8)
TARGET_POINT = Point(2048, 128, 8)
# Many small groups in one micro-batch, and one group with the same packed token count (63 x 64 = 4000 + 32).
SMALL_GROUPS_POINT = Point(32, 16, 2, num_groups=64)
ONE_GROUP_SAME_TOKENS_POINT = Point(4001, 16, 2, num_groups=1)
QUICK_POINTS = (Point(512, 64, 4), Point(512, 256, 16), Point(2048, 64, 8), Point(4096, 64, 2),
                Point(128, 32, 4, num_groups=16), Point(512, 32, 8, num_groups=4))
# `--max-trl-tflop 1.2` leaves out the 6 one-group points whose repeated forward costs more than 1.2 TFLOP (G=16 at
# P=2048, G>=8 at P=4096): 1-2 min per GRPOTrainer step on one core. It never leaves out a multi-group point.

TARGET_SPEEDUP_OF_FLOP_RATIO = 0.9
TARGET_MEMORY_RATIO = 0.5
TARGET_VS_REFERENCE = 1.15
# `grouped` and `grouped_loop` run the same code at one group (tests/test_attention.py checks that one group takes
# the per-group loop); two interleaved medians of the same code differ by up to ~10% at a point on this host. "No
# slower": the median over the one-group points of ours / loop at most ONE_GROUP_MEDIAN (a slowdown of the code would
# move every point); points above ONE_GROUP_NOISE are listed.
ONE_GROUP_MEDIAN = 1.02
ONE_GROUP_NOISE = 1.10
# The previous run of the whole grid (one group per point), committed in results/logprob.csv.
PREVIOUS_RUN_ID = "2026-12-02T15:33:49"


def grid_points(args) -> list[Point]:
    points = [
        Point(p, c, g) for p, c, g in itertools.product(args.prompt_lens, args.completion_lens, args.group_sizes)
    ]
    if args.max_trl_tflop is not None:
        kept = [p for p in points if flop_counts(p, args.shape)["trl"].flops <= args.max_trl_tflop * 1e12]
        skipped = [p for p in points if p not in kept]
        if skipped:
            print(f"bounded sweep: skipping {len(skipped)} one-group points above {args.max_trl_tflop} TFLOP for "
                  f"GRPOTrainer ({', '.join(p.label() for p in skipped)})")
        points = kept
    points += [
        Point(p, c, g, num_groups=n)
        for n, p, c, g in itertools.product(args.group_counts, args.multi_prompt_lens, args.multi_completion_lens,
                                            args.multi_group_sizes)
    ]
    return points


def attention_calls_per_layer(point: Point, shape: str, loop: bool = False, threads: int = 1) -> int:
    """Attention calls per layer of the CPU split attention at this point (its own plan, or the per-group loop)."""
    from prefix_grouper_trl import attention

    prefix_lens, suffix_lens, width = split_lengths(point, shape)
    buckets = None if loop else attention.plan_buckets(prefix_lens, suffix_lens, width, threads)
    if buckets is None:
        return sum(1 + (length > 0) for length in prefix_lens)
    return len(buckets[0]) + len(buckets[1])


def summarize(point: Point, raw: dict, args, env: dict, run_id: str, chunks: dict | None = None) -> list[dict]:
    """One CSV row per path, with ratios against the `trl` path of the same point."""
    chunks = chunks or {}
    counts = flop_counts(point, args.shape, fused_head_scores_all=args.device == "cpu", chunks=chunks)
    paths = raw["paths"]
    trl = paths.get("trl")
    rows = []
    for path, measured in paths.items():
        wall, cpu = statistics.median(measured["wall_s"]), statistics.median(measured["cpu_s"])
        row = {
            "run_id": run_id,
            **env,
            "device": args.device,
            "shape": args.shape,
            "threads": raw["threads"],
            "prompt_len": point.prompt_len,
            "completion_len": point.completion_len,
            "group_size": point.group_size,
            "num_groups": point.num_groups,
            "path": path,
            "median_s": round(wall, 4),
            "min_s": round(min(measured["wall_s"]), 4),
            "cpu_median_s": round(cpu, 4),
            "reps": len(measured["wall_s"]),
            "first_step_s": round(measured["first_step_s"], 4),
            "peak_mib": round(measured["peak_mib"], 1),
            "gflop": round(counts[path].flops / 1e9, 2),
            "linear_tokens": counts[path].linear_tokens,
            "attention_pairs": counts[path].attention_pairs,
            "head_positions": counts[path].head_positions,
            "max_abs_logp_diff_vs_trl": f"{measured['max_abs_logp_diff']:.2e}",
            "load_avg_start": raw["load_avg"][0],
            "load_avg_end": raw["load_avg"][1],
            "chunks": chunks.get(path, 1),
            "attention_calls_per_layer": (attention_calls_per_layer(point, args.shape, path == "grouped_loop",
                                                                    raw["threads"])
                                          if path.startswith("grouped") and args.device == "cpu" else ""),
        }
        if trl is not None:
            trl_wall, trl_cpu = statistics.median(trl["wall_s"]), statistics.median(trl["cpu_s"])
            same_chunks = chunks.get(path, 1) == chunks.get("trl", 1)
            row.update(
                flop_ratio_vs_trl=round(counts["trl"].flops / counts[path].flops, 3),
                speedup_vs_trl=round(trl_wall / wall, 3),
                cpu_speedup_vs_trl=round(trl_cpu / cpu, 3),
                # Peaks of steps in different chunks are not comparable.
                memory_ratio_vs_trl=(round(measured["peak_mib"] / max(trl["peak_mib"], 1e-9), 3)
                                     if same_chunks and measured["peak_mib"] == measured["peak_mib"] else ""),
            )
        rows.append(row)
    return rows


def measure(points: list[Point], args, env: dict, run_id: str, runner: IsolatedRunner) -> dict[Point, dict]:
    by_point = {}
    for index, point in enumerate(points, 1):
        start = time.perf_counter()
        chunks = plan_chunks(point, args.paths, args.memory_budget_gib, args.shape) if args.device == "cpu" else ()
        case = PointCase(point, tuple(args.paths), args.shape, args.device, args.threads, args.rounds,
                         slow_rounds=args.slow_rounds, chunks=chunks)
        try:
            raw = runner.run(run_point_case, case)
            for path in args.paths[1:]:  # the first path's memory was measured in the timing process
                if path == "grouped_loop" or args.no_memory_probes:  # `grouped_loop`: the same trainer as `grouped`
                    raw["paths"][path]["peak_mib"] = float("nan")
                    continue
                alone = runner.run(run_memory_case, dataclasses.replace(case, paths=(path,)))
                raw["paths"][path]["peak_mib"] = alone["peak_mib"]
        except Exception as error:  # e.g. out of memory (CUDA raises, a CPU worker gets killed): keep sweeping
            print(f"[{index}/{len(points)}] {point.label()}: FAILED ({type(error).__name__}: {error})", flush=True)
            continue
        rows = summarize(point, raw, args, env, run_id, dict(chunks))
        append_csv(args.csv, rows)
        by_point[point] = {row["path"]: row for row in rows}
        parts = []
        for row in rows:
            part = f"{row['path']} {row['median_s']:.2f}s {row['peak_mib']:.0f}MiB"
            if row["chunks"] > 1:
                part += f" ({row['chunks']} chunks)"
            if row["path"] != "trl" and "speedup_vs_trl" in row:
                part += f" (x{row['speedup_vs_trl']:.2f}, flop x{row['flop_ratio_vs_trl']:.2f})"
            parts.append(part)
        print(f"[{index}/{len(points)}] {point.label()}: " + " | ".join(parts)
              + f"  [{time.perf_counter() - start:.0f}s, load {raw['load_avg'][0]:.1f}]", flush=True)
    return by_point


# ---------------------------------------------------------------------------------------------------------------------
# Dense-mask check


def largest_trailing_blocks(point: Point, shape: str) -> dict:
    """
    Run one grouped step under a dispatch mode that sees every tensor the ops produce (forward and backward), and
    report the packed length T, every tensor that looks like a dense mask or score matrix over the packed row (trailing
    dims exactly (T, T), or a boolean tensor with both trailing dims >= T), and the largest boolean mask seen.
    """
    import tempfile

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from .common import prepare

    with tempfile.TemporaryDirectory() as output_dir:
        setup = prepare("grouped", point, shape, "cpu", output_dir)
        packed = point.num_groups * (point.prompt_len - 1 + point.group_size * point.completion_len)

        class Recorder(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.dense, self.largest_mask = [], (0, None)

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in tree_leaves(out):
                    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
                        continue
                    rows, cols = tensor.shape[-2], tensor.shape[-1]
                    is_mask = tensor.dtype == torch.bool
                    if (rows == packed and cols == packed) or (is_mask and rows >= packed and cols >= packed):
                        self.dense.append((str(func), tuple(tensor.shape)))
                    if is_mask and rows * cols > self.largest_mask[0]:
                        self.largest_mask = (rows * cols, (str(func), tuple(tensor.shape)))
                return out

        recorder = Recorder()
        with recorder:
            setup.step()
    return {"packed_tokens": packed, "dense": recorder.dense, "largest_mask": recorder.largest_mask[1]}


def attention_loop_overhead(point: Point, shape: str, reps: int = 7) -> dict:
    """
    What the split attention's calls cost at many small groups: forward+backward of one layer's `split_attention`
    over the point's packed row held to the per-group loop (two SDPA calls per group), as shipped (groups sharing
    calls where the cost model says so), and one batched SDPA call over all groups at once with the group's (t x t)
    mask, t = tokens per group (possible here because every group has the same shape). Timed interleaved; the
    loop's excess over the shipped calls, per group, is the per-group overhead the shared calls remove.
    """
    from prefix_grouper_trl.attention import sdpa_sharing_kv_heads, split_attention, suffix_block_mask
    from prefix_grouper_trl.layout import build_group_layout

    from .bench_attention import _calls_of
    from .common import build_model, make_micro_batch, per_group_attention_loop

    model = build_model(shape)
    module = model.model.layers[0].self_attn
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    batch = make_micro_batch(point, config.vocab_size)
    layout = build_group_layout(*batch)
    groups, packed = layout.num_groups, layout.packed_tokens
    per_group = packed // groups
    prefix_len, suffix_lens = layout.prefix_lens[0], layout.suffix_lens[0]
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, packed, heads, head_dim, generator=generator).transpose(1, 2).requires_grad_()
    key = torch.randn(1, packed, kv_heads, head_dim, generator=generator).transpose(1, 2).requires_grad_()
    value = torch.randn(1, packed, kv_heads, head_dim, generator=generator).transpose(1, 2).requires_grad_()
    grad = torch.randn(1, packed, heads, head_dim, generator=generator)
    group_mask = torch.zeros(per_group, per_group, dtype=torch.bool)
    group_mask[:prefix_len, :prefix_len] = torch.ones(prefix_len, prefix_len, dtype=torch.bool).tril()
    group_mask[prefix_len:] = suffix_block_mask(prefix_len, suffix_lens, torch.device("cpu"))[0, 0]

    def by_group(x):  # (1, h, G*t, d) -> (G, h, t, d)
        heads_of_x = x.size(1)
        grouped = x.reshape(1, heads_of_x, groups, per_group, head_dim).permute(0, 2, 1, 3, 4)
        return grouped.reshape(groups, heads_of_x, per_group, head_dim)

    def split(step_layout):
        def run():
            out, _ = split_attention(sdpa_sharing_kv_heads, False, module, query, key, value, step_layout,
                                     scaling=module.scaling, dropout=0.0)
            out.backward(grad)

        return run

    def batched():
        out, _ = sdpa_sharing_kv_heads(module, by_group(query), by_group(key), by_group(value),
                                       group_mask[None, None], is_causal=False, scaling=module.scaling, dropout=0.0)
        out.reshape(1, packed, heads, head_dim).backward(grad)

    loop_layout, shipped_layout = build_group_layout(*batch), build_group_layout(*batch)
    with per_group_attention_loop():
        split(loop_layout)()  # the plan is built, and cached, under the loop's rule
    steps = {"loop": split(loop_layout), "shipped": split(shipped_layout), "batched": batched}
    samples = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
    timings = {name: statistics.median(values) for name, values in samples.items()}
    return {"groups": groups, "loop_s": timings["loop"], "shipped_s": timings["shipped"],
            "batched_s": timings["batched"], "per_group_s": (timings["loop"] - timings["shipped"]) / groups,
            "loop_calls": _calls_of(loop_layout), "shipped_calls": _calls_of(shipped_layout),
            "layers": config.num_hidden_layers}


def head_ablation(point: Point, shape: str, threads: int = 1, rounds: int = 3) -> dict:
    """
    How much of the grouped path's speedup on a CPU comes from its log-prob head (`prefix_grouper_trl/head.py`) rather
    than from sharing the prompt: one process, interleaved rounds of GRPOTrainer, the grouped path with TRL's own
    fused head (the trainer's head swap turned off), and the grouped path as shipped. Median wall seconds of each.
    """
    import tempfile

    import prefix_grouper_trl.trainer as trainer_module

    from .common import PointCase, _start_worker, prepare

    _start_worker(PointCase(point, threads=threads))  # threads and malloc settings as for every measured point
    shipped_swap = trainer_module._cpu_head_in_trl

    def with_trls_head(step):
        def run():
            trainer_module._cpu_head_in_trl = contextlib.nullcontext
            try:
                return step()
            finally:
                trainer_module._cpu_head_in_trl = shipped_swap

        return run

    with tempfile.TemporaryDirectory() as output_dir:
        trl = prepare("trl", point, shape, "cpu", output_dir)
        grouped = prepare("grouped", point, shape, "cpu", output_dir)
        steps = {"trl": trl.step, "grouped_trl_head": with_trls_head(grouped.step), "grouped": grouped.step}
        samples = {name: [] for name in steps}
        for step in steps.values():
            step()  # warmup
        for _ in range(rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Report


def _median(rows: dict, path: str, key: str = "median_s"):
    value = rows[path].get(key, "") if path in rows else ""
    return float("nan") if value == "" else value


def _ratio(rows: dict, slower: str, faster: str) -> float:
    return _median(rows, slower) / _median(rows, faster)


def _seconds(rows: dict, path: str) -> str:
    chunks = rows.get(path, {}).get("chunks", 1) or 1
    return f"{_median(rows, path):.2f}" + (f" ({chunks:.0f} ch.)" if chunks > 1 else "")


def write_table(by_point: dict, path: str, header: str) -> str:
    """The run's tables: one group per micro-batch, then several groups per micro-batch."""
    def order(item):
        point = item[0]
        return point.num_groups, point.completion_len, point.group_size, point.prompt_len

    headers = [
        "P", "C", "G", "FLOP ratio", "speedup vs TRL", "(CPU time)", "memory vs TRL",
        "TRL s", "ours s", "ref s", "ours vs ref", "ours vs loop", "TRL MiB", "ours MiB", "ref MiB",
    ]
    table_rows = []
    for point, rows in sorted(by_point.items(), key=order):
        if point.num_groups != 1:
            continue
        ours = rows.get("grouped", {})
        table_rows.append([
            point.prompt_len, point.completion_len, point.group_size,
            f"{_median(rows, 'grouped', 'flop_ratio_vs_trl'):.2f}",
            f"{_median(rows, 'grouped', 'speedup_vs_trl'):.2f}",
            f"{_median(rows, 'grouped', 'cpu_speedup_vs_trl'):.2f}",
            f"{_median(rows, 'grouped', 'memory_ratio_vs_trl'):.2f}",
            _seconds(rows, "trl"), _seconds(rows, "grouped"), _seconds(rows, "reference"),
            f"{_ratio(rows, 'reference', 'grouped'):.2f}", f"{_ratio(rows, 'grouped_loop', 'grouped'):.2f}",
            f"{_median(rows, 'trl', 'peak_mib'):.0f}", f"{_median(rows, 'grouped', 'peak_mib'):.0f}",
            f"{_median(rows, 'reference', 'peak_mib'):.0f}",
        ])
    text = header + "\n\n**One group per micro-batch**\n\n" + markdown_table(headers, table_rows) + "\n"

    headers = [
        "groups", "P", "C", "G", "FLOP ratio", "speedup vs TRL", "TRL s", "ours s", "loop s", "ref s", "ours vs ref",
        "ours vs loop", "calls/layer (loop)", "ours MiB", "ref MiB",
    ]
    table_rows = []
    for point, rows in sorted(by_point.items(), key=order):
        if point.num_groups == 1 or point in (SMALL_GROUPS_POINT,):
            continue
        ours = rows.get("grouped", {})
        loop_calls = rows.get("grouped_loop", {}).get("attention_calls_per_layer", "")
        table_rows.append([
            point.num_groups, point.prompt_len, point.completion_len, point.group_size,
            f"{_median(rows, 'grouped', 'flop_ratio_vs_trl'):.2f}",
            f"{_median(rows, 'grouped', 'speedup_vs_trl'):.2f}",
            _seconds(rows, "trl"), _seconds(rows, "grouped"), _seconds(rows, "grouped_loop"),
            _seconds(rows, "reference"),
            f"{_ratio(rows, 'reference', 'grouped'):.2f}", f"{_ratio(rows, 'grouped_loop', 'grouped'):.2f}",
            f"{ours.get('attention_calls_per_layer', '')}" + (f" ({loop_calls})" if loop_calls != "" else ""),
            f"{_median(rows, 'grouped', 'peak_mib'):.0f}", f"{_median(rows, 'reference', 'peak_mib'):.0f}",
        ])
    if table_rows:
        text += ("\n**Several groups per micro-batch** ('loop': our trainer with the split attention held to its "
                 "per-group loop; 'ch.': run in that many chunks of whole groups, see the README)\n\n"
                 + markdown_table(headers, table_rows) + "\n")
    with open(path, "w") as out:
        out.write(text)
    return text


def write_plots(by_point: dict, out_dir: str, title: str) -> list[str]:
    """One PNG per quantity, one panel per completion length, x = prompt length, one curve per group size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = {p: r for p, r in by_point.items() if p.num_groups == 1 and {"trl", "grouped"} <= r.keys()}
    if not single:  # a run (so far) of multi-group points only: the plots are of the one-group grid
        return []
    # A panel per completion length that has a curve (the lone target points are in the table, not plotted).
    prompt_lens_of: dict = {}
    for p in single:
        prompt_lens_of.setdefault(p.completion_len, set()).add(p.prompt_len)
    completion_lens = sorted(c for c, prompt_lens in prompt_lens_of.items() if len(prompt_lens) > 1)
    completion_lens = completion_lens or sorted({p.completion_len for p in single})
    group_sizes = sorted({p.group_size for p in single})

    def ours(key):
        return lambda rows: rows["grouped"].get(key)

    def versus_reference(rows):
        return rows["reference"]["median_s"] / rows["grouped"]["median_s"] if "reference" in rows else None

    figures = [
        ("speedup_vs_prompt.png", ours("speedup_vs_trl"), ours("flop_ratio_vs_trl"),
         "speedup over GRPOTrainer (wall)", "dashed: FLOP ratio", None),
        ("memory_vs_prompt.png", ours("memory_ratio_vs_trl"), None,
         "peak memory / GRPOTrainer's", f"dotted: target {TARGET_MEMORY_RATIO}", TARGET_MEMORY_RATIO),
        ("vs_reference_vs_prompt.png", versus_reference, None,
         "reference time / ours (>1: ours faster)", "dotted: parity", 1.0),
    ]
    written = []
    for filename, value, dashed, ylabel, note, hline in figures:
        fig, axes = plt.subplots(1, len(completion_lens), figsize=(5.5 * len(completion_lens), 4.2), squeeze=False)
        for axis, completion_len in zip(axes[0], completion_lens):
            for color, group_size in zip(plt.cm.viridis([0.0, 0.3, 0.6, 0.85, 0.95]), group_sizes):
                pts = sorted((p for p in single if p.completion_len == completion_len and p.group_size == group_size
                              and value(single[p]) is not None), key=lambda p: p.prompt_len)
                if not pts:
                    continue
                xs = [p.prompt_len for p in pts]
                axis.plot(xs, [value(single[p]) for p in pts], "o-", color=color, label=f"G={group_size}")
                if dashed:
                    axis.plot(xs, [dashed(single[p]) for p in pts], "x--", color=color, alpha=0.6)
            if hline is not None:
                axis.axhline(hline, color="gray", lw=0.8, ls=":")
            axis.set_xscale("log", base=2)
            axis.set_xlabel("prompt length (tokens)")
            axis.set_ylabel(ylabel)
            axis.set_title(f"completion {completion_len} ({note})")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        target = os.path.join(out_dir, filename)
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written


def _points(ratios: dict, worst: int = 3) -> str:
    ordered = sorted(ratios.items(), key=lambda item: item[1])
    return ", ".join(f"{point.label()} ({ratio:.2f})" for point, ratio in ordered[:worst])


def check_targets(by_point: dict, mask_check: dict | None, loop_check: dict | None = None,
                  head_check: dict | None = None, previous: dict | None = None) -> list:
    """(name, passed or None for report-only, detail) for each target (issues 4 and 13)."""
    results = []
    with_trl = {p: r for p, r in by_point.items() if {"trl", "grouped"} <= r.keys()}
    if with_trl:
        of_flops = {p: r["grouped"]["speedup_vs_trl"] / r["grouped"]["flop_ratio_vs_trl"] for p, r in with_trl.items()}
        short = {p: ratio for p, ratio in of_flops.items() if ratio < TARGET_SPEEDUP_OF_FLOP_RATIO}
        speedups = [r["grouped"]["speedup_vs_trl"] for r in with_trl.values()]
        detail = (f"{len(of_flops) - len(short)}/{len(of_flops)} points; speedup / FLOP ratio from "
                  f"{min(of_flops.values()):.2f} (at {_points(of_flops, 1)}) to {max(of_flops.values()):.2f}; "
                  f"speedups {min(speedups):.2f} to {max(speedups):.2f}")
        target = by_point.get(TARGET_POINT)
        if target and TARGET_POINT in with_trl:
            ours = target["grouped"]
            detail += (f"; at {TARGET_POINT.label()}: speedup {ours['speedup_vs_trl']:.2f} (CPU time "
                       f"{ours['cpu_speedup_vs_trl']:.2f}) vs FLOP ratio {ours['flop_ratio_vs_trl']:.2f}")
        if short:
            detail += f"; below at: {_points(short, len(short))}"
        results.append((f"speedup over GRPOTrainer >= {TARGET_SPEEDUP_OF_FLOP_RATIO} x FLOP ratio at every point",
                        not short, detail))
    target = by_point.get(TARGET_POINT)
    if target and {"trl", "grouped"} <= target.keys() and target["grouped"].get("memory_ratio_vs_trl") != "":
        ours = target["grouped"]
        results.append((
            f"peak memory at {TARGET_POINT.label()} <= {TARGET_MEMORY_RATIO} x GRPOTrainer's",
            ours["memory_ratio_vs_trl"] <= TARGET_MEMORY_RATIO,
            f"{ours['peak_mib']:.0f} MiB vs {target['trl']['peak_mib']:.0f} MiB = {ours['memory_ratio_vs_trl']:.2f}",
        ))
    with_reference = {p: r for p, r in by_point.items() if {"grouped", "reference"} <= r.keys()}
    if with_reference:
        ratios = {p: r["reference"]["median_s"] / r["grouped"]["median_s"] for p, r in with_reference.items()}
        short = {p: ratio for p, ratio in ratios.items() if ratio < TARGET_VS_REFERENCE}
        parts = []
        for name, keep in (("one group", lambda p: p.num_groups == 1), ("several groups", lambda p: p.num_groups > 1)):
            subset = {p: ratio for p, ratio in ratios.items() if keep(p)}
            if subset:
                parts.append(f"{name}: {min(subset.values()):.2f} to {max(subset.values()):.2f} (lowest at "
                             f"{_points(subset, 1)})")
        detail = (f"{len(ratios) - len(short)}/{len(ratios)} points at >= {TARGET_VS_REFERENCE}x; reference / ours, "
                  + "; ".join(parts))
        if short:
            detail += f"; below at: {_points(short, len(short))}"
        results.append((f"at least {TARGET_VS_REFERENCE}x as fast as the reference implementation at every point",
                        not short, detail))
    one_group = {p: r for p, r in by_point.items()
                 if p.num_groups == 1 and {"grouped", "grouped_loop"} <= r.keys()}
    if one_group:
        ratios = {p: r["grouped"]["median_s"] / r["grouped_loop"]["median_s"] for p, r in one_group.items()}
        slower = {p: ratio for p, ratio in ratios.items() if ratio > ONE_GROUP_NOISE}
        median = statistics.median(ratios.values())
        detail = (f"ours / the per-group loop (the code before this change, timed in the same rounds) over "
                  f"{len(ratios)} one-group points: median {median:.3f} (allowed <= {ONE_GROUP_MEDIAN}), from "
                  f"{min(ratios.values()):.3f} to {max(ratios.values()):.3f}; at one group both run the same code, "
                  f"so the spread is the noise of two interleaved medians")
        if slower:
            detail += (f"; above {ONE_GROUP_NOISE} at: "
                       + ", ".join(f"{p.label()} ({ratio:.2f})" for p, ratio in sorted(slower.items(), key=str)))
        results.append(("one-group points no slower than before (same run)", median <= ONE_GROUP_MEDIAN, detail))
    if previous and one_group:
        ratios = {p: by_point[p]["grouped"]["median_s"] / previous[p]["grouped"]["median_s"]
                  for p in one_group if "grouped" in previous.get(p, {})}
        if ratios:
            results.append((
                f"one-group points against the committed run {PREVIOUS_RUN_ID} (report only: another day's load)",
                None,
                f"ours now / ours then from {min(ratios.values()):.2f} to {max(ratios.values()):.2f}, median "
                f"{statistics.median(ratios.values()):.2f}, over {len(ratios)} points",
            ))

    def shares_calls(rows):
        calls = [rows[path].get("attention_calls_per_layer") for path in ("grouped", "grouped_loop")]
        return calls[0] != calls[1]

    bucketed = {p: r for p, r in by_point.items()
                if p.num_groups > 1 and {"grouped", "grouped_loop"} <= r.keys() and shares_calls(r)}
    if bucketed:
        ratios = {p: r["grouped_loop"]["median_s"] / r["grouped"]["median_s"] for p, r in bucketed.items()}
        results.append((
            "several groups: groups sharing attention calls vs the per-group loop (report only)",
            None,
            f"at the {len(ratios)} multi-group points where the cost model shares calls, loop / ours from "
            f"{min(ratios.values()):.2f} to {max(ratios.values()):.2f}, median "
            f"{statistics.median(ratios.values()):.2f}; elsewhere it keeps the loop",
        ))
    if mask_check is not None:
        # One check per point: the target point (one group, the per-group loop) and, where run, the small-groups
        # point (64 groups sharing calls).
        checks = mask_check if isinstance(mask_check, list) else [mask_check]
        results.append((
            "no dense T x T mask (or score matrix) on the hot path",
            not any(check["dense"] for check in checks),
            "; ".join(
                f"{check.get('label', TARGET_POINT.label())}: T={check['packed_tokens']}, tensors with both trailing "
                f"dims >= T: {check['dense'] or 'none'}, largest boolean mask: {check['largest_mask']}"
                for check in checks
            ),
        ))
    small, one = by_point.get(SMALL_GROUPS_POINT), by_point.get(ONE_GROUP_SAME_TOKENS_POINT)
    if small and {"trl", "grouped"} <= small.keys():
        ours = small["grouped"]
        detail = (f"ours {ours['median_s']:.2f}s vs GRPOTrainer {small['trl']['median_s']:.2f}s (speedup "
                  f"{ours['speedup_vs_trl']:.2f}, FLOP ratio {ours['flop_ratio_vs_trl']:.2f}, speedup / FLOP ratio "
                  f"{ours['speedup_vs_trl'] / ours['flop_ratio_vs_trl']:.2f})")
        if one and "grouped" in one:
            detail += (f"; one group of the same {ours['linear_tokens']} packed tokens "
                       f"({ONE_GROUP_SAME_TOKENS_POINT.label()}): {one['grouped']['median_s']:.2f}s, but it has "
                       f"{one['grouped']['attention_pairs'] / max(ours['attention_pairs'], 1):.0f}x the attention "
                       f"pairs, so the difference does not isolate the per-group cost (see the loop measurement)")
        results.append((f"many small groups ({SMALL_GROUPS_POINT.label()}): not slower than GRPOTrainer",
                        ours["median_s"] <= small["trl"]["median_s"], detail))
        if loop_check is not None:
            results.append((
                "the split attention's per-call cost at many small groups (report only)",
                None,
                f"one layer fwd+bwd over {loop_check['groups']} groups: per-group loop "
                f"{loop_check['loop_s'] * 1e3:.1f} ms ({loop_check['loop_calls']} calls), as shipped "
                f"{loop_check['shipped_s'] * 1e3:.1f} ms ({loop_check['shipped_calls']} calls), one SDPA call with a "
                f"(t x t) mask per group {loop_check['batched_s'] * 1e3:.1f} ms -> the loop costs "
                f"{loop_check['per_group_s'] * 1e6:.0f} us per group per layer over the shipped calls",
            ))
    if head_check is not None:
        sharing_only = head_check["trl"] / head_check["grouped_trl_head"]
        results.append((
            f"share of the speedup at {TARGET_POINT.label()} that is the CPU log-prob head (report only)",
            None,
            f"GRPOTrainer {head_check['trl']:.2f}s; "
            f"grouped with TRL's fused head {head_check['grouped_trl_head']:.2f}s "
            f"(x{sharing_only:.2f}: sharing alone); grouped as shipped {head_check['grouped']:.2f}s "
            f"(x{head_check['trl'] / head_check['grouped']:.2f}); the head alone makes a grouped step "
            f"x{head_check['grouped_trl_head'] / head_check['grouped']:.2f} faster",
        ))
    return results


def load_run(csv_path: str, run_id: str | None = None) -> tuple[str, dict]:
    """The rows of one run of the CSV (the latest by default), as `measure` returns them."""
    with open(csv_path, newline="") as source:
        rows = list(csv.DictReader(source))
    run_id = run_id or rows[-1]["run_id"]
    by_point: dict = {}
    for row in rows:
        if row["run_id"] != run_id:
            continue
        for key, value in row.items():
            with contextlib.suppress(TypeError, ValueError):
                row[key] = float(value) if any(c in value for c in ".e") or value == "nan" else int(value)
        point = Point(row["prompt_len"], row["completion_len"], row["group_size"], row["num_groups"])
        by_point.setdefault(point, {})[row["path"]] = row
    return run_id, by_point


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="6 grid points + the target points")
    mode.add_argument("--targets", action="store_true", help="only the target points and the mask check")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shape", choices=sorted(MODEL_SHAPES),
                        help="default: cpu-small on CPU, qwen2.5-1.5b on CUDA")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on CPU (default 1: robust to other load on the host, see README)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="timed rounds per point, the order of the paths rotating each round (a path whose step "
                        "takes over 10 CPU-s: --slow-rounds; over 60: 1)")
    parser.add_argument("--slow-rounds", type=int, default=2,
                        help="timed rounds of a path whose warmup step took over 10 CPU-s (default 2)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                        help="without trl, no ratio against GRPOTrainer: the points count only for the reference "
                        "target, and the CSV's max_abs_logp_diff_vs_trl is against the first path")
    parser.add_argument("--no-memory-probes", action="store_true",
                        help="measure only the first path's memory (in the timing process); the others' peak_mib "
                        "stays empty, which saves each point one step of every other path")
    parser.add_argument("--prompt-lens", type=int, nargs="*", default=list(GRID_PROMPT_LENS),
                        help="one-group grid: prompt lengths (none: no one-group grid)")
    parser.add_argument("--completion-lens", type=int, nargs="+", default=list(GRID_COMPLETION_LENS))
    parser.add_argument("--group-sizes", type=int, nargs="+", default=list(GRID_GROUP_SIZES))
    parser.add_argument("--group-counts", type=int, nargs="*", default=list(MULTI_GROUP_COUNTS),
                        help="multi-group grid: groups per micro-batch (none: no multi-group grid)")
    parser.add_argument("--multi-prompt-lens", type=int, nargs="+", default=list(MULTI_PROMPT_LENS))
    parser.add_argument("--multi-completion-lens", type=int, nargs="+", default=list(MULTI_COMPLETION_LENS))
    parser.add_argument("--multi-group-sizes", type=int, nargs="+", default=list(MULTI_GROUP_SIZES))
    parser.add_argument("--max-trl-tflop", type=float, default=None,
                        help="skip one-group grid points whose repeated forward exceeds this (default: run every "
                        "point; multi-group points are never skipped)")
    parser.add_argument("--memory-budget-gib", type=float, default=12.0,
                        help="CPU: a path whose step would need more (common.PEAK_MEMORY_MODEL) runs its micro-batch "
                        "in chunks of whole groups")
    parser.add_argument("--no-targets", action="store_true", help="skip the target points and the mask check")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--run-id", help="label of this run in the CSV (default: its start time); reuse one to add "
                        "points to an earlier run")
    parser.add_argument("--report-only", nargs="?", const="latest", metavar="RUN_ID",
                        help="measure nothing: rewrite the table, plots and targets from a run in the CSV")
    args = parser.parse_args(argv)
    args.shape = args.shape or ("cpu-small" if args.device == "cpu" else "qwen2.5-1.5b")
    # GRPOTrainer first when it runs: the timing process measures its memory (see `common.run_point_case`).
    args.paths = ["trl"] * ("trl" in args.paths) + [p for p in args.paths if p != "trl"]
    args.csv = os.path.join(args.out_dir, "logprob.csv" if args.device == "cpu" else "logprob_cuda.csv")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    if args.report_only:
        run_id, by_point = load_run(args.csv, None if args.report_only == "latest" else args.report_only)
        first = next(iter(next(iter(by_point.values())).values()))
        env = {key: first[key] for key in ("machine", "commit", "torch", "transformers", "trl")}
        report(by_point, args, env, run_id, None, None, None)
        return 0
    env = environment()
    run_id = args.run_id or env["date"]
    if args.targets:
        points = []
    elif args.quick:
        points = list(QUICK_POINTS)
    else:
        points = grid_points(args)
    if not args.no_targets:
        points += [p for p in (TARGET_POINT, SMALL_GROUPS_POINT, ONE_GROUP_SAME_TOKENS_POINT) if p not in points]
    load = os.getloadavg()[0]
    print(f"{len(points)} points, paths {args.paths}, shape {args.shape} {MODEL_SHAPES[args.shape]}, "
          f"device {args.device}, threads {args.threads}; host load average {load:.1f} on {os.cpu_count()} cores")
    if args.device == "cpu" and load > 0.5 and args.threads > 1:
        print("note: the host is busy; with several threads every parallel region waits for descheduled threads. "
              "--threads 1 gives steadier ratios.")

    start = time.perf_counter()
    runner = IsolatedRunner()
    by_point = measure(points, args, env, run_id, runner)
    if args.run_id and by_point:
        # Adding to an earlier run: report on all of its points (the CSV now holds the ones just measured last).
        _, by_point = load_run(args.csv, run_id)
    mask_check = loop_check = head_check = None
    if not args.no_targets and args.device == "cpu":
        torch.set_num_threads(args.threads)
        mask_check = [dict(largest_trailing_blocks(point, args.shape), label=point.label())
                      for point in (TARGET_POINT, SMALL_GROUPS_POINT)]
        loop_check = attention_loop_overhead(SMALL_GROUPS_POINT, args.shape)
        head_check = runner.run(functools.partial(head_ablation, shape=args.shape, threads=args.threads), TARGET_POINT)
    elapsed = time.perf_counter() - start
    report(by_point, args, env, run_id, mask_check, loop_check, elapsed, head_check)
    return 0


def report(by_point: dict, args, env: dict, run_id: str, mask_check, loop_check, elapsed: float | None,
           head_check: dict | None = None) -> None:
    suffix = "" if args.device == "cpu" else "_cuda"
    commits = sorted({row["commit"] for rows in by_point.values() for row in rows.values() if "commit" in row})
    header = (
        f"Log-prob forward+backward, {args.device}, model `{args.shape}`, {args.threads} thread(s); run {run_id}; "
        f"{env['machine']}; commit {', '.join(commits) or env['commit']}{package_code_note(commits)}; "
        f"torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}. "
        f"Speedup and memory are GRPOTrainer's / ours; 'ours vs ref' is the reference's time / ours."
    )
    table_path = os.path.join(args.out_dir, f"logprob_latest{suffix}.md")
    table = write_table(by_point, table_path, header)
    plots = write_plots(by_point, args.out_dir, f"{args.shape}, {args.device}, run {run_id}; {env['machine']}")
    print("\n" + table)
    print("plots: " + (", ".join(plots) or "none (the run has no one-group points)"))
    print(f"CSV: {args.csv}")

    previous = None
    if run_id != PREVIOUS_RUN_ID and os.path.exists(args.csv):
        previous = load_run(args.csv, PREVIOUS_RUN_ID)[1]
    lines = []
    for name, passed, detail in check_targets(by_point, mask_check, loop_check, head_check, previous):
        status = "INFO" if passed is None else ("PASS" if passed else "FAIL")
        lines.append(f"  [{status}] {name}\n         {detail}")
    if mask_check is None:
        lines.append("  (the dense-mask check, the loop overhead and the head ablation: not run by the invocation "
                     "that wrote this file; --report-only measures nothing)")
    print("\nTargets:\n" + "\n".join(lines))
    with open(table_path, "a") as out:
        out.write("\nTargets:\n\n```\n" + "\n".join(lines) + "\n```\n")
    if elapsed is not None:
        print(f"\nsweep took {elapsed / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
