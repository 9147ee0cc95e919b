"""
Checkpoint and resume: a run stopped at step 3 and resumed from its checkpoint ends exactly where the uninterrupted
run does (parameters, optimizer state, logged metrics), with and without PEFT. Nothing of the grouped forward is
written into a checkpoint: the saved config keeps the model's own attention implementation, and a checkpoint saved
with prefix grouping resumes with `prefix_grouping=False` and with plain TRL `GRPOTrainer`.
"""

import json
from pathlib import Path

import pytest
from helpers import grpo_args, prompt_dataset, tiny_model, tiny_tokenizer, token_count_reward
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from prefix_grouper_trl import PrefixGroupedGRPOTrainer

TOTAL_STEPS = 6
STOP_AT = 3
# Metrics that measure the machine, not the run.
TIMING_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
# Written by the grouped forward into process memory only; none of these may appear in a checkpoint.
GROUPED_MARKERS = (b"prefix_grouped_", b"prefix_group_layout", b"_mask_cache", b"GroupLayout")


class StopAt(TrainerCallback):
    """Stops training after `step`, as a killed job would, after that step's checkpoint is written."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def make_trainer(output_dir, trainer_cls=PrefixGroupedGRPOTrainer, peft=False, callbacks=None, **overrides):
    values = dict(
        max_steps=TOTAL_STEPS,
        learning_rate=1e-2,  # large enough that every step moves the parameters visibly
        max_completion_length=6,
        save_strategy="steps",
        save_steps=STOP_AT,
        save_only_model=False,
    )
    values.update(overrides)
    config_cls = GRPOConfig if trainer_cls is GRPOTrainer else None
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    return trainer_cls(
        model=tiny_model("qwen2", seed=0),
        reward_funcs=token_count_reward,
        args=grpo_args(output_dir, config_cls=config_cls, **values),
        train_dataset=prompt_dataset(num_prompts=8),
        processing_class=tiny_tokenizer(),
        peft_config=peft_config,
        callbacks=callbacks,
    )


def trained_state(trainer):
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    optimizer = trainer.optimizer.state_dict()
    logs = [
        {key: value for key, value in entry.items() if key not in TIMING_KEYS}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    return params, optimizer, logs


def assert_same_state(actual, expected, atol=0.0, from_step=STOP_AT + 1, grouped_metrics=True):
    params, optimizer, logs = actual
    ref_params, ref_optimizer, ref_logs = expected
    assert params.keys() == ref_params.keys() and params
    for name, ref in ref_params.items():
        diff = (params[name] - ref).abs().max().item()
        assert diff <= atol, f"parameter {name} differs by {diff:.3g}"
    assert optimizer["param_groups"] == ref_optimizer["param_groups"]
    assert optimizer["state"].keys() == ref_optimizer["state"].keys() and optimizer["state"]
    for index, ref_state in ref_optimizer["state"].items():
        for key, ref_value in ref_state.items():
            value = optimizer["state"][index][key]
            diff = (value.double() - ref_value.double()).abs().max().item()
            assert diff <= atol, f"optimizer state {index}/{key} differs by {diff:.3g}"
    resumed = [entry for entry in logs if entry["step"] >= from_step]
    reference = [entry for entry in ref_logs if entry["step"] >= from_step]
    assert [entry["step"] for entry in resumed] == list(range(from_step, TOTAL_STEPS + 1))
    assert [entry["step"] for entry in reference] == [entry["step"] for entry in resumed]
    for entry, ref_entry in zip(resumed, reference):
        if not grouped_metrics:  # the sharing statistics are logged only by the grouped forward
            ref_entry = {key: value for key, value in ref_entry.items() if not key.startswith("prefix_grouper/")}
        assert entry.keys() == ref_entry.keys(), f"step {entry['step']}: logged keys differ"
        for key, ref_value in ref_entry.items():
            assert (
                abs(entry[key] - ref_value) <= atol * max(1.0, abs(ref_value)) * 10
            ), f"step {entry['step']}: {key} = {entry[key]} vs {ref_value}"


def grep_checkpoint(folder: Path, needles=GROUPED_MARKERS) -> list[str]:
    hits = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path.name}: {needle.decode()}" for needle in needles if needle in data]
    return hits


@pytest.fixture(scope="module", params=[False, True], ids=["full", "peft"])
def runs(request, tmp_path_factory):
    """The uninterrupted run and the run stopped at STOP_AT, with their output folders."""
    if request.param:
        pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("peft" if request.param else "full")
    full = make_trainer(root / "full", peft=request.param)
    full.train()
    stopped = make_trainer(root / "stopped", peft=request.param, callbacks=[StopAt(STOP_AT)])
    stopped.train()
    assert stopped.state.global_step == STOP_AT
    return dict(
        peft=request.param,
        full=trained_state(full),
        full_trainer=full,
        checkpoint=root / "stopped" / f"checkpoint-{STOP_AT}",
        root=root,
    )


def test_resume_ends_exactly_where_the_uninterrupted_run_does(runs):
    resumed = make_trainer(runs["root"] / "resumed", peft=runs["peft"])
    resumed.train(resume_from_checkpoint=str(runs["checkpoint"]))
    assert resumed.state.global_step == TOTAL_STEPS
    assert_same_state(trained_state(resumed), runs["full"])
    # The run really moved, so that equality means something.
    initial = dict(make_trainer(runs["root"] / "init", peft=runs["peft"]).model.named_parameters())
    params = runs["full"][0]
    assert max((params[name] - initial[name]).abs().max().item() for name in params) > 1e-3


def test_checkpoint_holds_nothing_of_the_grouped_forward(runs):
    checkpoint = runs["checkpoint"]
    assert grep_checkpoint(checkpoint) == []
    if runs["peft"]:
        assert (checkpoint / "adapter_config.json").is_file()
    else:
        saved = json.loads((checkpoint / "config.json").read_text())
        assert "prefix_grouped" not in json.dumps(saved)
        assert saved.get("_attn_implementation", saved.get("attn_implementation")) in (None, "sdpa")
        # The checkpoint loads with plain transformers, on the model's own attention.
        assert AutoConfig.from_pretrained(checkpoint)._attn_implementation in (None, "sdpa")
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        assert model.config._attn_implementation == "sdpa"
    # Saving did not switch the training model off the grouped forward.
    trainer = runs["full_trainer"]
    assert trainer.model.config._attn_implementation == "prefix_grouped_sdpa"


def test_final_save_model_config_has_the_base_attention(runs, tmp_path):
    trainer = runs["full_trainer"]
    trainer.save_model(str(tmp_path / "final"))
    assert grep_checkpoint(tmp_path / "final") == []
    assert trainer.model.config._attn_implementation == "prefix_grouped_sdpa"


@pytest.mark.parametrize("resume_with", ["grouping_off", "plain_grpo_trainer"])
def test_grouped_checkpoint_resumes_without_grouping(runs, resume_with):
    """
    The micro-batch is the whole generation batch here (4 rows = 1 prompt x 4 generations), so TRL's row shuffle and
    our group shuffle feed the same rows to the same step; the runs differ only by float rounding.
    """
    if resume_with == "grouping_off":
        resumed = make_trainer(runs["root"] / "off", prefix_grouping=False, peft=runs["peft"])
        assert resumed.model.config._attn_implementation == "sdpa"
    else:
        resumed = make_trainer(runs["root"] / "plain", trainer_cls=GRPOTrainer, peft=runs["peft"])
    resumed.train(resume_from_checkpoint=str(runs["checkpoint"]))
    assert resumed.state.global_step == TOTAL_STEPS
    assert_same_state(trained_state(resumed), runs["full"], atol=1e-5, grouped_metrics=False)
