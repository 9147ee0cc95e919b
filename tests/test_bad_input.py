"""Inputs and models the shared-prefix forward cannot handle exactly fail loudly, naming what to change."""

import pytest
import torch
from helpers import grpo_args, make_batch, prompt_dataset, tiny_model, tiny_tokenizer, token_count_reward
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from trl import GRPOConfig, GRPOTrainer

from prefix_grouper_trl import PrefixGroupedGRPOTrainer


def make_trainer(tmp_path, model, config_cls=None, **overrides):
    return PrefixGroupedGRPOTrainer(
        model=model,
        reward_funcs=token_count_reward,
        args=grpo_args(tmp_path, config_cls=config_cls, **overrides),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
    )


class KwargsDroppingAttention(Qwen2Attention):
    """Custom modeling code that does not pass `**kwargs` on to the attention interface."""

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        return super().forward(hidden_states, position_embeddings, attention_mask)


def test_model_that_drops_the_layout_is_detected(tmp_path):
    """Found by the self-check when the trainer is built, before anything is trained."""
    model = tiny_model("qwen2")
    for layer in model.model.layers:
        custom = KwargsDroppingAttention(model.config, layer.self_attn.layer_idx)
        custom.load_state_dict(layer.self_attn.state_dict())
        layer.self_attn = custom
    with pytest.raises(RuntimeError, match=r"Qwen2ForCausalLM.*reached 0 attention layer.*prefix_grouping=False"):
        make_trainer(tmp_path, model)


def test_unsupported_attention_implementation(tmp_path):
    model = tiny_model("qwen2", "sdpa")
    model.config._attn_implementation_internal = "paged|sdpa"  # a registered implementation we do not split
    with pytest.raises(ValueError, match=r"attn_implementation='paged\|sdpa'.*sdpa.*prefix_grouping=False"):
        make_trainer(tmp_path, model)


def test_sliding_window_shorter_than_a_row(tmp_path):
    model = tiny_model("mistral")
    trainer = make_trainer(tmp_path, model)  # its self-check probe (14 tokens a row) runs before the window shrinks
    model.config.sliding_window = 6
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 6
    short = make_batch([3, 3], [2, 2], [0, 0])  # rows of 5 tokens fit the window
    trainer._get_per_token_logps_and_entropies(trainer.model, *short)
    with pytest.raises(ValueError, match=r"sliding window of 6 tokens.*\(9 tokens\).*prefix_grouping=False"):
        trainer._get_per_token_logps_and_entropies(trainer.model, *make_batch([5, 5], [4, 2], [0, 0]))


def test_plain_grpo_config_is_a_drop_in_with_grouping_on(tmp_path):
    trainer = make_trainer(tmp_path, tiny_model("qwen2"), config_cls=GRPOConfig)
    assert trainer.prefix_grouping and trainer.model.config._attn_implementation == "prefix_grouped_sdpa"


def test_grouping_off_is_grpo_trainer(tmp_path):
    trainer = make_trainer(tmp_path, tiny_model("qwen2"), prefix_grouping=False)
    assert not trainer.prefix_grouping and not trainer.prefix_grouping_shuffle_groups
    assert trainer.model.config._attn_implementation == "sdpa"
    batch = make_batch([5, 5, 7], [3, 2, 4], [0, 0, 1])
    ours = trainer._get_per_token_logps_and_entropies(trainer.model, *batch, compute_entropy=True)
    parent = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, *batch, compute_entropy=True)
    assert torch.equal(ours[0], parent[0]) and torch.equal(ours[1], parent[1])


def test_generation_path_is_the_models_own_attention(tmp_path):
    """Without a layout (generation, evaluation), the dispatcher runs the base implementation bit for bit."""
    reference = tiny_model("qwen2")
    trainer = make_trainer(tmp_path, tiny_model("qwen2"))
    input_ids, attention_mask, _ = make_batch([5, 7], [3, 2], [0, 1])
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        got = trainer.model(input_ids=input_ids, attention_mask=attention_mask).logits
        expected_gen = reference.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4,
                                          do_sample=False, pad_token_id=0)
        got_gen = trainer.model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4,
                                         do_sample=False, pad_token_id=0)
    assert torch.equal(expected, got)
    assert torch.equal(expected_gen, got_gen)


def test_multimodal_batches_fall_back_with_one_warning(tmp_path):
    trainer = make_trainer(tmp_path, tiny_model("qwen2"))
    batch = make_batch([5, 5, 7], [3, 2, 4], [0, 0, 1])
    token_type_ids = torch.zeros_like(batch[0])  # as a vision-language batch carries
    parent = GRPOTrainer._get_per_token_logps_and_entropies(
        trainer, trainer.model, *batch, compute_entropy=True, token_type_ids=token_type_ids
    )
    with pytest.warns(UserWarning, match="multimodal inputs"):
        ours = trainer._get_per_token_logps_and_entropies(
            trainer.model, *batch, compute_entropy=True, token_type_ids=token_type_ids
        )
    assert torch.equal(ours[0], parent[0]) and torch.equal(ours[1], parent[1])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer._get_per_token_logps_and_entropies(trainer.model, *batch, token_type_ids=token_type_ids)
