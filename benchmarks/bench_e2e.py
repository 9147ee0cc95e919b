"""
Whole GRPO training steps, generation included: GRPOTrainer vs PrefixGroupedGRPOTrainer.

    python -m benchmarks.bench_e2e             # P=2048 prompts, G=8, 128-token completions, 1 warmup + 3 steps each
    python -m benchmarks.bench_e2e --quick     # P=512, G=4, 32-token completions

Each trainer trains the same randomly initialised `cpu-small` model (see common.MODEL_SHAPES) on the same prompts
for the same seeded steps, in its own fresh process. Wrappers on the trainer instance time the parts of each step:

    generate   trainer._generate (tokenize prompts, transformers generate, decode)
    log-prob   trainer._get_per_token_logps_and_entropies (policy forward of the loss; old/ref forwards if any)
    backward   trainer.accelerator.backward
    other      the rest of the step (rewards, advantages, loss, optimizer step, logging)

The log-prob share of a step is (log-prob + backward) / step: the part prefix grouping can shrink. Results are
appended to `benchmarks/results/e2e.csv` and the run's table is written to `benchmarks/results/e2e_latest.md`.
"""

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback

from .common import (
    RESULTS_DIR,
    IsolatedRunner,
    append_csv,
    build_model,
    even_token_reward,
    environment,
    grpo_config,
    load_average,
    markdown_table,
    peak_rss_mib,
    pin_malloc_mmap_threshold,
    release_freed_memory,
    reset_peak_rss,
    rss_mib,
    word_tokenizer,
)

TRAINERS = ("trl", "grouped")
PARTS = ("generate", "logprob", "backward")


@dataclasses.dataclass
class E2ECase:
    trainer: str
    prompt_len: int = 2048
    completion_len: int = 128
    group_size: int = 8
    prompts_per_step: int = 1
    steps: int = 4  # the first is a warmup and is not reported
    shape: str = "cpu-small"
    threads: int = 1
    beta: float = 0.0
    seed: int = 0


def prompt_dataset(case: E2ECase, vocab_size: int) -> Dataset:
    """Distinct prompts of exactly `prompt_len` word tokens (the word-level tokenizer adds no special tokens)."""
    generator = torch.Generator().manual_seed(case.seed)
    count = case.steps * case.prompts_per_step
    ids = torch.randint(4, vocab_size, (count, case.prompt_len), generator=generator).tolist()
    return Dataset.from_dict({"prompt": [" ".join(f"w{i}" for i in row) for row in ids]})


class PartTimer(TrainerCallback):
    """Wall and CPU time of each optimizer step and of the wrapped parts inside it."""

    def __init__(self):
        self.steps, self.current, self._step_start = [], None, None

    def wrap(self, owner, name: str, part: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                if self.current is not None:
                    self.current[part] += time.perf_counter() - wall
                    self.current[part + "_cpu"] += time.process_time() - cpu

        setattr(owner, name, timed)

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = {key: 0.0 for part in PARTS for key in (part, part + "_cpu")}
        self._step_start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.current["step"] = time.perf_counter() - self._step_start[0]
        self.current["step_cpu"] = time.process_time() - self._step_start[1]
        self.steps.append(self.current)
        self.current = None
        if len(self.steps) == 1:  # after the warmup step: count the peak of the measured steps only
            release_freed_memory()
            reset_peak_rss()
            self.rss_after_warmup = rss_mib()


def run_e2e_case(case: E2ECase) -> dict:
    """Train `case.steps` steps with one trainer in this (fresh) process and return the per-step timings."""
    from prefix_grouper_trl import PrefixGroupedGRPOTrainer
    from trl import GRPOTrainer

    torch.set_num_threads(case.threads)
    pin_malloc_mmap_threshold()
    model = build_model(case.shape)
    tokenizer = word_tokenizer(model.config.vocab_size)
    rows = case.group_size * case.prompts_per_step
    timer = PartTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        if case.beta > 0:
            # TRL builds the reference model from the policy's `_name_or_path`, which a model made from a config
            # lacks: save the initial weights and point it there (the reference starts equal to the policy).
            initial = os.path.join(output_dir, "initial_model")
            model.save_pretrained(initial)
            model.config._name_or_path = initial
        args = grpo_config(
            output_dir,
            "cpu",
            per_device_train_batch_size=rows,
            num_generations=case.group_size,
            max_completion_length=case.completion_len,
            max_steps=case.steps,
            learning_rate=1e-5,
            beta=case.beta,
            logging_strategy="steps",
            logging_steps=1,
            seed=case.seed,
        )
        trainer_cls = GRPOTrainer if case.trainer == "trl" else PrefixGroupedGRPOTrainer
        trainer = trainer_cls(
            model=model,
            reward_funcs=even_token_reward,
            args=args,
            train_dataset=prompt_dataset(case, model.config.vocab_size),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # keep stdout to our summary; the logs stay in log_history
        timer.wrap(trainer, "_generate", "generate")
        timer.wrap(trainer, "_get_per_token_logps_and_entropies", "logprob")
        timer.wrap(trainer.accelerator, "backward", "backward")
        load_before = load_average()
        trainer.train()
        history = trainer.state.log_history
        completion_lens = [entry["completions/mean_length"] for entry in history if "completions/mean_length" in entry]
        losses = [entry["loss"] for entry in history if "loss" in entry]
    return {
        "steps": timer.steps,
        "peak_mib": peak_rss_mib() - timer.rss_after_warmup,
        "losses": losses,
        "mean_completion_len": statistics.mean(completion_lens) if completion_lens else float("nan"),
        "load_avg": (load_before, load_average()),
    }


def summarize(case: E2ECase, raw: dict) -> dict:
    measured = raw["steps"][1:] or raw["steps"]
    row = {"trainer": case.trainer, "steps_measured": len(measured)}
    for key in ("step", "step_cpu") + PARTS + tuple(part + "_cpu" for part in PARTS):
        row[key + "_s"] = round(statistics.median(step[key] for step in measured), 3)
    row["other_s"] = round(row["step_s"] - sum(row[part + "_s"] for part in PARTS), 3)
    row["logprob_share"] = round((row["logprob_s"] + row["backward_s"]) / row["step_s"], 3)
    row["logprob_share_cpu"] = round((row["logprob_cpu_s"] + row["backward_cpu_s"]) / row["step_cpu_s"], 3)
    row["peak_mib"] = round(raw["peak_mib"], 1)
    row["mean_completion_len"] = round(raw["mean_completion_len"], 1)
    row["losses"] = " ".join(f"{loss:.6g}" for loss in raw["losses"])
    row["load_avg_start"], row["load_avg_end"] = raw["load_avg"]
    return row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="P=512, C=32, G=4, 3 steps")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per trainer; the first is a warmup")
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (>0 adds the reference forward)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt_len, args.completion_len, args.group_size, args.steps = 512, 32, 4, 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import benchmarks.bench_e2e as this_module  # the worker must be picklable by its module name, not __main__

    env = environment()
    runner = IsolatedRunner()
    rows = []
    start = time.perf_counter()
    for trainer in TRAINERS:
        case = E2ECase(trainer, args.prompt_len, args.completion_len, args.group_size, args.prompts_per_step,
                       args.steps, threads=args.threads, beta=args.beta)
        raw = runner.run(this_module.run_e2e_case, case)
        row = {"run_id": env["date"], **env, "threads": args.threads, "prompt_len": case.prompt_len,
               "completion_len": case.completion_len, "group_size": case.group_size,
               "prompts_per_step": case.prompts_per_step, "beta": case.beta, **summarize(case, raw)}
        rows.append(row)
        print(f"{trainer}: step {row['step_s']:.2f}s (generate {row['generate_s']:.2f}, log-prob fwd "
              f"{row['logprob_s']:.2f}, backward {row['backward_s']:.2f}, other {row['other_s']:.2f}); "
              f"log-prob share {row['logprob_share']:.0%}; peak {row['peak_mib']:.0f} MiB; losses {row['losses']}",
              flush=True)
    append_csv(os.path.join(args.out_dir, "e2e.csv"), rows)

    trl_row, ours = rows
    headers = ["trainer", "step s", "step CPU s", "generate s", "log-prob fwd s", "backward s", "other s",
               "log-prob share", "peak MiB (steps 2+)"]
    table_rows = [[r["trainer"], r["step_s"], r["step_cpu_s"], r["generate_s"], r["logprob_s"], r["backward_s"],
                   r["other_s"], f"{r['logprob_share']:.0%}", f"{r['peak_mib']:.0f}"] for r in rows]
    logprob_work = {r["trainer"]: r["logprob_s"] + r["backward_s"] for r in rows}
    summary = (
        f"step speedup {trl_row['step_s'] / ours['step_s']:.2f}x "
        f"(CPU time {trl_row['step_cpu_s'] / ours['step_cpu_s']:.2f}x); "
        f"log-prob fwd+bwd speedup {logprob_work['trl'] / logprob_work['grouped']:.2f}x; "
        f"generation is {ours['generate_s'] / ours['step_s']:.0%} of a grouped step"
    )
    text = (
        f"GRPO steps, CPU, model `cpu-small`, {args.threads} thread(s), P={args.prompt_len} C={args.completion_len} "
        f"G={args.group_size}, {args.prompts_per_step} prompt(s) per step, beta={args.beta}; "
        f"median of steps 2..{args.steps}; run {env['date']}; {env['machine']}; commit {env['commit']}; "
        f"torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}\n\n"
        + markdown_table(headers, table_rows) + f"\n\n{summary}\n"
    )
    with open(os.path.join(args.out_dir, "e2e_latest.md"), "w") as out:
        out.write(text)
    print("\n" + text)
    print(f"took {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
