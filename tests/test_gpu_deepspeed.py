"""
DeepSpeed ZeRO-2 and ZeRO-3 on one GPU (skipped without CUDA): three GRPO steps of `PrefixGroupedGRPOTrainer` and of
TRL's `GRPOTrainer` in bf16 under DeepSpeed, against the same three steps of `GRPOTrainer` in fp32 without DeepSpeed
(the reference), on a Qwen2.5-0.5B-shaped model built from its config (hidden 896, 24 layers, 14 heads, 2 kv heads,
intermediate 4864, vocab 151936, tied embeddings; `PG_GPU_DS_LAYERS` takes fewer layers). For each step's loss and
gradient norm, and for the largest parameter difference at the end (STYLE habit 7)::

    |grouped_bf16 - ref_fp32| <= 2 * |grpo_trainer_bf16 - ref_fp32| + eps,   eps = max(1e-5, 2**-8 * |ref_fp32|)

The floor of one bf16 rounding step of the reference keeps a scalar from failing only because GRPOTrainer's bf16
value happened to round very close to the reference.

Same data in every run: each run really generates (under ZeRO-3 through TRL's gathered model, with the grouped
dispatcher's fallback to the model's own attention in the grouped run), then the test trainers replace the sampled
completions with fixed ones drawn from the prompt tokens (`FixedCompletionsMixin`), so that the bf16 runs and the fp32
reference train on the same tokens even after their weights start to differ. beta=0.04 puts the reference model under
DeepSpeed too.

Each run is a process of its own (`python tests/test_gpu_deepspeed.py --trainer ...`): DeepSpeed and accelerate keep
process-wide state. Single process, torch.distributed from the environment (RANK=0, WORLD_SIZE=1, MASTER_ADDR/PORT).
`--device cpu` runs the same worker on a CPU (fp32 only, gloo) for debugging the test itself.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
STEPS = 3
NUM_GENERATIONS = 4
MAX_COMPLETION = 16
VOCAB_WORDS = 1024
# Parameters compared at the end: embeddings (tied LM head), first and last attention/MLP, final norm.
TRACKED = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.v_proj.bias",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.{last}.self_attn.o_proj.weight",
    "model.layers.{last}.mlp.gate_proj.weight",
    "model.norm.weight",
)


def qwen25_05b_config(num_layers: int):
    from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=num_layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=True,
    )


def deepspeed_config(stage: int) -> dict:
    """ZeRO-`stage`, everything else "auto" (filled in from the GRPOConfig by transformers)."""
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "zero_allow_untested_optimizer": True,
    }


# --------------------------------------------------------------------------------------------------------------------
# The worker: one training run in this process.


class FixedCompletionsMixin:
    """Generate for real, then train on completions drawn from the prompt tokens (the same in every run)."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        sampled, _ = super()._generate_single_turn(
            prompt_ids, images, multimodal_fields, num_generations, has_tool_images
        )
        assert len(sampled) == len(prompt_ids) and all(isinstance(ids, list) for ids in sampled)
        self._fixed_completion_calls = getattr(self, "_fixed_completion_calls", 0) + 1
        completions = []
        for row, prompt in enumerate(prompt_ids):
            seed = (self._fixed_completion_calls * 1_000_003 + row * 7919 + sum(prompt) * 31 + len(prompt)) % 2**31
            generator = torch.Generator().manual_seed(seed)
            # Lengths 1 .. MAX_COMPLETION, so suffixes of very different lengths share a prompt.
            length = 1 + (row * 5 + self._fixed_completion_calls) % MAX_COMPLETION
            completions.append(torch.randint(4, VOCAB_WORDS, (length,), generator=generator).tolist())
        return completions, None


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB_WORDS)}, unk_token="t3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3", padding_side="left"
    )


def run_worker(args) -> dict:
    sys.path.insert(0, str(TESTS))
    from helpers import prompt_dataset, token_count_reward
    from trl import GRPOConfig, GRPOTrainer

    from prefix_grouper_trl import PrefixGroupedGRPOConfig, PrefixGroupedGRPOTrainer

    base_trainer, config_cls = (
        (PrefixGroupedGRPOTrainer, PrefixGroupedGRPOConfig) if args.trainer == "grouped" else (GRPOTrainer, GRPOConfig)
    )
    trainer_cls = type(f"Fixed{base_trainer.__name__}", (FixedCompletionsMixin, base_trainer), {})
    bf16 = args.precision == "bf16"
    config = config_cls(
        output_dir=args.output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=2 * NUM_GENERATIONS,  # two prompts per step
        num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION,
        temperature=1.0,
        beta=0.04,
        loss_type="dapo",
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        bf16=bf16,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=args.device == "cpu",
        deepspeed=deepspeed_config(args.zero) if args.zero else None,
        model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32, "attn_implementation": "sdpa"},
    )
    trainer = trainer_cls(
        model=args.model_dir,
        reward_funcs=token_count_reward,
        args=config,
        # Prompts of 48 to 96 tokens, four completions each.
        train_dataset=prompt_dataset(num_prompts=16, min_len=48, max_len=96),
        processing_class=word_tokenizer(),
    )
    trainer.train()

    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "trainer": args.trainer,
        "precision": args.precision,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else 0,
        "losses": [entry["loss"] for entry in history],
        "grad_norms": [entry["grad_norm"] for entry in history],
        "mean_group_size": [entry.get("prefix_grouper/mean_group_size") for entry in history],
        "tokens_saved_frac": [entry.get("prefix_grouper/tokens_saved_frac") for entry in history],
        "attn_implementation": trainer.accelerator.unwrap_model(trainer.model_wrapped).config._attn_implementation,
    }
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    last = model.config.num_hidden_layers - 1
    names = [name.format(last=last) for name in TRACKED]
    parameters = dict(model.named_parameters())
    tracked = [parameters[name] for name in names]
    gather = torch.no_grad()
    if result["zero_stage"] == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(tracked, modifier_rank=None)
    with gather:
        torch.save({name: p.detach().float().cpu().clone() for name, p in zip(names, tracked)}, args.params_out)
    return result


def parse_worker_args(argv=None):
    parser = argparse.ArgumentParser(description="One training run of the ZeRO test (see the module docstring).")
    parser.add_argument("--trainer", choices=("trl", "grouped"), required=True)
    parser.add_argument("--precision", choices=("bf16", "fp32"), required=True)
    parser.add_argument("--zero", type=int, choices=(0, 2, 3), default=0, help="0: no DeepSpeed")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--result", required=True, help="JSON file for losses, grad norms and metrics")
    parser.add_argument("--params-out", required=True, help="torch file for the tracked parameters after training")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------------
# The test: runs the workers and compares.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(tmp_path: Path, model_dir: Path, trainer: str, precision: str, zero: int, device: str = "cuda") -> dict:
    name = f"{trainer}-{precision}-zero{zero}"
    result, params = tmp_path / f"{name}.json", tmp_path / f"{name}.pt"
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
    )
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    command = [
        sys.executable, str(Path(__file__).resolve()), "--trainer", trainer, "--precision", precision,
        "--zero", str(zero), "--model-dir", str(model_dir), "--output-dir", str(tmp_path / name),
        "--result", str(result), "--params-out", str(params), "--device", device,
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    log = completed.stdout[-3000:] + "\n" + completed.stderr[-6000:]
    assert completed.returncode == 0, f"{name} failed:\n{log}"
    outcome = json.loads(result.read_text())
    outcome["params"] = torch.load(params)
    outcome["log_tail"] = log
    return outcome


def build_model_dir(path: Path, device: str = "cuda") -> Path:
    """The 0.5B-shaped model, random weights rounded to bf16 and saved in bf16 (fp32 runs load them exactly)."""
    from transformers import AutoModelForCausalLM

    num_layers = int(os.environ.get("PG_GPU_DS_LAYERS", "24"))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(qwen25_05b_config(num_layers), dtype=torch.bfloat16)
    model.save_pretrained(path)
    return path


def bf16_bound(name: str, grouped: float, trl: float, reference: float) -> None:
    eps = max(1e-5, 2**-8 * abs(reference))
    bound = 2 * abs(trl - reference) + eps
    assert abs(grouped - reference) <= bound, (
        f"{name}: |grouped - ref_fp32| = {abs(grouped - reference):.3g} > 2 * |GRPOTrainer_bf16 - ref_fp32| + eps = "
        f"{bound:.3g} (grouped {grouped:.8g}, GRPOTrainer {trl:.8g}, reference {reference:.8g})"
    )


def compare_runs(grouped: dict, trl: dict, reference: dict) -> list[str]:
    """Assert the bounds; return one line per compared quantity for the log."""
    lines = []
    for key, label in (("losses", "loss"), ("grad_norms", "grad norm")):
        assert len(grouped[key]) == len(trl[key]) == len(reference[key]) == STEPS, f"{key}: not {STEPS} steps"
        for step, (g, t, r) in enumerate(zip(grouped[key], trl[key], reference[key])):
            bf16_bound(f"step {step} {label}", g, t, r)
            lines.append(f"step {step} {label}: grouped {g:.6g} | GRPOTrainer {t:.6g} | fp32 reference {r:.6g}")
    for name, ref in reference["params"].items():
        grouped_diff = (grouped["params"][name] - ref).abs().max().item()
        trl_diff = (trl["params"][name] - ref).abs().max().item()
        bound = 2 * trl_diff + 1e-5
        assert grouped_diff <= bound, (
            f"{name}: max |grouped - ref_fp32| = {grouped_diff:.3g} > 2 * max |GRPOTrainer_bf16 - ref_fp32| + 1e-5 = "
            f"{bound:.3g}"
        )
        lines.append(f"{name}: max diff to fp32 reference: grouped {grouped_diff:.3g} | GRPOTrainer {trl_diff:.3g}")
    return lines


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("qwen2.5-0.5b-shaped") / "model")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, model_dir):
    return launch(tmp_path_factory.mktemp("reference"), model_dir, "trl", "fp32", 0)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_grouped_matches_grpo_trainer_within_the_bf16_error(tmp_path, model_dir, reference_run, stage):
    trl = launch(tmp_path, model_dir, "trl", "bf16", stage)
    grouped = launch(tmp_path, model_dir, "grouped", "bf16", stage)
    assert trl["zero_stage"] == grouped["zero_stage"] == stage
    assert grouped["attn_implementation"].startswith("prefix_grouped_")
    assert all(size == NUM_GENERATIONS for size in grouped["mean_group_size"]), grouped["mean_group_size"]
    assert all(0 < frac < 1 for frac in grouped["tokens_saved_frac"]), grouped["tokens_saved_frac"]
    lines = compare_runs(grouped, trl, reference_run)
    print(f"ZeRO-{stage}:\n  " + "\n  ".join(lines))


if __name__ == "__main__":
    worker_args = parse_worker_args()
    if worker_args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (use --device cpu to debug the worker)")
    outcome = run_worker(worker_args)
    Path(worker_args.result).write_text(json.dumps(outcome, indent=1))
    print(json.dumps(outcome))
