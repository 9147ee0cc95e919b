"""
Log-prob forward+backward on a hybrid decoder: GRPOTrainer vs PrefixGroupedGRPOTrainer on `cpu-hybrid` (a Qwen3.5
text decoder: Gated DeltaNet 3:1 with full attention, built from config), with the hybrid issue's targets.

    python -m benchmarks.bench_hybrid              # the target point and two more (~15 min on 2 cores)
    python -m benchmarks.bench_hybrid --targets    # the target point only

Same measurement as `bench_logprob.py` (fresh processes, interleaved rounds, peak RSS alone in a process; see
benchmarks/README.md), FLOP model `common.hybrid_flop_counts`, which counts the Gated DeltaNet layers' convolution and
chunked delta rule on what each path feeds them. The paper's `prefix_grouper` has no recurrent layers, so it is not
a path here. Writes `results/hybrid.csv` (appended) and `results/hybrid_latest.md` (table and targets).
"""

import argparse
import datetime
import os
import sys
import time

from .bench_logprob import measure
from .common import RESULTS_DIR, IsolatedRunner, Point, environment, markdown_table

TARGET_POINT = Point(2048, 128, 8)
OTHER_POINTS = (Point(512, 64, 4), Point(1024, 128, 8, num_groups=2))
TARGET_SPEEDUP_OF_FLOP_RATIO = 0.9
TARGET_MEMORY_RATIO = 0.5


def check_targets(by_point: dict) -> list[tuple[str, bool, str]]:
    ours = by_point.get(TARGET_POINT, {}).get("grouped")
    if ours is None:
        return [(f"the target point {TARGET_POINT.label()} was measured", False, "it failed or was not run")]
    needed = TARGET_SPEEDUP_OF_FLOP_RATIO * ours["flop_ratio_vs_trl"]
    return [
        (
            f"speedup over GRPOTrainer at {TARGET_POINT.label()} >= {TARGET_SPEEDUP_OF_FLOP_RATIO} x FLOP ratio",
            ours["speedup_vs_trl"] >= needed,
            f"{ours['speedup_vs_trl']:.2f} vs needed {needed:.2f} = {TARGET_SPEEDUP_OF_FLOP_RATIO} x "
            f"{ours['flop_ratio_vs_trl']:.2f}",
        ),
        (
            f"peak memory at {TARGET_POINT.label()} <= {TARGET_MEMORY_RATIO} x GRPOTrainer's",
            ours["memory_ratio_vs_trl"] <= TARGET_MEMORY_RATIO,
            f"{ours['memory_ratio_vs_trl']:.3f} ({ours['peak_mib']:.0f} MiB vs "
            f"{by_point[TARGET_POINT]['trl']['peak_mib']:.0f} MiB)",
        ),
    ]


def report(by_point: dict, args, env: dict, run_id: str) -> list[str]:
    rows = []
    for point, paths in by_point.items():
        trl, ours = paths["trl"], paths["grouped"]
        rows.append([
            point.label(), f"{trl['median_s']:.2f}", f"{ours['median_s']:.2f}", f"{ours['speedup_vs_trl']:.2f}",
            f"{ours['flop_ratio_vs_trl']:.2f}", f"{trl['peak_mib']:.0f}", f"{ours['peak_mib']:.0f}",
            f"{ours['memory_ratio_vs_trl']:.3f}", ours["max_abs_logp_diff_vs_trl"],
        ])
    table = markdown_table(
        ["point", "GRPOTrainer s", "ours s", "speedup", "FLOP ratio", "GRPOTrainer MiB", "ours MiB", "memory ratio",
         "max |logp diff|"],
        rows,
    )
    header = (
        f"Hybrid log-prob forward+backward, {args.device}, model `{args.shape}`, {args.threads} thread(s); run "
        f"{run_id}; {env['machine']}; commit {env['commit']}; torch {env['torch']}, transformers "
        f"{env['transformers']}, trl {env['trl']}. Speedup and memory ratio are GRPOTrainer's / ours."
    )
    lines = [f"  [{'PASS' if passed else 'FAIL'}] {name}\n         {detail}" for name, passed, detail in
             check_targets(by_point)]
    with open(os.path.join(args.out_dir, "hybrid_latest.md"), "w") as out:
        out.write(header + "\n\n" + table + "\n\nTargets:\n\n```\n" + "\n".join(lines) + "\n```\n")
    print("\n" + table + "\n\nTargets:\n" + "\n".join(lines))
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", action="store_true", help="only the target point")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--shape", default="cpu-hybrid", help="a hybrid shape of common.MODEL_SHAPES")
    args = parser.parse_args(argv)
    args.device, args.paths = "cpu", ["trl", "grouped"]
    args.csv = os.path.join(args.out_dir, "hybrid.csv")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    points = [TARGET_POINT] + ([] if args.targets else list(OTHER_POINTS))
    env = environment()
    run_id = datetime.datetime.now().isoformat(timespec="seconds")
    start = time.perf_counter()
    by_point = measure(points, args, env, run_id, IsolatedRunner())
    lines = report(by_point, args, env, run_id)
    print(f"\ntook {(time.perf_counter() - start) / 60:.1f} min")
    return 0 if all("[PASS]" in line for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
