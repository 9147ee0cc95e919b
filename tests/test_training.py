"""End to end: seeded GRPO runs with PrefixGroupedGRPOTrainer and GRPOTrainer give the same losses and parameters."""

import pytest
from helpers import grpo_args, prompt_dataset, tiny_model, tiny_tokenizer, token_count_reward
from trl import GRPOConfig, GRPOTrainer

from prefix_grouper_trl import PrefixGroupedGRPOTrainer


def run(trainer_cls, tmp_path, arch="qwen2", max_steps=5, **overrides):
    values = dict(
        max_steps=max_steps,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        temperature=1.0,
    )
    values.update(overrides)
    config_cls = GRPOConfig if trainer_cls is GRPOTrainer else None
    args = grpo_args(tmp_path / trainer_cls.__name__, config_cls=config_cls, **values)
    model_dir = tmp_path / f"init-{arch}"
    if not model_dir.exists():
        tiny_model(arch, seed=0).save_pretrained(model_dir)
    args.model_init_kwargs = {"dtype": "float32"}
    trainer = trainer_cls(
        model=str(model_dir),
        reward_funcs=token_count_reward,
        args=args,
        train_dataset=prompt_dataset(num_prompts=16, min_len=20, max_len=40),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return trainer, losses, params


def assert_same_run(tmp_path, **overrides):
    _, ref_losses, ref_params = run(GRPOTrainer, tmp_path, **overrides)
    trainer, losses, params = run(PrefixGroupedGRPOTrainer, tmp_path, **overrides)
    assert len(losses) == len(ref_losses) == overrides.get("max_steps", 5)
    for step, (loss, ref_loss) in enumerate(zip(losses, ref_losses)):
        assert abs(loss - ref_loss) <= 1e-5, f"step {step}: loss {loss} vs GRPOTrainer {ref_loss}"
    moved = 0.0
    for name, ref in ref_params.items():
        diff = (params[name] - ref).abs().max().item()
        assert diff <= 1e-5, f"parameter {name} differs by {diff}"
    initial = dict(tiny_model("qwen2", seed=0).named_parameters())
    moved = max((ref_params[n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 1e-4, "the run must actually train for the comparison to mean anything"
    return trainer


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_five_steps_same_losses_and_parameters(tmp_path, loss_type):
    trainer = assert_same_run(tmp_path, loss_type=loss_type)
    logged = [entry for entry in trainer.state.log_history if "prefix_grouper/tokens_saved_frac" in entry]
    assert logged and all(0.0 < entry["prefix_grouper/tokens_saved_frac"] < 1.0 for entry in logged)
    assert all(entry["prefix_grouper/mean_group_size"] == 4.0 for entry in logged)


def test_old_policy_logps_with_two_iterations(tmp_path):
    """
    num_iterations=2 with steps_per_generation=2: TRL computes old-policy log-probs over the 8-row generation batch in
    chunks of 4 rows, which we chunk by groups. Both micro-batches of a generation go into one optimizer step
    (gradient_accumulation_steps=2) and the dapo loss is normalised over the whole generation batch, so splitting the
    batch by groups (ours) or by rows (TRL) gives the same step.
    """
    assert_same_run(
        tmp_path, max_steps=4, num_iterations=2, steps_per_generation=2, gradient_accumulation_steps=2,
        per_device_train_batch_size=4, loss_type="dapo",
    )


def test_beta_with_reference_model_through_training(tmp_path):
    assert_same_run(tmp_path, max_steps=3, beta=0.1, loss_type="grpo")
