"""
Log-prob forward+backward of a vision-language micro-batch, vision tower included: GRPOTrainer vs
PrefixGroupedGRPOTrainer on one prompt whose image fills about 1,000-2,300 tokens, with G = 8 completions.

    python -m benchmarks.bench_vlm                       # CPU, `cpu-vlm` (tiny Qwen2.5-VL), 2 points (~10 min)
    python -m benchmarks.bench_vlm --points 1024         # one point
    python -m benchmarks.bench_vlm --device cuda --shape qwen2.5-vl-3b --points 1024 2304 4096   # the real shape

TRL hands the repeated forward the image once per completion (`pixel_values` repeated G times), so the vision tower
encodes it G times and the language model runs the image tokens G times; the grouped forward encodes it once and
runs the prompt once. Same measurement as `bench_logprob.py` (see benchmarks/README.md): each point in a fresh
process, both paths built there, one step each on a tiny batch, then interleaved timed rounds; peak memory of each
path's first full-size step alone in a fresh process (CPU: RSS growth; CUDA: `max_memory_allocated`). Also counted:
the patch rows that reach the vision tower (a hook on `model.visual`). Writes `results/vlm.csv` (appended) and
`results/vlm_latest.md`.

Shapes are built from configs with random weights (nothing is downloaded):
- `cpu-vlm`: the Qwen2.5-VL layout with `cpu-small`'s language model (hidden 256, 4 layers, GQA 8:2, vocab 8192) and
  a 4-block vision tower (hidden 128, patches 14 px, windows of 112 px, 2 x 2 merge; full attention in block 4).
- `qwen2.5-vl-3b`: the shape of Qwen/Qwen2.5-VL-3B-Instruct (36 layers, hidden 2048; 32-block vision tower), bf16.
**The CUDA path has not been run** (no GPU where this was written).
"""

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from trl import GRPOTrainer

from .common import (
    RESULTS_DIR,
    IsolatedRunner,
    append_csv,
    environment,
    load_average,
    make_trainer,
    markdown_table,
    measure_peak,
    pin_malloc_mmap_threshold,
)

PATHS = ("trl", "grouped")
SPECIAL = dict(image_token_id=4, video_token_id=5, vision_start_token_id=6, vision_end_token_id=7)
FIRST_TEXT_ID = 8
MERGE = 2

VLM_SHAPES = {
    "cpu-vlm": dict(
        text_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=8192, max_position_embeddings=16384,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
                         tie_word_embeddings=False),
        vision_config=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
                           patch_size=14, spatial_merge_size=MERGE, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[3], in_channels=3),
    ),
    "qwen2.5-vl-3b": dict(
        text_config=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]},
                         tie_word_embeddings=True),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=MERGE, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], in_channels=3),
    ),
}


@dataclass(frozen=True)
class VlmPoint:
    """One prompt: `text_len` text tokens around an image of `image_tokens` merged tokens; `group_size` completions."""

    image_tokens: int
    completion_len: int = 128
    group_size: int = 8
    text_len: int = 32

    @property
    def grid_side(self) -> int:
        side = int(round(self.image_tokens**0.5))
        if side * side != self.image_tokens:
            raise ValueError(f"image_tokens={self.image_tokens}: use a square number of merged tokens")
        return side * MERGE

    def label(self) -> str:
        return f"image {self.image_tokens} tok + text {self.text_len}, C={self.completion_len} G={self.group_size}"


WARMUP_POINT = VlmPoint(image_tokens=16, completion_len=8, group_size=2, text_len=8)


def build_vlm(shape: str, device: str, dtype, seed: int = 0):
    import transformers as tf
    from transformers import AutoModelForImageTextToText

    values = VLM_SHAPES[shape]
    text = dict(values["text_config"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=values["vision_config"], **SPECIAL)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).train()


def make_vlm_batch(point: VlmPoint, model, device: str, seed: int = 0):
    """`(input_ids, attention_mask, logits_to_keep, multimodal kwargs)` as TRL passes them (the image G times)."""
    vocab = model.config.get_text_config().vocab_size
    vision = model.config.vision_config
    generator = torch.Generator().manual_seed(seed)
    half = point.text_len // 2
    text = torch.randint(FIRST_TEXT_ID, vocab, (point.text_len,), generator=generator)
    prompt = torch.cat([
        text[:half], torch.tensor([SPECIAL["vision_start_token_id"]]),
        torch.full((point.image_tokens,), SPECIAL["image_token_id"]), torch.tensor([SPECIAL["vision_end_token_id"]]),
        text[half:],
    ])
    token_types = (prompt == SPECIAL["image_token_id"]).long()
    rows = point.group_size
    completions = torch.randint(FIRST_TEXT_ID, vocab, (rows, point.completion_len), generator=generator)
    input_ids = torch.cat([prompt.expand(rows, -1), completions], dim=1)
    grid = torch.tensor([[1, point.grid_side, point.grid_side]])
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(point.grid_side**2, patch_dim, generator=generator)
    dtype = next(model.parameters()).dtype
    inputs = {
        "pixel_values": pixels.repeat(rows, 1).to(device, dtype),
        "image_grid_thw": grid.repeat(rows, 1).to(device),
        "num_images": [1] * rows,
        "mm_token_type_ids": torch.cat([token_types.expand(rows, -1), torch.zeros_like(completions)], 1).to(device),
    }
    return input_ids.to(device), torch.ones_like(input_ids).to(device), point.completion_len, inputs


@dataclass
class VlmCase:
    point: VlmPoint
    paths: tuple = PATHS
    shape: str = "cpu-vlm"
    device: str = "cpu"
    threads: int = 1
    rounds: int = 3


class _Setup:
    """One path, its model, a full-size step and a warmup step; counts the patch rows its vision tower receives."""

    def __init__(self, path: str, case: VlmCase, output_dir: str):
        dtype = torch.float32 if case.device == "cpu" else torch.bfloat16
        self.path = path
        self.model = build_vlm(case.shape, case.device, dtype)
        trainer = make_trainer(path, self.model, case.device, output_dir)
        if path == "trl":
            method = lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(trainer, *a, **k)  # noqa: E731
        else:
            method = trainer._get_per_token_logps_and_entropies
        self.patches = []
        self.model.model.visual.register_forward_pre_hook(lambda module, args: self.patches.append(args[0].size(0)))
        for param in self.model.parameters():
            param.grad = torch.zeros_like(param)
        self.last = {}
        self.step = self._step(method, trainer, make_vlm_batch(case.point, self.model, case.device))
        self.warm_step = self._step(method, trainer, make_vlm_batch(WARMUP_POINT, self.model, case.device))

    def _step(self, method, trainer, batch):
        input_ids, attention_mask, logits_to_keep, inputs = batch
        generator = torch.Generator().manual_seed(1)
        weights = torch.randn(input_ids.size(0), logits_to_keep, generator=generator).to(input_ids.device)

        def step():
            self.patches.clear()
            logps, entropies, _ = method(trainer.model, input_ids, attention_mask, logits_to_keep,
                                         compute_entropy=True, **inputs)
            ((logps.float() * weights).sum() + 0.01 * (entropies.float() * weights.flip(0)).sum()).backward()
            self.last["logps"] = logps.detach()
            self.last["patches"] = sum(self.patches)

        return step


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def _timed(step, device: str) -> float:
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def _start(case: VlmCase) -> None:
    if case.device == "cpu":
        torch.set_num_threads(case.threads)
        pin_malloc_mmap_threshold()


def run_vlm_memory(case: VlmCase) -> dict:
    """Peak memory of the first full-size step of `case.paths[0]`, alone in a fresh process."""
    _start(case)
    with tempfile.TemporaryDirectory() as output_dir:
        setup = _Setup(case.paths[0], case, output_dir)
        setup.warm_step()
        memory = {}
        with measure_peak(case.device, memory):
            setup.step()
            _sync(case.device)
    return {"peak_mib": memory["peak_mib"], "patches": setup.last["patches"]}


def run_vlm_point(case: VlmCase) -> dict:
    """Both paths in one fresh process: a warmup step each, then `rounds` interleaved timed rounds."""
    _start(case)
    load_before = load_average()
    results = {}
    with tempfile.TemporaryDirectory() as output_dir:
        setups = [_Setup(path, case, output_dir) for path in case.paths]
        for setup in setups:
            setup.warm_step()
            setup.step()  # full-size warmup
            results[setup.path] = {"wall_s": [], "patches": setup.last["patches"]}
        for _ in range(case.rounds):
            for setup in setups:
                results[setup.path]["wall_s"].append(_timed(setup.step, case.device))
        reference = setups[0].last["logps"].float()
        for setup in setups:
            results[setup.path]["max_abs_logp_diff"] = (setup.last["logps"].float() - reference).abs().max().item()
    return {"paths": results, "load_avg": (load_before, load_average())}


def measure(points, args, env: dict, run_id: str, runner) -> list[dict]:
    rows = []
    for point in points:
        case = VlmCase(point, shape=args.shape, device=args.device, threads=args.threads, rounds=args.rounds)
        print(f"{point.label()} ...", flush=True)
        timing = runner.run(run_vlm_point, case)
        memory = {path: runner.run(run_vlm_memory, VlmCase(point, (path,), args.shape, args.device, args.threads))
                  for path in PATHS}
        medians = {path: statistics.median(timing["paths"][path]["wall_s"]) for path in PATHS}
        row = dict(
            run_id=run_id, date=datetime.datetime.now().isoformat(timespec="seconds"), machine=env["machine"],
            commit=env["commit"], torch=env["torch"], transformers=env["transformers"], trl=env["trl"],
            device=args.device, shape=args.shape, threads=args.threads, image_tokens=point.image_tokens,
            text_len=point.text_len, completion_len=point.completion_len, group_size=point.group_size,
            trl_median_s=medians["trl"], grouped_median_s=medians["grouped"],
            speedup=medians["trl"] / medians["grouped"],
            trl_peak_mib=memory["trl"]["peak_mib"], grouped_peak_mib=memory["grouped"]["peak_mib"],
            memory_ratio=memory["grouped"]["peak_mib"] / memory["trl"]["peak_mib"],
            trl_vision_patches=timing["paths"]["trl"]["patches"],
            grouped_vision_patches=timing["paths"]["grouped"]["patches"],
            max_abs_logp_diff=timing["paths"]["grouped"]["max_abs_logp_diff"],
            load_avg_start=timing["load_avg"][0], load_avg_end=timing["load_avg"][1],
        )
        print(f"  speedup {row['speedup']:.2f}x, memory {row['memory_ratio']:.3f}, vision patches "
              f"{row['trl_vision_patches']} -> {row['grouped_vision_patches']}", flush=True)
        rows.append(row)
    return rows


def report(rows: list[dict], args, env: dict, run_id: str) -> str:
    table = markdown_table(
        ["point", "GRPOTrainer s", "ours s", "speedup", "GRPOTrainer MiB", "ours MiB", "memory ratio",
         "vision-tower patches (GRPOTrainer -> ours)", "max |logp diff|"],
        [[f"image {r['image_tokens']} tok + text {r['text_len']}, C={r['completion_len']} G={r['group_size']}",
          f"{r['trl_median_s']:.2f}", f"{r['grouped_median_s']:.2f}", f"{r['speedup']:.2f}",
          f"{r['trl_peak_mib']:.0f}", f"{r['grouped_peak_mib']:.0f}", f"{r['memory_ratio']:.3f}",
          f"{r['trl_vision_patches']} -> {r['grouped_vision_patches']}", f"{r['max_abs_logp_diff']:.2e}"]
         for r in rows],
    )
    header = (
        f"Vision-language log-prob forward+backward (vision tower included), {args.device}, model `{args.shape}`, "
        f"{args.threads} thread(s); run {run_id}; {env['machine']}; commit {env['commit']}; torch {env['torch']}, "
        f"transformers {env['transformers']}, trl {env['trl']}. Speedup and memory ratio: GRPOTrainer's / ours."
    )
    text = header + "\n\n" + table + "\n"
    with open(os.path.join(args.out_dir, "vlm_latest.md"), "w") as out:
        out.write(text)
    print("\n" + table)
    return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, nargs="+", default=[1024, 2304],
                        help="image sizes in merged tokens (square numbers)")
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default=None, help=f"one of {sorted(VLM_SHAPES)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.shape = args.shape or ("cpu-vlm" if args.device == "cpu" else "qwen2.5-vl-3b")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    points = [VlmPoint(tokens, args.completion_len, args.group_size) for tokens in args.points]
    env = environment()
    run_id = datetime.datetime.now().isoformat(timespec="seconds")
    start = time.perf_counter()
    rows = measure(points, args, env, run_id, IsolatedRunner())
    append_csv(os.path.join(args.out_dir, "vlm.csv"), rows)
    report(rows, args, env, run_id)
    print(f"\ntook {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
