"""
Shared pieces of the benchmarks: model shapes, TRL-style micro-batches, the three log-prob paths, memory probes,
the analytic FLOP model, and result files.

The paths, all computing per-token log-probs and entropies of one micro-batch, then backpropagating a fixed random
weighting of both (what the GRPO loss does with them):

    trl           GRPOTrainer._get_per_token_logps_and_entropies on a plain GRPOTrainer (every row carries its prompt)
    grouped       PrefixGroupedGRPOTrainer._get_per_token_logps_and_entropies (prompt once per group, packed row)
    grouped_loop  the same, with the CPU split attention held to its per-group loop (two calls per group and layer:
                  the code before groups could share calls; at one group it is what `grouped` runs)
    reference     the paper's `prefix_grouper` package through `reference_adapter.py` (SDPA adapter on CPU)

A micro-batch too large for the host's memory runs as a few chunks of whole groups, one forward+backward each (what
TRL's `batch_size` chunking and gradient accumulation do); `plan_chunks` picks them from a memory model.

Measurements run in fresh processes forked from a server that has only imported the libraries (see
`IsolatedRunner`). Memory is the peak RSS growth of a path's first full-size step, alone in its process, after freed
heap pages are handed back to the OS (`run_memory_case`); time is measured with all paths of a point in one process,
interleaved round by round (`run_point_case`).
"""

import contextlib
import ctypes
import csv
import datetime
import gc
import hashlib
import multiprocessing
import os
import platform
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch
import transformers
import trl
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from trl import GRPOConfig, GRPOTrainer

from prefix_grouper_trl import PrefixGroupedGRPOTrainer
from prefix_grouper_trl import head as cpu_head

from . import reference_adapter

PATHS = ("trl", "grouped", "grouped_loop", "reference")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Model shapes, built from config with random weights (nothing is downloaded).
# cpu-small: Qwen2 layout (GQA 8:2, SwiGLU MLP 4x, RMSNorm, RoPE, q/k/v biases), small enough that the full sweep
#   fits in ~30 min on 2 cores. Its vocabulary (8192) is large next to its body, so the LM head is ~1/3 of the
#   compute per position: that matters because TRL's fused head scores every input position on CPU (see FLOP model).
# qwen2.5-1.5b: the shape of Qwen/Qwen2.5-1.5B (28 layers, hidden 1536, GQA 12:2, vocab 151936), for --device cuda.
MODEL_SHAPES = {
    "cpu-small": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=8192,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
}
# cpu-hybrid: a Qwen3.5 text decoder (every Qwen3.5 checkpoint's layout): Gated DeltaNet layers 3:1 with gated full
#   attention, the same width, depth, MLP and vocabulary as cpu-small (hybrid issue's benchmark; --shape cpu-hybrid).
MODEL_SHAPES["cpu-hybrid"] = dict(
    MODEL_SHAPES["cpu-small"],
    family="qwen3_5",
    head_dim=32,
    linear_num_value_heads=8,
    linear_num_key_heads=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
)
# First ids are special tokens of the in-process tokenizer; random prompt/completion ids are drawn above them.
NUM_SPECIAL_TOKENS = 4


def model_config(shape: str):
    values = dict(MODEL_SHAPES[shape])
    family = values.pop("family", "qwen2")
    if family == "qwen3_5":
        from transformers import Qwen3_5TextConfig as config_class
    else:
        config_class = Qwen2Config
    return config_class(**values, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_model(shape: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(shape), attn_implementation="sdpa", dtype=dtype)
    return model.to(device).train()


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `w0 .. w{vocab_size-1}` (w0 pad, w1 bos, w2 eos, w3 unk), built in-process."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3", padding_side="left"
    )


def even_token_reward(completions, **kwargs):
    """Fraction of even word ids in each completion: cheap, deterministic, and not constant (so losses are not 0)."""
    rewards = []
    for completion in completions:
        words = completion.split()
        rewards.append(sum(word[1:].isdigit() and int(word[1:]) % 2 == 0 for word in words) / max(len(words), 1))
    return rewards


def grpo_config(output_dir: str, device: str, **overrides) -> GRPOConfig:
    values = dict(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        num_generations=2,
        report_to=[],
        use_cpu=device == "cpu",
        bf16=device != "cpu",  # GRPOConfig defaults to bf16; on CPU we measure fp32
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return GRPOConfig(**values)


def make_trainer(path: str, model, device: str, output_dir: str):
    """A GRPOTrainer (`trl`) or PrefixGroupedGRPOTrainer (`grouped`) around `model`, to call its log-prob method."""
    trainer_cls = GRPOTrainer if path == "trl" else PrefixGroupedGRPOTrainer
    return trainer_cls(
        model=model,
        reward_funcs=even_token_reward,
        args=grpo_config(output_dir, device),
        train_dataset=Dataset.from_dict({"prompt": ["w4 w5 w6"] * 4}),
        processing_class=word_tokenizer(model.config.get_text_config().vocab_size),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Micro-batches


@dataclass(frozen=True)
class Point:
    """One micro-batch: `num_groups` prompts of `prompt_len` tokens, each with `group_size` completions of
    `completion_len` tokens (rows of a group adjacent, as PrefixGroupedGRPOTrainer's group shuffle leaves them)."""

    prompt_len: int
    completion_len: int
    group_size: int
    num_groups: int = 1

    @property
    def rows(self) -> int:
        return self.group_size * self.num_groups

    def label(self) -> str:
        groups = f" x{self.num_groups} groups" if self.num_groups > 1 else ""
        return f"P={self.prompt_len} C={self.completion_len} G={self.group_size}{groups}"


def make_micro_batch(point: Point, vocab_size: int, device: str = "cpu", seed: int = 0):
    """
    `input_ids (B, L)`, `attention_mask (B, L)`, `logits_to_keep`, as TRL passes them to its log-prob method
    (`L = prompt_len + completion_len`; every completion is full length, so the repeated forward carries no padding).
    """
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(NUM_SPECIAL_TOKENS, vocab_size, (point.num_groups, point.prompt_len), generator=generator)
    completions = torch.randint(
        NUM_SPECIAL_TOKENS, vocab_size, (point.rows, point.completion_len), generator=generator
    )
    input_ids = torch.cat([prompts.repeat_interleave(point.group_size, dim=0), completions], dim=1)
    attention_mask = torch.ones_like(input_ids)
    return input_ids.to(device), attention_mask.to(device), point.completion_len


# ---------------------------------------------------------------------------------------------------------------------
# Memory probes


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM (peak resident set) to the current VmRSS (Linux >= 4.0, `echo 5 > /proc/self/clear_refs`)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def release_freed_memory() -> None:
    """
    Give memory that glibc keeps after `free()` back to the OS (`malloc_trim(0)`). Without it, a step reuses pages
    freed by model construction without growing RSS, and its peak is under-counted.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_mib() -> float:
    return _proc_status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    return _proc_status_kib("VmHWM") / 1024


@contextlib.contextmanager
def measure_peak(device: str, out: dict):
    """
    Peak memory of the block above what was resident before it, in MiB, into `out["peak_mib"]`.

    CPU: peak RSS (VmHWM after resetting it) minus RSS before, after handing freed heap pages back to the OS so that
    every page the block touches is counted. Run in a fresh process: the figure is the first step's, as it would be
    on a machine that runs nothing else. CUDA: `max_memory_allocated` minus allocated.
    """
    gc.collect()
    if device == "cpu":
        release_freed_memory()
        reset_peak_rss()
        before = rss_mib()
        yield
        out["peak_mib"] = peak_rss_mib() - before
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        yield
        torch.cuda.synchronize()
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 - before


# ---------------------------------------------------------------------------------------------------------------------
# The three paths


@contextlib.contextmanager
def per_group_attention_loop():
    """The CPU split attention without shared calls: every group its own two calls per layer (`grouped_loop`)."""
    from prefix_grouper_trl import attention

    saved = attention.MAX_CALL_KEY_ELEMENTS
    attention.MAX_CALL_KEY_ELEMENTS = 0
    try:
        yield
    finally:
        attention.MAX_CALL_KEY_ELEMENTS = saved


def make_logprob_fn(path: str, model, device: str, output_dir: str):
    """`fn(input_ids, attention_mask, logits_to_keep) -> (logps, entropies)`, both `(B, K)`, for one path."""
    if path == "reference":
        reference_adapter.enable_reference(model)
        return lambda ids, mask, keep: reference_adapter.reference_logps_and_entropies(model, ids, mask, keep)
    trainer = make_trainer("trl" if path == "trl" else "grouped", model, device, output_dir)
    if path == "trl":
        # The repeated-prompt baseline, called on a plain GRPOTrainer exactly as the equivalence tests call it.
        def method(*args, **kwargs):
            return GRPOTrainer._get_per_token_logps_and_entropies(trainer, *args, **kwargs)

    else:
        method = trainer._get_per_token_logps_and_entropies
    attention_rule = per_group_attention_loop if path == "grouped_loop" else contextlib.nullcontext

    def fn(ids, mask, keep):
        with attention_rule():  # the plan is built at the first layer of the forward; the backward reuses it
            logps, entropies, _ = method(trainer.model, ids, mask, keep, compute_entropy=True)
        return logps, entropies

    return fn


def make_step(fn, model, batch, seed: int = 1, chunks: int = 1):
    """
    One log-prob forward + backward, weighting log-probs and entropies by fixed random weights. With `chunks` > 1,
    the rows run as that many equal chunks (whole groups: rows of a group are adjacent and the chunk size is a multiple
    of the group size), one forward + backward each, gradients accumulating: the same loss and gradients.
    """
    input_ids, attention_mask, logits_to_keep = batch
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(input_ids.size(0), logits_to_keep, generator=generator).to(input_ids.device)
    completion_mask = attention_mask[:, -logits_to_keep:].to(weights.dtype)
    weights = weights * completion_mask
    pieces = list(zip(input_ids.chunk(chunks), attention_mask.chunk(chunks), weights.chunk(chunks),
                      weights.flip(0).chunk(chunks)))
    last = {}

    def step():
        losses, all_logps = [], []
        for ids, mask, logp_weights, entropy_weights in pieces:
            logps, entropies = fn(ids, mask, logits_to_keep)
            loss = (logps.float() * logp_weights).sum() + 0.01 * (entropies.float() * entropy_weights).sum()
            loss.backward()
            losses.append(loss.detach())
            all_logps.append(logps.detach())
        last["logps"] = torch.cat(all_logps)
        return sum(losses)

    return step, last


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def load_average() -> float:
    with contextlib.suppress(OSError):
        with open("/proc/loadavg") as loadavg:
            return float(loadavg.read().split()[0])
    return float("nan")


@dataclass
class Setup:
    """Model, micro-batch and one step of `path`, ready to run; `warm_step` runs the same path on a tiny batch."""

    path: str
    model: torch.nn.Module
    step: object
    warm_step: object
    last: dict


WARMUP_POINT = Point(prompt_len=24, completion_len=8, group_size=2, num_groups=2)


def prepare(path: str, point: Point, shape: str, device: str, output_dir: str, chunks: int = 1) -> Setup:
    if point.num_groups % chunks:
        raise ValueError(f"{point.label()}: {chunks} chunks do not split {point.num_groups} groups evenly")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = build_model(shape, device, dtype)
    fn = make_logprob_fn(path, model, device, output_dir)
    # A training run holds parameter gradients from its first step on; allocate them now so that every path's peak
    # is its activations and temporaries only.
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    step, last = make_step(fn, model, make_micro_batch(point, model.config.vocab_size, device), chunks=chunks)
    warm_step, _ = make_step(fn, model, make_micro_batch(WARMUP_POINT, model.config.vocab_size, device))
    return Setup(path, model, step, warm_step, last)


# glibc's mmap threshold starts at 128 KiB and rises (up to 32 MiB) each time a larger mmapped block is freed, so
# where a tensor's memory comes from depends on what ran before. Fixing it at the ceiling, where a long training
# process ends up anyway, makes the memory figure independent of the order of the paths.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 32 * 2**20


def pin_malloc_mmap_threshold() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


@dataclass
class PointCase:
    point: Point
    paths: tuple = PATHS
    shape: str = "cpu-small"
    device: str = "cpu"
    threads: int = 1
    rounds: int = 4
    slow_rounds: int = 2
    slow_step_s: float = 10.0
    very_slow_step_s: float = 60.0
    chunks: tuple = ()  # (path, chunks) pairs; paths not named run their micro-batch whole

    def chunks_of(self, path: str) -> int:
        return dict(self.chunks).get(path, 1)


def _timed_step(step, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of `step`."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _measured_first_step(setup: Setup, device: str) -> dict:
    memory: dict = {}
    with measure_peak(device, memory):
        wall, cpu = _timed_step(setup.step, device)
    return {"peak_mib": memory["peak_mib"], "first_step_s": wall, "first_cpu_s": cpu}


def _start_worker(case) -> None:
    if case.device == "cpu":
        torch.set_num_threads(case.threads)
        pin_malloc_mmap_threshold()


def run_memory_case(case: PointCase) -> dict:
    """
    Peak memory of the first full-size step of `case.paths[0]`, alone in a fresh process (see `IsolatedRunner`):
    build, one step on a tiny batch (one-time initialisations), then the measured step.
    """
    _start_worker(case)
    with tempfile.TemporaryDirectory() as output_dir:
        setup = prepare(case.paths[0], case.point, case.shape, case.device, output_dir,
                        chunks=case.chunks_of(case.paths[0]))
        setup.warm_step()
        result = _measured_first_step(setup, case.device)
        result["logps"] = setup.last["logps"].float().cpu().tolist()  # plain lists: tensors would cross by shared fd
    return result


def run_point_case(case: PointCase) -> dict:
    """
    Time every path at one point in one fresh process, and measure the memory of the first path (`trl`).

    1. Build every path (own model copy, same weights; parameter gradients pre-allocated); one step each on a tiny
       batch, so that one-time initialisations are not counted as memory nor time.
    2. The first path's first full-size step is measured for memory exactly as `run_memory_case` would (no other
       path has run a full-size step yet) and doubles as its warmup; the others get one unmeasured warmup step
       (their memory is measured alone by `run_memory_case`, which costs little for them).
    3. Time, interleaved: up to `rounds` rounds, each timing in turn every path that has rounds left, so that a change
       in the host's load slows every path of a round alike; the order rotates by one path each round. A path whose
       warmup step took over `slow_step_s` CPU seconds runs `slow_rounds` rounds (the median of 2 is their mean),
       over `very_slow_step_s` one: this bounds the sweep where GRPOTrainer's step takes minutes, while the fast
       paths, whose ratio to each other is the finer one, keep all their rounds.

    Returns per path: wall and CPU seconds per round, the first path's memory, log-probs max |diff| to the first path.
    """
    _start_worker(case)
    load_before = load_average()
    results = {}
    with tempfile.TemporaryDirectory() as output_dir:
        setups = [prepare(path, case.point, case.shape, case.device, output_dir, chunks=case.chunks_of(path))
                  for path in case.paths]
        for setup in setups:
            setup.warm_step()
        for index, setup in enumerate(setups):
            if index == 0:
                results[setup.path] = _measured_first_step(setup, case.device)
            else:
                wall, cpu = _timed_step(setup.step, case.device)
                results[setup.path] = {"first_step_s": wall, "first_cpu_s": cpu}
            results[setup.path].update(wall_s=[], cpu_s=[])
        first_logps = setups[0].last["logps"].float()
        rounds = {}
        for setup in setups:
            results[setup.path]["max_abs_logp_diff"] = (setup.last["logps"].float() - first_logps).abs().max().item()
            warmup_cpu = results[setup.path]["first_cpu_s"]
            rounds[setup.path] = (1 if warmup_cpu > case.very_slow_step_s
                                  else case.slow_rounds if warmup_cpu > case.slow_step_s else case.rounds)
        for index in range(max(rounds.values())):
            # Each round starts one path later: a path right after a large step (GRPOTrainer's frees gigabytes) runs
            # on colder caches and allocator state, and no path should always be the one that does.
            for setup in setups[index % len(setups):] + setups[: index % len(setups)]:
                if index < rounds[setup.path]:
                    wall, cpu = _timed_step(setup.step, case.device)
                    results[setup.path]["wall_s"].append(wall)
                    results[setup.path]["cpu_s"].append(cpu)
    return {"paths": results, "load_avg": (load_before, load_average()), "threads": torch.get_num_threads()}


# Peak memory of one step, to pick chunks (`plan_chunks`): a fixed part plus KiB per token fed, per path, fitted on
# `cpu-small` in fp32 (GRPOTrainer: 3543 MiB at P=512 C=128 G=8 x4 groups, 8330 MiB at P=4096 C=256 G=16; ours
# 3811 MiB and the reference 7433 MiB at P=512 C=128 G=8 x16 groups), rounded up.
PEAK_MEMORY_MODEL = {  # path -> (fixed GiB, KiB per token)
    "trl": (1.5, 110),
    "grouped": (0.5, 170),
    "grouped_loop": (0.5, 170),
    "reference": (0.5, 320),
}


def tokens_fed(path: str, point: Point) -> int:
    """Tokens through the decoder: every row whole (`trl`), the packed row (ours: P-1 + G*C per group, the last prompt
    token heading every suffix instead), the grouped rows (reference: P + G*C per group)."""
    if path == "trl":
        return point.rows * (point.prompt_len + point.completion_len)
    prefix = point.prompt_len - (path != "reference")
    return point.num_groups * (prefix + point.group_size * point.completion_len)


def plan_chunks(point: Point, paths, budget_gib: float, shape: str = "cpu-small") -> tuple:
    """
    `(path, chunks)` for the paths whose step would not fit in `budget_gib` (`PEAK_MEMORY_MODEL`, plus the
    log-probability tiles our CPU head keeps for the backward, `head.KEEP_ELEMENTS`): the fewest chunks of whole groups
    that divide the micro-batch evenly and fit, each path for itself. A chunk runs the same per-group work in a smaller
    micro-batch, which is what a user of that path would do on this host.
    """
    vocab = MODEL_SHAPES[shape]["vocab_size"]
    chunks = {}
    for path in paths:
        if path not in PEAK_MEMORY_MODEL:
            continue
        fixed, kib_per_token = PEAK_MEMORY_MODEL[path]
        for count in range(1, point.num_groups + 1):
            peak_gib = fixed + tokens_fed(path, point) / count * kib_per_token / 2**20
            positions = point.rows * point.completion_len // count
            if path in ("grouped", "grouped_loop") and grouped_head_passes(positions, vocab, on_cpu=True) == 3:
                peak_gib += positions * vocab * 4 / 2**30  # the log-probabilities kept for the backward
            if point.num_groups % count == 0 and peak_gib <= budget_gib:
                break
        if count > 1:
            chunks[path] = count
    return tuple(chunks.items())


class IsolatedRunner:
    """
    Runs each `Case` in a new process forked from a server that has imported torch/transformers/trl but run nothing
    (no threads, no allocations to inherit). Saves the ~10 s import per measurement that `subprocess` would cost.
    """

    def __init__(self):
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["benchmarks.common"])

    def run(self, function, case):
        with ProcessPoolExecutor(max_workers=1, mp_context=self.context, max_tasks_per_child=1) as pool:
            return pool.submit(function, case).result()


# ---------------------------------------------------------------------------------------------------------------------
# Analytic FLOP model


def split_lengths(point: Point, shape: str) -> tuple[list[int], list[list[int]], int]:
    """The point's packed row as the split attention's planner sees it: `(prefix_lens, suffix_lens, width)`, width
    being heads x head_dim."""
    cfg = MODEL_SHAPES[shape]
    width = cfg["num_attention_heads"] * cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    prefix_lens = [point.prompt_len - 1] * point.num_groups
    suffix_lens = [[point.completion_len] * point.group_size for _ in range(point.num_groups)]
    return prefix_lens, suffix_lens, width


def grouped_attention_pairs(point: Point, shape: str, loop: bool = False) -> int:
    """
    Query-key pairs per layer that `prefix_grouper_trl.attention.split_attention` computes for the point's packed row,
    padding and masked pairs included, as its own plan decides (`loop`: held to the per-group loop, `grouped_loop`).
    """
    from prefix_grouper_trl import attention

    prefix_lens, suffix_lens, width = split_lengths(point, shape)
    if loop:
        return attention._loop_pairs(prefix_lens, suffix_lens)
    return attention.planned_attention_pairs(prefix_lens, suffix_lens, width)


@dataclass
class FlopCount:
    """What one path computes for one micro-batch (forward + backward)."""

    linear_tokens: int  # tokens through the decoder layers' linear maps
    attention_pairs: int  # query-key pairs per layer the attention kernels compute (masked-out ones included)
    head_positions: int  # positions projected through the LM head
    head_passes: int  # LM-head GEMMs per position: 4 for TRL's fused head (forward, recompute, 2 grads), else 3
    flops: float = 0.0
    parts: dict = field(default_factory=dict)


def model_flop_constants(shape: str) -> dict:
    cfg = MODEL_SHAPES[shape]
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = hidden // heads
    linear_params_per_layer = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 3 * hidden * inter
    return dict(
        linear_params=layers * linear_params_per_layer,
        layers=layers,
        attention_width=heads * head_dim,
        head_params=cfg["vocab_size"] * hidden,
    )


def grouped_head_passes(positions: int, vocab: int, on_cpu: bool) -> int:
    """LM-head GEMMs per scored position of the grouped path: on a CPU its own head keeps the forward's tiles for the
    backward when all positions' log-probabilities fit `head.KEEP_ELEMENTS` (3 passes); otherwise, and with TRL's head,
    4."""
    return 3 if on_cpu and cpu_head.keeps_tiles(positions, vocab) else 4


def flop_counts(point: Point, shape: str, fused_head_scores_all: bool = True,
                chunks: dict | None = None) -> dict[str, FlopCount]:
    """
    FLOPs of one log-prob forward+backward for each path, counting what each actually feeds (see benchmarks/README.md):

        FLOPs = 6 * linear_params * linear_tokens                         (GEMMs: 2 forward + 4 backward per weight)
              + 12 * layers * (heads * head_dim) * attention_pairs         (QK^T and PV: 4 forward + 8 backward)
              + 2 * head_passes * vocab * hidden * head_positions

    `fused_head_scores_all`: TRL's fused head scores every input position when Triton is unavailable (CPU) and only
    the positions with a label on CUDA; it also stands for "on a CPU" in `grouped_head_passes`. `chunks`: path ->
    chunks the step runs in (`plan_chunks`); our head keeps its tiles or not per chunk.
    """
    if "layer_types" in MODEL_SHAPES[shape]:
        return hybrid_flop_counts(point, shape, fused_head_scores_all)
    P, C, G, groups = point.prompt_len, point.completion_len, point.group_size, point.num_groups
    rows = G * groups
    width = P + C
    our_head_passes = grouped_head_passes(rows * C // (chunks or {}).get("grouped", 1),
                                          MODEL_SHAPES[shape]["vocab_size"], fused_head_scores_all)
    counts = {
        # B rows of padded width L; no padding here, so SDPA runs is_causal: L(L+1)/2 pairs per row.
        "trl": FlopCount(
            linear_tokens=tokens_fed("trl", point),
            attention_pairs=rows * width * (width + 1) // 2,
            head_positions=rows * (width - 1) if fused_head_scores_all else rows * C,
            head_passes=4,
        ),
        # One packed row: the pairs the split attention's own plan computes (per group: the prefix causal, each
        # suffix's C queries x (P-1 + C) keys; groups sharing a call are padded to its longest, none here as all
        # groups are equal); the backbone hook hands the head only the scored positions.
        "grouped": FlopCount(
            linear_tokens=tokens_fed("grouped", point),
            attention_pairs=grouped_attention_pairs(point, shape),
            head_positions=rows * C,
            head_passes=our_head_passes,
        ),
        "grouped_loop": FlopCount(
            linear_tokens=tokens_fed("grouped_loop", point),
            attention_pairs=grouped_attention_pairs(point, shape, loop=True),
            head_positions=rows * C,
            head_passes=our_head_passes,
        ),
        # (num_groups, P + G*C) grouped rows; prefix causal, then per response C queries x (P + C) keys with a mask;
        # full logits at every position of the grouped rows.
        "reference": FlopCount(
            linear_tokens=tokens_fed("reference", point),
            attention_pairs=groups * (P * (P + 1) // 2) + rows * C * (P + C),
            head_positions=groups * (P + G * C),
            head_passes=3,
        ),
    }
    k = model_flop_constants(shape)
    for count in counts.values():
        count.parts = {
            "linear": 6 * k["linear_params"] * count.linear_tokens,
            "attention": 12 * k["layers"] * k["attention_width"] * count.attention_pairs,
            "head": 2 * count.head_passes * k["head_params"] * count.head_positions,
        }
        count.flops = float(sum(count.parts.values()))
    return counts


def _chunks_of(tokens: int, chunk: int) -> int:
    return -(-tokens // chunk) * chunk


def hybrid_flop_counts(point: Point, shape: str, fused_head_scores_all: bool = True) -> dict[str, FlopCount]:
    """
    FLOPs of one log-prob forward+backward of a hybrid shape (Gated DeltaNet and full-attention layers), per path.

    Each layer's linear maps (projections, MLP) are counted from the model's own parameter count (built on the meta
    device), times the tokens the layer is fed; full-attention layers add 4 * heads * head_dim per query-key pair;
    Gated DeltaNet layers add their depthwise convolution (2 * kernel * channels per token) and the chunked delta rule
    (chunk c = 64, per token and value head: 4c*dk for the two in-chunk QK products, c*(dk+dv) for the triangular
    solves, 2c*dv for the in-chunk read, 6*dk*dv for the state read, correction and update), on the sequence padded
    to whole chunks. Forward + backward = 3x the forward.

    Tokens fed: `trl` every row whole (B x L) to every layer; `grouped` the packed row (prefix once per group, G
    suffixes) to attention and MLPs, and to a Gated DeltaNet layer its two passes: the prefixes, one row per group
    (P-1 columns), then the suffixes, one row per completion (C columns), each padded to whole chunks.
    """
    cfg = MODEL_SHAPES[shape]
    P, C, G, groups = point.prompt_len, point.completion_len, point.group_size, point.num_groups
    rows, width = G * groups, P + C
    chunk, kernel = 64, cfg["linear_conv_kernel_dim"]
    dk, dv, value_heads = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"], cfg["linear_num_value_heads"]
    conv_channels = 2 * cfg["linear_num_key_heads"] * dk + value_heads * dv
    delta_rule_per_token = value_heads * (4 * chunk * dk + chunk * (dk + dv) + 2 * chunk * dv + 6 * dk * dv)
    attention_width = cfg["num_attention_heads"] * cfg["head_dim"]

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape))
    linear_params = {}
    for layer, layer_type in zip(model.model.layers, cfg["layer_types"]):
        params = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        linear_params[layer_type] = linear_params.get(layer_type, 0) + params
    num_attention = cfg["layer_types"].count("full_attention")
    num_deltanet = cfg["layer_types"].count("linear_attention")

    prefix = P - 1
    fed = {
        "trl": dict(tokens=tokens_fed("trl", point), deltanet_scan=rows * _chunks_of(width, chunk),
                    pairs=rows * width * (width + 1) // 2,
                    head=rows * (width - 1) if fused_head_scores_all else rows * C),
        "grouped": dict(tokens=tokens_fed("grouped", point),
                        deltanet_scan=groups * _chunks_of(prefix, chunk) + rows * _chunks_of(C, chunk),
                        pairs=groups * (prefix * (prefix + 1) // 2 + G * C * (prefix + C)), head=rows * C),
    }
    counts = {}
    for path, f in fed.items():
        passes = 4 if path == "trl" else grouped_head_passes(f["head"], cfg["vocab_size"], fused_head_scores_all)
        count = FlopCount(linear_tokens=f["tokens"], attention_pairs=f["pairs"], head_positions=f["head"],
                          head_passes=passes)
        count.parts = {
            "linear": 6 * sum(linear_params.values()) * f["tokens"],
            "attention": 12 * num_attention * attention_width * f["pairs"],
            "deltanet": 3 * num_deltanet * (
                delta_rule_per_token * f["deltanet_scan"] + 2 * kernel * conv_channels * f["tokens"]
            ),
            "head": 2 * passes * cfg["vocab_size"] * cfg["hidden_size"] * f["head"],
        }
        count.flops = float(sum(count.parts.values()))
        counts[path] = count
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# Result files


def _git(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`git *args` in this checkout (raises OSError without git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=check)


def _git_commit() -> str:
    """
    The code measured: HEAD of the checkout, plus `+dirty.<hash of the diff>` when prefix_grouper_trl/ has
    uncommitted changes. Outside a git checkout (e.g. a `git archive` snapshot), the BENCH_COMMIT environment
    variable, else "unknown".
    """
    try:
        head = _git("rev-parse", "--short", "HEAD").stdout.strip()
        diff = _git("diff", "HEAD", "--", "prefix_grouper_trl").stdout
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BENCH_COMMIT", "unknown")
    return head + (f"+dirty.{hashlib.sha1(diff.encode()).hexdigest()[:8]}" if diff else "")


def package_code_note(commits: list[str]) -> str:
    """Whether the package measured is the same at every commit of a run (a run can be added to later, `--run-id`):
    `prefix_grouper_trl/` compared with git between the commits (one with uncommitted changes counts as different)."""
    if len(commits) < 2:
        return ""
    if any("+dirty" in commit for commit in commits):
        return " (package code: some rows measured uncommitted changes)"
    first = commits[0]
    try:
        codes = {commit: _git("diff", "--quiet", first, commit, "--", "prefix_grouper_trl", check=False).returncode
                 for commit in commits[1:]}
    except OSError:
        codes = {}
    if not codes or any(code not in (0, 1) for code in codes.values()):
        return " (package code: these commits could not be compared here)"
    differs = [commit for commit, code in codes.items() if code == 1]
    if differs:
        return f" (package code differs between {first} and {', '.join(differs)})"
    return " (the same package code at all of them: they differ outside prefix_grouper_trl/)"


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} | {cpu} | {os.cpu_count()} cores",
        "commit": _git_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def append_csv(path: str, rows: list[dict]) -> None:
    """
    Append rows; the header is written when the file is new (columns are those of the first row). Columns the file
    does not have yet are added to its header, earlier rows leaving them empty (the file is rewritten once then).
    """
    if not rows:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fieldnames = list(rows[0].keys())
    if os.path.exists(path):
        with open(path, newline="") as existing:
            reader = csv.DictReader(existing)
            known = list(reader.fieldnames or [])
            new_columns = [name for row in rows for name in row if name not in known]
            if new_columns:
                old_rows = list(reader)
        fieldnames = known + list(dict.fromkeys(new_columns))
        if new_columns:
            with open(path, "w", newline="") as out:
                writer = csv.DictWriter(out, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(old_rows)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=fieldnames, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
