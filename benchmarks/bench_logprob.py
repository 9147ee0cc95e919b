"""
Log-prob forward+backward: GRPOTrainer vs PrefixGroupedGRPOTrainer vs the paper's reference, over a grid.

    python -m benchmarks.bench_logprob              # default sweep (CPU, ~30-60 min on 2 cores, see README)
    python -m benchmarks.bench_logprob --quick      # 4 points + the targets (~10 min)
    python -m benchmarks.bench_logprob --targets    # only the target point, the small-groups point, the mask check
    python -m benchmarks.bench_logprob --device cuda   # Qwen2.5-1.5B-shaped model, bf16 (not run on CPU hosts)

Every point runs in a fresh process (see `common.run_point_case`); results are appended to
`benchmarks/results/logprob.csv` and the run's table and plots are written to `benchmarks/results/`. The README
explains the FLOP model, the memory probe and the targets printed at the end.
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
    run_memory_case,
    run_point_case,
)

GRID_PROMPT_LENS = (512, 1024, 2048, 4096)
GRID_COMPLETION_LENS = (64, 256)
GRID_GROUP_SIZES = (2, 4, 8, 16)
TARGET_POINT = Point(2048, 128, 8)
# Many small groups in one micro-batch, and one group with the same packed token count (63 x 64 = 4000 + 32).
SMALL_GROUPS_POINT = Point(32, 16, 2, num_groups=64)
ONE_GROUP_SAME_TOKENS_POINT = Point(4001, 16, 2, num_groups=1)
QUICK_POINTS = (Point(512, 64, 4), Point(512, 256, 16), Point(2048, 64, 8), Point(4096, 64, 2))
# `--max-trl-tflop 1.2` leaves out the 6 grid points whose repeated forward costs more than 1.2 TFLOP (G=16 at
# P=2048, G>=8 at P=4096): 1-2 min per GRPOTrainer step on one core, about half of the sweep's time.

TARGET_SPEEDUP_OF_FLOP_RATIO = 0.9
TARGET_MEMORY_RATIO = 0.5


def grid_points(args) -> list[Point]:
    points = [
        Point(p, c, g) for p, c, g in itertools.product(args.prompt_lens, args.completion_lens, args.group_sizes)
    ]
    if args.max_trl_tflop is not None:
        kept = [p for p in points if flop_counts(p, args.shape)["trl"].flops <= args.max_trl_tflop * 1e12]
        skipped = [p for p in points if p not in kept]
        if skipped:
            print(f"bounded sweep: skipping {len(skipped)} points above {args.max_trl_tflop} TFLOP for GRPOTrainer "
                  f"({', '.join(p.label() for p in skipped)})")
        points = kept
    return points


def summarize(point: Point, raw: dict, args, env: dict, run_id: str) -> list[dict]:
    """One CSV row per path, with ratios against the `trl` path of the same point."""
    counts = flop_counts(point, args.shape, fused_head_scores_all=args.device == "cpu")
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
        }
        if trl is not None:
            trl_wall, trl_cpu = statistics.median(trl["wall_s"]), statistics.median(trl["cpu_s"])
            row.update(
                flop_ratio_vs_trl=round(counts["trl"].flops / counts[path].flops, 3),
                speedup_vs_trl=round(trl_wall / wall, 3),
                cpu_speedup_vs_trl=round(trl_cpu / cpu, 3),
                memory_ratio_vs_trl=round(measured["peak_mib"] / max(trl["peak_mib"], 1e-9), 3),
            )
        rows.append(row)
    return rows


def measure(points: list[Point], args, env: dict, run_id: str, runner: IsolatedRunner) -> dict[Point, dict]:
    by_point = {}
    for index, point in enumerate(points, 1):
        start = time.perf_counter()
        case = PointCase(point, tuple(args.paths), args.shape, args.device, args.threads, args.rounds)
        try:
            raw = runner.run(run_point_case, case)
            for path in args.paths[1:]:  # the first path's memory was measured in the timing process
                alone = runner.run(run_memory_case, dataclasses.replace(case, paths=(path,)))
                raw["paths"][path]["peak_mib"] = alone["peak_mib"]
        except Exception as error:  # e.g. out of memory (CUDA raises, a CPU worker gets killed): keep sweeping
            print(f"[{index}/{len(points)}] {point.label()}: FAILED ({type(error).__name__}: {error})", flush=True)
            continue
        rows = summarize(point, raw, args, env, run_id)
        append_csv(args.csv, rows)
        by_point[point] = {row["path"]: row for row in rows}
        parts = []
        for row in rows:
            part = f"{row['path']} {row['median_s']:.2f}s {row['peak_mib']:.0f}MiB"
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
    What the split attention's per-group loop costs: forward+backward of one layer's `split_attention` over the
    point's packed row (two SDPA calls per group) vs one batched SDPA call over all groups at once with the group's
    (t x t) mask, t = tokens per group (possible here because every group has the same shape). Their difference per
    group is the loop's overhead (slicing, dispatch, the final concatenation), in one layer.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from prefix_grouper_trl.attention import split_attention, suffix_block_mask
    from prefix_grouper_trl.layout import build_group_layout

    from .common import build_model, make_micro_batch

    model = build_model(shape)
    module = model.model.layers[0].self_attn
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    layout = build_group_layout(*make_micro_batch(point, config.vocab_size))
    groups, packed = layout.num_groups, layout.packed_tokens
    per_group = packed // groups
    prefix_len, suffix_lens = layout.prefix_lens[0], layout.suffix_lens[0]
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, packed, head_dim, generator=generator, requires_grad=True)
    key = torch.randn(1, kv_heads, packed, head_dim, generator=generator, requires_grad=True)
    value = torch.randn(1, kv_heads, packed, head_dim, generator=generator, requires_grad=True)
    grad = torch.randn(1, packed, heads, head_dim, generator=generator)
    group_mask = torch.zeros(per_group, per_group, dtype=torch.bool)
    group_mask[:prefix_len, :prefix_len] = torch.ones(prefix_len, prefix_len, dtype=torch.bool).tril()
    group_mask[prefix_len:] = suffix_block_mask(prefix_len, suffix_lens, torch.device("cpu"))[0, 0]

    def by_group(x):  # (1, h, G*t, d) -> (G, h, t, d)
        heads_of_x = x.size(1)
        grouped = x.view(1, heads_of_x, groups, per_group, head_dim).permute(0, 2, 1, 3, 4)
        return grouped.reshape(groups, heads_of_x, per_group, head_dim)

    def loop():
        out, _ = split_attention(sdpa_attention_forward, False, module, query, key, value, layout,
                                 scaling=module.scaling, dropout=0.0)
        out.backward(grad)

    def batched():
        out, _ = sdpa_attention_forward(module, by_group(query), by_group(key), by_group(value),
                                        group_mask[None, None], is_causal=False, scaling=module.scaling, dropout=0.0)
        out.reshape(1, packed, heads, head_dim).backward(grad)

    timings = {}
    for name, fn in (("loop", loop), ("batched", batched)):
        fn()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        timings[name] = statistics.median(samples)
    per_group_s = (timings["loop"] - timings["batched"]) / groups
    return {"groups": groups, "loop_s": timings["loop"], "batched_s": timings["batched"], "per_group_s": per_group_s,
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
    return rows[path][key] if path in rows else float("nan")


def write_table(by_point: dict, path: str, header: str) -> str:
    headers = [
        "P", "C", "G", "FLOP ratio", "speedup vs TRL", "(CPU time)", "memory vs TRL",
        "TRL s", "ours s", "ref s", "ours vs ref", "TRL MiB", "ours MiB", "ref MiB",
    ]
    table_rows = []
    for point, rows in sorted(by_point.items(), key=lambda item: (item[0].num_groups, item[0].completion_len,
                                                                    item[0].group_size, item[0].prompt_len)):
        if point.num_groups != 1:
            continue
        ours = rows.get("grouped", {})
        table_rows.append([
            point.prompt_len, point.completion_len, point.group_size,
            f"{ours.get('flop_ratio_vs_trl', float('nan')):.2f}",
            f"{ours.get('speedup_vs_trl', float('nan')):.2f}",
            f"{ours.get('cpu_speedup_vs_trl', float('nan')):.2f}",
            f"{ours.get('memory_ratio_vs_trl', float('nan')):.2f}",
            f"{_median(rows, 'trl'):.2f}", f"{_median(rows, 'grouped'):.2f}", f"{_median(rows, 'reference'):.2f}",
            f"{_median(rows, 'reference') / _median(rows, 'grouped'):.2f}",
            f"{_median(rows, 'trl', 'peak_mib'):.0f}", f"{_median(rows, 'grouped', 'peak_mib'):.0f}",
            f"{_median(rows, 'reference', 'peak_mib'):.0f}",
        ])
    text = header + "\n\n" + markdown_table(headers, table_rows) + "\n"
    with open(path, "w") as out:
        out.write(text)
    return text


def write_plots(by_point: dict, out_dir: str, title: str) -> list[str]:
    """One PNG per quantity, one panel per completion length, x = prompt length, one curve per group size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = {p: r for p, r in by_point.items() if p.num_groups == 1 and {"trl", "grouped"} <= r.keys()}
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


def check_targets(by_point: dict, mask_check: dict | None, loop_check: dict | None = None,
                  head_check: dict | None = None) -> list:
    """(name, passed or None for report-only, detail) for each target of the tracker's issue 4."""
    results = []
    target = by_point.get(TARGET_POINT)
    if target and {"trl", "grouped"} <= target.keys():
        ours = target["grouped"]
        needed = TARGET_SPEEDUP_OF_FLOP_RATIO * ours["flop_ratio_vs_trl"]
        results.append((
            f"speedup over GRPOTrainer at {TARGET_POINT.label()} >= {TARGET_SPEEDUP_OF_FLOP_RATIO} x FLOP ratio",
            ours["speedup_vs_trl"] >= needed,
            f"speedup {ours['speedup_vs_trl']:.2f} (CPU time {ours['cpu_speedup_vs_trl']:.2f}) vs needed "
            f"{needed:.2f} = {TARGET_SPEEDUP_OF_FLOP_RATIO} x {ours['flop_ratio_vs_trl']:.2f}; "
            f"speedup / FLOP ratio = {ours['speedup_vs_trl'] / ours['flop_ratio_vs_trl']:.2f}",
        ))
        results.append((
            f"peak memory at {TARGET_POINT.label()} <= {TARGET_MEMORY_RATIO} x GRPOTrainer's",
            ours["memory_ratio_vs_trl"] <= TARGET_MEMORY_RATIO,
            f"{ours['peak_mib']:.0f} MiB vs {target['trl']['peak_mib']:.0f} MiB = {ours['memory_ratio_vs_trl']:.2f}",
        ))
    with_reference = {p: r for p, r in by_point.items() if {"grouped", "reference"} <= r.keys()}
    if with_reference:
        ratios = {p: r["reference"]["median_s"] / r["grouped"]["median_s"] for p, r in with_reference.items()}
        ordered = sorted(ratios.items(), key=lambda item: item[1])
        slower = [f"{point.label()} (x{ratio:.2f})" for point, ratio in ordered if ratio <= 1]
        results.append((
            "faster than the reference implementation at every measured point",
            not slower,
            f"{len(ratios) - len(slower)}/{len(ratios)} points faster; reference/ours from {min(ratios.values()):.2f} "
            f"to {max(ratios.values()):.2f}" + (f"; slower at: {', '.join(slower)}" if slower else ""),
        ))
    if mask_check is not None:
        results.append((
            "no dense T x T mask (or score matrix) on the hot path",
            not mask_check["dense"],
            f"T={mask_check['packed_tokens']}; tensors with both trailing dims >= T: {mask_check['dense'] or 'none'}; "
            f"largest boolean mask: {mask_check['largest_mask']}",
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
            per_step = loop_check["per_group_s"] * loop_check["groups"] * loop_check["layers"]
            results.append((
                "per-group overhead of the split attention's loop (report only)",
                None,
                f"one layer fwd+bwd over {loop_check['groups']} groups: loop {loop_check['loop_s'] * 1e3:.1f} ms vs "
                f"one batched SDPA call {loop_check['batched_s'] * 1e3:.1f} ms -> "
                f"{loop_check['per_group_s'] * 1e6:.0f} us per group per layer; x{loop_check['layers']} layers = "
                f"{per_step:.2f} s per step = {per_step / ours['median_s']:.0%} of ours' step at this point",
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
                row[key] = float(value) if any(c in value for c in ".e") else int(value)
        point = Point(row["prompt_len"], row["completion_len"], row["group_size"], row["num_groups"])
        by_point.setdefault(point, {})[row["path"]] = row
    return run_id, by_point


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="4 grid points + the target points")
    mode.add_argument("--targets", action="store_true", help="only the target points and the mask check")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shape", choices=sorted(MODEL_SHAPES),
                        help="default: cpu-small on CPU, qwen2.5-1.5b on CUDA")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on CPU (default 1: robust to other load on the host, see README)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per point (2 for steps over 10 CPU-s)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=list(GRID_PROMPT_LENS))
    parser.add_argument("--completion-lens", type=int, nargs="+", default=list(GRID_COMPLETION_LENS))
    parser.add_argument("--group-sizes", type=int, nargs="+", default=list(GRID_GROUP_SIZES))
    parser.add_argument("--max-trl-tflop", type=float, default=None,
                        help="skip grid points whose repeated forward exceeds this (default: run every point)")
    parser.add_argument("--no-targets", action="store_true", help="skip the target points and the mask check")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--run-id", help="label of this run in the CSV (default: its start time); reuse one to add "
                        "points to an earlier run")
    parser.add_argument("--report-only", nargs="?", const="latest", metavar="RUN_ID",
                        help="measure nothing: rewrite the table, plots and targets from a run in the CSV")
    args = parser.parse_args(argv)
    args.shape = args.shape or ("cpu-small" if args.device == "cpu" else "qwen2.5-1.5b")
    if "trl" not in args.paths:
        parser.error("--paths must include trl: every ratio is against it")
    args.paths = ["trl"] + [p for p in args.paths if p != "trl"]
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
        mask_check = largest_trailing_blocks(TARGET_POINT, args.shape)
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
        f"{env['machine']}; commit {', '.join(commits) or env['commit']}; "
        f"torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}. "
        f"Speedup and memory are GRPOTrainer's / ours; 'ours vs ref' is the reference's time / ours."
    )
    table_path = os.path.join(args.out_dir, f"logprob_latest{suffix}.md")
    table = write_table(by_point, table_path, header)
    plots = write_plots(by_point, args.out_dir, f"{args.shape}, {args.device}, run {run_id}; {env['machine']}")
    print("\n" + table)
    print("plots: " + ", ".join(plots))
    print(f"CSV: {args.csv}")

    lines = []
    for name, passed, detail in check_targets(by_point, mask_check, loop_check, head_check):
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
