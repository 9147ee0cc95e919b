"""
Long runs do not accumulate memory: no layout, mask cache, hook or registry entry outlives the forward that made it,
and the process RSS stays flat over hundreds of steps.

RSS is read after `malloc_trim(0)` (glibc), so that it tracks live memory rather than the allocator's history of
freed blocks; without the trim, packed rows of varying length make it drift by ~25 MiB with no leak at all.

Two measurements, each with a stated bound:

- a real GRPO run of `TRAIN_STEPS` steps (policy, old-policy and reference log-probs all grouped): RSS between
  step `WARMUP_STEPS` and the end grows by at most `TRAIN_RSS_BOUND_MIB`;
- `LOOP_CALLS` direct calls of the log-prob method plus backward on random micro-batches of up to 16 rows of 260
  tokens, half of them chunked as for old/reference log-probs: growth after `LOOP_WARMUP` calls at most
  `LOOP_RSS_BOUND_MIB`.

Measured on the development machine: +0.9 MiB (training) and +0.4 MiB (loop); with one step's output graph kept
alive on purpose (a leak of ~150 KiB a step) the same measurements read +31 and +38 MiB, so the 8 MiB bounds
separate the two. Both tests also count live `GroupLayout` objects with the garbage collector: exactly zero once a
step is over (a leak of layouts alone is too small for RSS to show).
"""

import ctypes
import gc

import pytest
import torch
from helpers import grpo_args, prompt_dataset, tiny_model, tiny_tokenizer, token_count_reward
from transformers import AttentionInterface, TrainerCallback
from transformers.masking_utils import AttentionMaskInterface
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from prefix_grouper_trl import PrefixGroupedGRPOTrainer
from prefix_grouper_trl.layout import GroupLayout

psutil = pytest.importorskip("psutil")

TRAIN_STEPS = 260
WARMUP_STEPS = 60
TRAIN_RSS_BOUND_MIB = 8
LOOP_CALLS = 200
LOOP_WARMUP = 40
LOOP_RSS_BOUND_MIB = 8


def _malloc_trim():
    """glibc keeps freed heap pages; trimming first makes RSS track live memory instead of allocator history."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: measure RSS as it is
        return lambda: None
    return lambda: libc.malloc_trim(0)


_trim = _malloc_trim()


def rss_mib() -> float:
    _trim()
    return psutil.Process().memory_info().rss / 2**20


def live_layouts() -> int:
    gc.collect()
    return sum(isinstance(obj, GroupLayout) for obj in gc.get_objects())


def registry_sizes() -> tuple[int, int]:
    return len(AttentionInterface._global_mapping), len(AttentionMaskInterface._global_mapping)


class MemoryProbe(TrainerCallback):
    """RSS after every optimizer step; live layouts at a few steps (a gc scan is too slow for every step)."""

    def __init__(self, layout_checks_at):
        self.rss: list[float] = []
        self.layouts_at: dict[int, int] = {}
        self.layout_checks_at = set(layout_checks_at)

    def on_step_end(self, args, state, control, **kwargs):
        self.rss.append(rss_mib())
        if state.global_step in self.layout_checks_at:
            self.layouts_at[state.global_step] = live_layouts()


def test_training_run_memory_is_flat(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("qwen2").save_pretrained(model_dir)
    probe = MemoryProbe(layout_checks_at=(1, WARMUP_STEPS, TRAIN_STEPS))
    trainer = PrefixGroupedGRPOTrainer(
        model=str(model_dir),
        reward_funcs=token_count_reward,
        args=grpo_args(
            tmp_path / "out",
            max_steps=TRAIN_STEPS,
            per_device_train_batch_size=8,
            max_completion_length=8,
            beta=0.1,  # reference log-probs through the grouped forward too
            num_iterations=2,  # and old-policy log-probs
            steps_per_generation=2,
            model_init_kwargs={"dtype": "float32"},
            disable_tqdm=True,
        ),
        train_dataset=prompt_dataset(num_prompts=16, min_len=10, max_len=40),
        processing_class=tiny_tokenizer(),
        callbacks=[probe],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    registries = registry_sizes()
    trainer.train()

    assert trainer.state.global_step == TRAIN_STEPS
    assert probe.layouts_at == {1: 0, WARMUP_STEPS: 0, TRAIN_STEPS: 0}, f"live GroupLayouts: {probe.layouts_at}"
    warm = sum(probe.rss[WARMUP_STEPS - 10 : WARMUP_STEPS]) / 10
    end = sum(probe.rss[-10:]) / 10
    assert (
        end - warm <= TRAIN_RSS_BOUND_MIB
    ), f"RSS grew by {end - warm:.1f} MiB from step {WARMUP_STEPS} to {TRAIN_STEPS} (bound {TRAIN_RSS_BOUND_MIB} MiB)"
    # Nothing registered per step, no hook left on the backbone, grouping still on.
    assert registry_sizes() == registries
    backbone = trainer._transformers_model(trainer.model).base_model
    assert not backbone._forward_hooks
    assert trainer.model.config._attn_implementation == "prefix_grouped_sdpa"
    logged = [entry for entry in trainer.state.log_history if "prefix_grouper/tokens_saved_frac" in entry]
    assert len(logged) == TRAIN_STEPS


def random_micro_batch(generator: torch.Generator):
    """Up to 16 rows in up to 4 groups, prompts of 20-200 tokens, completions of 0-60: a large graph per call."""
    num_groups = int(torch.randint(1, 5, (1,), generator=generator))
    rows = []
    for _ in range(num_groups):
        prompt = torch.randint(4, 64, (int(torch.randint(20, 201, (1,), generator=generator)),), generator=generator)
        for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
            completion_len = int(torch.randint(0, 61, (1,), generator=generator))
            rows.append((prompt, torch.randint(4, 64, (completion_len,), generator=generator)))
    prompt_width = max(prompt.numel() for prompt, _ in rows)
    completion_width = max(max(completion.numel() for _, completion in rows), 1)
    input_ids = torch.zeros(len(rows), prompt_width + completion_width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, completion) in enumerate(rows):
        start = prompt_width - prompt.numel()
        end = prompt_width + completion.numel()
        input_ids[row, start:end] = torch.cat([prompt, completion])
        attention_mask[row, start:end] = 1
    order = torch.randperm(len(rows), generator=generator)
    return input_ids[order], attention_mask[order], completion_width


def test_repeated_log_prob_calls_free_everything(tmp_path):
    trainer = PrefixGroupedGRPOTrainer(
        model=tiny_model("qwen2"),
        reward_funcs=token_count_reward,
        args=grpo_args(tmp_path),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
    )
    generator = torch.Generator().manual_seed(0)
    registries = registry_sizes()
    rss = []
    for call in range(LOOP_CALLS):
        input_ids, attention_mask, logits_to_keep = random_micro_batch(generator)
        batch_size = None if call % 2 else max(1, input_ids.size(0) // 3)  # chunked, as for old/ref log-probs
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size, compute_entropy=True
        )
        (logps.sum() + entropies.sum()).backward()
        trainer.model.zero_grad(set_to_none=True)
        del logps, entropies
        rss.append(rss_mib())
        if call == LOOP_WARMUP:
            assert live_layouts() == 0, f"{live_layouts()} GroupLayouts alive after {call + 1} calls"
        # The sharing statistics are TRL metrics, cleared when training logs; drop them as the log would.
        for metrics in trainer._metrics.values():
            metrics.clear()

    assert live_layouts() == 0, f"{live_layouts()} GroupLayouts alive after {LOOP_CALLS} calls"
    assert registry_sizes() == registries
    assert not trainer._transformers_model(trainer.model).base_model._forward_hooks
    warm = sum(rss[LOOP_WARMUP - 10 : LOOP_WARMUP]) / 10
    end = sum(rss[-10:]) / 10
    assert (
        end - warm <= LOOP_RSS_BOUND_MIB
    ), f"RSS grew by {end - warm:.1f} MiB over calls {LOOP_WARMUP}-{LOOP_CALLS} (bound {LOOP_RSS_BOUND_MIB} MiB)"
