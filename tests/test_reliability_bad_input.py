"""
Bad input, second part (the first is test_bad_input.py; padding and empty-batch errors of the layout itself are in
test_layout.py): encoder-decoder and bidirectional models, tensors on the wrong device, badly padded or empty batches
reaching the trainer, and NaN in the model.

Every error names what to change. NaN is never hidden where GRPOTrainer shows it, with one documented exception (a
NaN in the embedding of the pad token, which the grouped forward never reads); see docs/RELIABILITY.md.
"""

import pytest
import torch
from helpers import (
    assert_close_verbose,
    grpo_args,
    make_batch,
    prompt_dataset,
    tiny_model,
    tiny_tokenizer,
    token_count_reward,
)
from transformers import AutoModelForSeq2SeqLM, BartConfig, T5Config
from trl import GRPOTrainer

from prefix_grouper_trl import PrefixGroupedGRPOTrainer
from prefix_grouper_trl.integration import check_model_supported, enable_prefix_grouping
from prefix_grouper_trl.layout import build_group_layout, plan_row_chunks


def make_trainer(output_dir, model, **overrides):
    return PrefixGroupedGRPOTrainer(
        model=model,
        reward_funcs=token_count_reward,
        args=grpo_args(output_dir, **overrides),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
    )


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return make_trainer(tmp_path_factory.mktemp("bad-input"), tiny_model("qwen2"))


def parent_logps(trainer, model, *batch, **kwargs):
    return GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, *batch, compute_entropy=True, **kwargs)


def grouped_logps(trainer, model, *batch, **kwargs):
    return trainer._get_per_token_logps_and_entropies(model, *batch, compute_entropy=True, **kwargs)


# --- Models the shared-prefix forward cannot handle ---------------------------------------------------------------


def tiny_t5():
    config = T5Config(
        vocab_size=64,
        d_model=16,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        d_kv=8,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    return AutoModelForSeq2SeqLM.from_config(config)


def tiny_bart():
    config = BartConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
    )
    return AutoModelForSeq2SeqLM.from_config(config)


@pytest.mark.parametrize("make_model", [tiny_t5, tiny_bart], ids=["t5", "bart"])
def test_encoder_decoder_models_are_rejected_when_the_trainer_is_built(tmp_path, make_model):
    message = r"(T5|Bart)ForConditionalGeneration is an encoder-decoder model.*decoder-only.*prefix_grouping=False"
    model = make_model()
    with pytest.raises(ValueError, match=message):
        check_model_supported(model)
    with pytest.raises(ValueError, match=message):
        enable_prefix_grouping(model)
    assert not model.config._attn_implementation.startswith("prefix_grouped_"), "a rejected model stays unchanged"
    # TRL itself accepts the model here and fails only later, deep in generation; we fail at construction.
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, make_model())


@pytest.mark.parametrize("attribute, value", [("use_bidirectional_attention", True), ("is_causal", False)])
def test_bidirectional_models_are_rejected(attribute, value):
    model = tiny_model("qwen2")
    setattr(model.config, attribute, value)
    with pytest.raises(ValueError, match=r"Qwen2ForCausalLM uses bidirectional attention.*prefix_grouping=False"):
        enable_prefix_grouping(model)


# --- Inputs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "on_meta, message",
    [
        ("input_ids", r"input_ids is on meta but attention_mask on cpu; move both to the model's device"),
        ("attention_mask", r"input_ids is on cpu but attention_mask on meta; move both to the model's device"),
        ("both", r"on the meta device .*Pass real tensors on the model's device"),
    ],
)
@pytest.mark.parametrize("batch_size", [None, 1], ids=["one-chunk", "chunked"])
def test_tensors_on_another_device(trainer, on_meta, message, batch_size):
    input_ids, attention_mask, logits_to_keep = make_batch([5, 5, 4], [3, 2, 2], [0, 0, 1])
    if on_meta in ("input_ids", "both"):
        input_ids = input_ids.to("meta")
    if on_meta in ("attention_mask", "both"):
        attention_mask = attention_mask.to("meta")
    with pytest.raises(ValueError, match=message):
        grouped_logps(trainer, trainer.model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size)
    with pytest.raises(ValueError, match=message):
        build_group_layout(input_ids, attention_mask, logits_to_keep)
    with pytest.raises(ValueError, match=message):
        plan_row_chunks(input_ids, attention_mask, logits_to_keep, token_budget=8)


@pytest.mark.parametrize(
    "row, message",
    [
        (
            [1, 1, 1, 1, 0, 1, 1, 0],
            r"prompt_mask of row 1 is not left-padded.*pad prompt_mask on the left.*prefix_grouping=False",
        ),
        ([0, 1, 1, 1, 1, 0, 1, 1], r"completion_mask of row 1 is not right-padded.*prefix_grouping=False"),
        ([0, 0, 0, 0, 0, 1, 1, 1], r"Row 1 has an empty prompt"),
    ],
    ids=["prompt-right-padded", "completion-left-padded", "empty-prompt"],
)
def test_badly_padded_batch_reaching_the_trainer(trainer, row, message):
    input_ids, attention_mask, logits_to_keep = make_batch([5, 5], [3, 3], [0, 0])  # (2, 8), K = 3
    attention_mask[1] = torch.tensor(row)
    with pytest.raises(ValueError, match=message):
        grouped_logps(trainer, trainer.model, input_ids, attention_mask, logits_to_keep)


@pytest.mark.parametrize("batch_size", [None, 4])
def test_empty_batch_reaching_the_trainer(trainer, batch_size):
    input_ids, attention_mask, logits_to_keep = make_batch([5], [3], [0])
    with pytest.raises(ValueError, match="Empty batch: prefix grouping needs at least one row"):
        grouped_logps(trainer, trainer.model, input_ids[:0], attention_mask[:0], logits_to_keep, batch_size=batch_size)


# --- NaN ------------------------------------------------------------------------------------------------------------

NAN_TOKEN = 3  # make_batch draws real tokens from 4..63, so only the positions we set use it
# Two groups: rows 0-2 share prompt A (6 tokens), rows 3-4 share prompt B (5 tokens). The split attention runs group
# A's completions batched, one row per completion against [prompt | own completion], for short and long completions.
NAN_BATCHES = {
    "short": dict(prompt_lens=[6, 6, 6, 5, 5], completion_lens=[4, 3, 2, 4, 1], group_of_row=[0, 0, 0, 1, 1]),
    "long": dict(prompt_lens=[6, 6, 6, 5, 5], completion_lens=[8, 7, 8, 4, 1], group_of_row=[0, 0, 0, 1, 1]),
}
SUFFIX_PATHS = list(NAN_BATCHES)


def suffix_path_of_group_a(batch) -> str:
    from prefix_grouper_trl.attention import _batching_pays

    layout = build_group_layout(*batch)
    return "batched" if _batching_pays(layout.prefix_lens[0], layout.suffix_lens[0]) else "rectangle"


@pytest.fixture(scope="module")
def nan_trainer(tmp_path_factory):
    """A policy whose embedding of `NAN_TOKEN` is NaN: any position that reads the token's hidden state is NaN."""
    trainer = make_trainer(tmp_path_factory.mktemp("nan"), tiny_model("qwen2"))
    with torch.no_grad():
        trainer.model.model.embed_tokens.weight[NAN_TOKEN] = float("nan")
    return trainer


def nan_batch(where: str, suffix_path: str = "short"):
    input_ids, attention_mask, logits_to_keep = make_batch(**NAN_BATCHES[suffix_path])
    # Every multi-completion group is batched (attention.py), so both batches now take that path.
    assert suffix_path_of_group_a((input_ids, attention_mask, logits_to_keep)) == "batched"
    prompt_width = input_ids.size(1) - logits_to_keep
    if where == "prompt of group A":
        input_ids[0:3, prompt_width - 3] = NAN_TOKEN
    elif where == "completion of row 0":
        input_ids[0, prompt_width + 1] = NAN_TOKEN
    return input_ids, attention_mask, logits_to_keep


def assert_equal_where_finite(name, grouped, ref):
    """NaN exactly where the reference is NaN; the finite values as close as in the equivalence tests."""
    assert torch.equal(
        grouped.isnan(), ref.isnan()
    ), f"{name}: NaN at {grouped.isnan().int().tolist()}, GRPOTrainer's at {ref.isnan().int().tolist()}"
    finite = ~ref.isnan()
    assert_close_verbose(name, grouped[finite], ref[finite], atol=1e-5)


@pytest.mark.parametrize("suffix_path", SUFFIX_PATHS)
def test_nan_in_a_prompt_propagates_exactly_as_in_grpo_trainer(nan_trainer, suffix_path):
    batch = nan_batch("prompt of group A", suffix_path)
    ref_logps, ref_entropies, _ = parent_logps(nan_trainer, nan_trainer.model, *batch)
    logps, entropies, _ = grouped_logps(nan_trainer, nan_trainer.model, *batch)
    completion_mask = batch[1][:, -batch[2] :].bool()
    assert ref_logps[:3][completion_mask[:3]].isnan().all(), "every scored token of group A is NaN in GRPOTrainer"
    assert not ref_logps[3:].isnan().any()
    assert_equal_where_finite("log-probs", logps, ref_logps)
    assert_equal_where_finite("entropies", entropies, ref_entropies)


@pytest.mark.parametrize("suffix_path", SUFFIX_PATHS)
def test_nan_in_a_completion_is_never_hidden(nan_trainer, suffix_path):
    """
    Every position NaN in GRPOTrainer's output is NaN in ours, and the other group is untouched.
    """
    batch = nan_batch("completion of row 0", suffix_path)
    ref_logps, ref_entropies, _ = parent_logps(nan_trainer, nan_trainer.model, *batch)
    logps, entropies, _ = grouped_logps(nan_trainer, nan_trainer.model, *batch)
    assert ref_logps[0].isnan().any() and not ref_logps[1:].isnan().any()
    for name, grouped, ref in (("log-probs", logps, ref_logps), ("entropies", entropies, ref_entropies)):
        assert grouped[ref.isnan()].isnan().all(), f"{name}: a NaN of GRPOTrainer's output is hidden"
        assert_equal_where_finite(f"{name} of group B", grouped[3:], ref[3:])
        extra = grouped.isnan() & ~ref.isnan()
        assert not extra[3:].any(), f"{name}: NaN leaked into another group"


@pytest.mark.parametrize("suffix_path", SUFFIX_PATHS)
def test_nan_in_a_completion_stays_in_its_row(nan_trainer, suffix_path):
    batch = nan_batch("completion of row 0", suffix_path)
    ref_logps, _, _ = parent_logps(nan_trainer, nan_trainer.model, *batch)
    logps, _, _ = grouped_logps(nan_trainer, nan_trainer.model, *batch)
    assert_equal_where_finite("log-probs", logps, ref_logps)


def test_nan_in_the_pad_embedding_is_ignored_as_the_mask_says(tmp_path):
    """
    Documented difference: GRPOTrainer's forward reads pad positions as masked keys, and 0 x NaN makes every padded row
    NaN; the packed row has no pad positions, so ours gives exactly what the masks say, the output of the same model
    with any finite pad embedding.
    """
    trainer = make_trainer(tmp_path, tiny_model("qwen2"))
    batch = make_batch(**NAN_BATCHES["short"])  # pad id 0 left of group B, right of short completions
    clean_ref, clean_ref_entropies, _ = parent_logps(trainer, trainer.model, *batch)
    with torch.no_grad():
        trainer.model.model.embed_tokens.weight[0] = float("nan")
    ref_logps, _, _ = parent_logps(trainer, trainer.model, *batch)
    logps, entropies, _ = grouped_logps(trainer, trainer.model, *batch)
    assert ref_logps.isnan().any(), "GRPOTrainer's forward turns padded rows NaN"
    assert not logps.isnan().any() and not entropies.isnan().any()
    assert_close_verbose("log-probs", logps, clean_ref, atol=1e-5)
    assert_close_verbose("entropies", entropies, clean_ref_entropies, atol=1e-5)


@pytest.mark.parametrize("suffix_path", SUFFIX_PATHS)
@pytest.mark.parametrize(
    "where, grouped_loss_is_nan",
    [("prompt of group A", True), ("completion of row 0", True), ("pad embedding", False)],
)
def test_nan_in_the_training_loss(tmp_path, where, grouped_loss_is_nan, suffix_path):
    """TRL's loss, from each trainer's own `_compute_loss` on the same model: NaN reaches it as in GRPOTrainer."""
    model = tiny_model("qwen2")
    grouped = make_trainer(tmp_path / "grouped", model)
    repeated = make_trainer(tmp_path / "repeated", model, prefix_grouping=False)  # exactly GRPOTrainer's path
    with torch.no_grad():
        model.model.embed_tokens.weight[0 if where == "pad embedding" else NAN_TOKEN] = float("nan")
    input_ids, attention_mask, logits_to_keep = nan_batch(where, suffix_path)
    prompt_width = input_ids.size(1) - logits_to_keep
    inputs = {
        "prompt_ids": input_ids[:, :prompt_width],
        "prompt_mask": attention_mask[:, :prompt_width],
        "completion_ids": input_ids[:, prompt_width:],
        "completion_mask": attention_mask[:, prompt_width:],
        "advantages": torch.tensor([1.0, -0.5, -0.5, 0.5, -0.5]),
        "num_items_in_batch": attention_mask[:, prompt_width:].sum(),  # dapo normalises by the generation batch
    }
    model.eval()  # TRL's loss outside `train()`: no gradient-accumulation bookkeeping
    assert repeated._compute_loss(model, inputs).isnan()
    assert grouped._compute_loss(model, inputs).isnan().item() == grouped_loss_is_nan
