"""
Per-token log-probs, entropies and parameter gradients of the shared-prefix forward equal GRPOTrainer's repeated
forward on the same trainer, the same model and the same micro-batch (fp32: log-probs/entropies within 1e-5,
gradients within 1e-4 relative).
"""

import pytest
import torch
from helpers import (
    assert_close_verbose,
    grpo_args,
    make_batch,
    max_relative_diff,
    prompt_dataset,
    randomize_lora_b,
    tiny_model,
    tiny_tokenizer,
    token_count_reward,
)
from trl import GRPOTrainer

from prefix_grouper_trl import PrefixGroupedGRPOTrainer

# name -> (prompt_lens, completion_lens, group_of_row)
LAYOUT_CASES = {
    "one_group": ([6, 6, 6, 6], [3, 5, 1, 4], [0, 0, 0, 0]),
    "all_groups_of_size_1": ([5, 7, 3], [4, 2, 6], [0, 1, 2]),
    "uneven_groups": ([6, 6, 6, 4, 9, 9], [3, 5, 2, 4, 1, 6], [0, 0, 0, 1, 2, 2]),
    "different_prompt_lengths": ([2, 11, 11, 6, 6], [5, 3, 4, 2, 6], [0, 1, 1, 2, 2]),
    "empty_completions": ([5, 5, 5, 4, 4, 3], [3, 0, 2, 0, 0, 4], [0, 0, 0, 1, 1, 2]),
    "interleaved_groups": ([5, 8, 5, 3, 8, 5], [2, 3, 4, 5, 1, 2], [0, 1, 0, 2, 1, 0]),
    "prompt_of_one_token": ([1, 1, 4], [3, 2, 2], [0, 0, 1]),
    "same_prompt_in_two_groups": ([6, 6, 6, 6], [2, 4, 3, 1], [0, 0, 1, 1]),
    "shuffled_rows": ([9, 6, 4, 6, 9, 6], [6, 5, 4, 2, 1, 3], [2, 0, 1, 0, 2, 0]),
    # Groups whose suffixes are cheaper as a padded batch than as one rectangle (see attention.py), next to one
    # that is not.
    "batched_suffixes": ([7, 7, 7, 3, 7, 7, 3], [5, 1, 5, 2, 5, 4, 2], [0, 0, 0, 1, 0, 0, 1]),
    # Groups of very different lengths, so the CPU split attention's cost model puts them in separate calls (see
    # attention.py; at the tiny models' width a call costs 24k pairs, padding a prefix of 3-5 to 250 more):
    # prefixes {250, 239} and {3, 5} share calls; suffixes {group of 4-token prompts, 6-token, 1-token} and
    # {250, 239}. A one-token prompt (no prefix) shares a suffix call with groups that have one.
    "bucket_boundaries": (
        [4, 251, 6, 4, 1, 240, 4, 251, 6, 4, 1, 6, 4, 4],
        [20, 5, 4, 18, 3, 6, 20, 3, 4, 7, 5, 2, 20, 1],
        [1, 0, 2, 1, 4, 3, 1, 0, 2, 1, 4, 2, 1, 1],
    ),
}
MODELS = [
    ("qwen2", "sdpa"),
    ("qwen3", "sdpa"),
    ("llama", "sdpa"),
    ("mistral", "sdpa"),
    ("gemma", "sdpa"),
    ("qwen2", "eager"),
    ("gemma2", "eager"),  # attention softcapping, sliding window wider than the rows
    ("gemma3", "sdpa"),  # sliding/full layer mix, sliding window wider than the rows
]


def layout_batch(case: str, seed: int = 0):
    prompt_lens, completion_lens, groups = LAYOUT_CASES[case]
    input_ids, attention_mask, logits_to_keep = make_batch(prompt_lens, completion_lens, groups, seed=seed)
    if case == "same_prompt_in_two_groups":
        input_ids[2:, : input_ids.size(1) - logits_to_keep] = input_ids[0, : input_ids.size(1) - logits_to_keep]
    return input_ids, attention_mask, logits_to_keep


def make_trainer(tmp_path, arch="qwen2", attn="sdpa", model=None, **overrides):
    return PrefixGroupedGRPOTrainer(
        model=tiny_model(arch, attn) if model is None else model,
        reward_funcs=token_count_reward,
        args=grpo_args(tmp_path, **overrides),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
    )


def logps_and_grads(trainer, method, input_ids, attention_mask, logits_to_keep, seed=1, **kwargs):
    """Run one log-prob method, backpropagate a random weighting of log-probs and entropies, return everything."""
    trainer.model.zero_grad(set_to_none=True)
    logps, entropies, _ = method(
        trainer.model, input_ids, attention_mask, logits_to_keep, compute_entropy=True, **kwargs
    )
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(logps.shape, generator=generator)
    (logps * weights + entropies * weights.flip(0)).sum().backward()
    grads = {
        name: param.grad.detach().clone()
        for name, param in trainer.model.named_parameters()
        if param.requires_grad and param.grad is not None
    }
    return logps.detach(), entropies.detach(), grads


def assert_equivalent(trainer, input_ids, attention_mask, logits_to_keep, **kwargs):
    parent = lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(trainer, *a, **k)  # noqa: E731
    ref_logps, ref_entropies, ref_grads = logps_and_grads(
        trainer, parent, input_ids, attention_mask, logits_to_keep, **kwargs
    )
    logps, entropies, grads = logps_and_grads(
        trainer, trainer._get_per_token_logps_and_entropies, input_ids, attention_mask, logits_to_keep, **kwargs
    )
    assert_close_verbose("log-probs", logps, ref_logps, atol=1e-5)
    assert_close_verbose("entropies", entropies, ref_entropies, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        assert max_relative_diff(grads[name], ref_grads[name]) <= 1e-4, f"gradient of {name}"
    # The masked positions are exactly zero, as TRL leaves them.
    completion_mask = attention_mask[:, -logits_to_keep:].bool()
    assert (logps[~completion_mask] == 0).all() and (entropies[~completion_mask] == 0).all()


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: f"{m[0]}-{m[1]}")
def trainer(request, tmp_path_factory):
    arch, attn = request.param
    return make_trainer(tmp_path_factory.mktemp(arch), arch, attn)


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_matches_repeated_forward(trainer, case):
    assert_equivalent(trainer, *layout_batch(case))


def test_model_is_switched_to_the_dispatcher(trainer):
    assert trainer.model.config._attn_implementation.startswith("prefix_grouped_")


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing(tmp_path, use_reentrant):
    trainer = make_trainer(tmp_path)
    # What transformers' Trainer does when training starts with gradient_checkpointing=True.
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    trainer.model.train()
    assert trainer.model.is_gradient_checkpointing
    assert_equivalent(trainer, *layout_batch("uneven_groups"))


def test_chunked_old_and_reference_logps(tmp_path):
    """TRL chunks old/ref log-probs by `batch_size` rows; we chunk whole groups within the same token budget."""
    trainer = make_trainer(tmp_path)
    input_ids, attention_mask, logits_to_keep = layout_batch("interleaved_groups")
    for batch_size in (1, 2, 4):
        assert_equivalent(trainer, input_ids, attention_mask, logits_to_keep, batch_size=batch_size)


def test_peft_lora_reference_through_disabled_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    trainer = PrefixGroupedGRPOTrainer(
        model=tiny_model("qwen2"),
        reward_funcs=token_count_reward,
        args=grpo_args(tmp_path, beta=0.1),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    # A random adapter, so that disabling it changes the log-probs.
    randomize_lora_b(trainer.model)
    batch = layout_batch("uneven_groups")
    assert_equivalent(trainer, *batch)  # policy, LoRA gradients
    with trainer.model.disable_adapter():
        parent = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, *batch)[0]
        grouped = trainer._get_per_token_logps_and_entropies(trainer.model, *batch)[0]
    policy = trainer._get_per_token_logps_and_entropies(trainer.model, *batch)[0]
    assert_close_verbose("reference log-probs", grouped, parent, atol=1e-5)
    assert (grouped - policy).abs().max() > 1e-3, "the disabled adapter must change the log-probs"


def test_separate_reference_model(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    trainer = PrefixGroupedGRPOTrainer(
        model=str(model_dir),
        reward_funcs=token_count_reward,
        args=grpo_args(tmp_path / "out", beta=0.1, model_init_kwargs={"dtype": torch.float32}),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
    )
    assert trainer.ref_model is not None
    assert trainer.ref_model.config._attn_implementation.startswith("prefix_grouped_")
    batch = layout_batch("interleaved_groups")
    with torch.no_grad():
        parent = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.ref_model, *batch, batch_size=2)[0]
        grouped = trainer._get_per_token_logps_and_entropies(trainer.ref_model, *batch, batch_size=2)[0]
    assert_close_verbose("reference log-probs", grouped, parent, atol=1e-5)


def test_same_constructor_as_grpo_trainer():
    import inspect

    assert inspect.signature(PrefixGroupedGRPOTrainer.__init__) == inspect.signature(GRPOTrainer.__init__)


@pytest.mark.parametrize("overrides", [{"temperature": 0.7}, {"cast_lm_head_to_fp32": True, "temperature": 1.3}])
def test_fused_head_options(tmp_path, overrides):
    trainer = make_trainer(tmp_path, "qwen3", **overrides)
    assert_equivalent(trainer, *layout_batch("uneven_groups"))
