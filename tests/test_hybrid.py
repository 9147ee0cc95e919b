"""
Hybrid decoders (attention plus Gated DeltaNet, Mamba, Mamba2, short convolutions or lightning attention): the
shared-prefix forward runs every recurrent or convolutional mixer once over each prompt and continues each completion
from the prompt's state, and equals GRPOTrainer's repeated forward (fp32: log-probs/entropies within 1e-5, gradients
within 1e-4 relative). Models whose token mixing we cannot split are refused before they compute anything.
"""

import pytest
import torch
from helpers import (
    assert_close_verbose,
    CONFIGS,
    grpo_args,
    HYBRID_ARCHITECTURES,
    max_relative_diff,
    moderate_deltanet_decay,
    prompt_dataset,
    randomize_lora_b,
    tiny_model,
    tiny_tokenizer,
    token_count_reward,
)
from test_equivalence import LAYOUT_CASES, assert_equivalent, layout_batch, make_trainer
from transformers import AutoModelForCausalLM
from trl import GRPOTrainer

from prefix_grouper_trl import PrefixGroupedGRPOTrainer
from prefix_grouper_trl.mixers import mixer_modules
from prefix_grouper_trl.self_check import GroupedForwardMismatch

MIXER_KINDS = {
    "qwen3_5": "Gated DeltaNet",
    "qwen3_5_moe": "Gated DeltaNet",
    "qwen3_next": "Gated DeltaNet",
    "nemotron_h": "Mamba2",
    "granitemoehybrid": "Mamba2",
    "falcon_h1": "Mamba2",
    "bamba": "Mamba2",
    "jamba": "Mamba",
    "lfm2": "short convolution",
    "lfm3": "short convolution",
    "minimax": "lightning attention",
    "olmo_hybrid": "Gated DeltaNet",
    "zamba2": "Mamba2",
    "lfm2_moe": "short convolution",
}


@pytest.fixture(scope="module", params=HYBRID_ARCHITECTURES)
def hybrid_trainer(request, tmp_path_factory):
    return make_trainer(tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_matches_repeated_forward(hybrid_trainer, case):
    assert_equivalent(hybrid_trainer, *layout_batch(case))


def test_every_mixer_is_split_and_the_prompt_is_shared(hybrid_trainer):
    model = hybrid_trainer.model
    arch = next(arch for arch in HYBRID_ARCHITECTURES if isinstance(model.config, type(CONFIGS[arch]())))
    kinds = {kind.name for _, _, kind in mixer_modules(model)}
    assert kinds == {MIXER_KINDS[arch]}
    hybrid_trainer._metrics["train"].clear()
    assert_equivalent(hybrid_trainer, *layout_batch("one_group"))
    saved = hybrid_trainer._metrics["train"]["prefix_grouper/tokens_saved_frac"]
    assert saved and saved[-1] > 0.3  # 4 rows of a 6-token prompt: 3 of the 4 prompts are not fed


@pytest.mark.parametrize("arch", ["qwen3_5", "jamba", "nemotron_h"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing(tmp_path, arch, use_reentrant):
    """Checkpointed layers are recomputed in the backward, outside our forward: the mixers must still be split."""
    trainer = make_trainer(tmp_path, arch)
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    trainer.model.train()
    assert trainer.model.is_gradient_checkpointing
    assert_equivalent(trainer, *layout_batch("uneven_groups"))


@pytest.mark.parametrize("arch", ["qwen3_5", "jamba", "lfm2"])
def test_chunked_old_and_reference_logps(tmp_path, arch):
    trainer = make_trainer(tmp_path, arch)
    input_ids, attention_mask, logits_to_keep = layout_batch("interleaved_groups")
    for batch_size in (1, 2, 4):
        assert_equivalent(trainer, input_ids, attention_mask, logits_to_keep, batch_size=batch_size)


def test_lora_with_a_reference_through_the_disabled_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    trainer = PrefixGroupedGRPOTrainer(
        model=tiny_model("qwen3_5"),
        reward_funcs=token_count_reward,
        args=grpo_args(tmp_path, beta=0.1),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
        # Adapters on the Gated DeltaNet projections as well as on attention and MLP.
        peft_config=peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "in_proj_qkv", "in_proj_z", "out_proj", "up_proj"]
        ),
    )
    randomize_lora_b(trainer.model)
    batch = layout_batch("uneven_groups")
    assert_equivalent(trainer, *batch)
    with trainer.model.disable_adapter():
        parent = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, *batch)[0]
        grouped = trainer._get_per_token_logps_and_entropies(trainer.model, *batch)[0]
    policy = trainer._get_per_token_logps_and_entropies(trainer.model, *batch)[0]
    assert_close_verbose("reference log-probs", grouped, parent, atol=1e-5)
    assert (grouped - policy).abs().max() > 1e-3, "the disabled adapter must change the log-probs"


def test_text_only_batches_through_the_vision_language_class(tmp_path):
    """`Qwen3_5ForConditionalGeneration` (every Qwen3.5 checkpoint) on text-only batches shares like the text model."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen3_5Config(
        text_config=CONFIGS["qwen3_5"]().to_dict(),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2),
    )
    model = Qwen3_5ForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    moderate_deltanet_decay(model)
    trainer = PrefixGroupedGRPOTrainer(
        model=model,
        reward_funcs=token_count_reward,
        args=grpo_args(tmp_path),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
    )
    assert {kind.name for _, _, kind in mixer_modules(model)} == {"Gated DeltaNet"}
    for case in ("different_prompt_lengths", "interleaved_groups", "prompt_of_one_token"):
        assert_equivalent(trainer, *layout_batch(case))


# --- MoE: the load-balancing loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5_moe", "jamba", "qwen3_moe"])
@pytest.mark.parametrize("case", ["uneven_groups", "empty_completions", "different_prompt_lengths"])
def test_moe_aux_loss_is_the_repeated_forwards(tmp_path, arch, case):
    """
    With `output_router_logits`, TRL adds the router's load-balancing loss over every real token of the micro-batch,
    each prompt counted once per row. The grouped forward feeds each prompt once, so it weights the prompt's router
    statistics by the group's row count (and feeds the tokens that predict nothing); the loss and its gradients are
    then GRPOTrainer's, for hybrid and pure-attention MoE models alike.
    """
    trainer = make_trainer(tmp_path, arch)
    batch = layout_batch(case)
    parent = lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(trainer, *a, **k)  # noqa: E731

    def aux_and_grads(method):
        trainer.model.zero_grad(set_to_none=True)
        logps, _, aux_loss = method(trainer.model, *batch, compute_aux_loss=True)
        (logps.sum() + 10.0 * aux_loss).backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return logps.detach(), aux_loss.detach(), grads

    ref_logps, ref_aux, ref_grads = aux_and_grads(parent)
    logps, aux, grads = aux_and_grads(trainer._get_per_token_logps_and_entropies)
    assert_close_verbose("log-probs", logps, ref_logps, atol=1e-5)
    assert_close_verbose("aux loss", aux, ref_aux, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert max_relative_diff(grads[name], ref_grads[name]) <= 1e-4, f"gradient of {name}"


# --- Refused, with the cause named -------------------------------------------------------------------------------


def test_recurrent_gemma_is_refused_naming_its_layer_kind(tmp_path):
    with pytest.raises(ValueError, match=r"RecurrentGemmaForCausalLM has RG-LRU.*RecurrentGemmaRecurrentBlock.*"
                                         r"prefix_grouping=False"):
        make_trainer(tmp_path, "recurrent_gemma")
    # With grouping off it is GRPOTrainer.
    make_trainer(tmp_path, "recurrent_gemma", prefix_grouping=False)


def _expects_one_sequence_per_row(module, args, output):
    if output.shape[0] == 1:
        raise RuntimeError("this custom layer expects the batch's rows, not one packed row")


def test_a_layer_that_fails_on_a_packed_row_is_refused_with_its_error(tmp_path):
    model = tiny_model("qwen2")
    model.model.layers[0].mlp.register_forward_hook(_expects_one_sequence_per_row)
    expected = r"Qwen2ForCausalLM: its shared-prefix forward fails on a probe batch \(RuntimeError: this custom layer"
    with pytest.raises(GroupedForwardMismatch, match=expected + r".*prefix_grouping=False"):
        make_trainer(tmp_path, model=model)


@pytest.mark.parametrize("arch", ["mamba", "falcon_mamba", "mamba2"])
def test_attention_free_models_that_drop_the_layout_are_refused(tmp_path, arch):
    """MambaModel & co. call their blocks without `**kwargs`: the layout never reaches a mixer, so they are refused."""
    with pytest.raises(RuntimeError, match=r"ForCausalLM: the prefix-grouped layout reached 0 of its 2 Mamba2? "
                                           r"layers.*does not pass the keyword arguments.*prefix_grouping=False"):
        make_trainer(tmp_path, arch)


def _mix_neighbouring_positions(module, args, output):
    """Custom modeling code that nothing can recognise by name: each position also reads the previous one."""
    return output + 0.5 * torch.roll(output, shifts=1, dims=1)


def test_custom_token_mixing_is_refused_naming_the_module(tmp_path):
    model = tiny_model("qwen2")
    model.model.layers[1].mlp.register_forward_hook(_mix_neighbouring_positions)
    with pytest.raises(GroupedForwardMismatch, match=r"Qwen2ForCausalLM.*from model\.layers\.1\.mlp \(Qwen2MLP\).*"
                                                     r"tokens of one completion reach another.*prefix_grouping=False"):
        make_trainer(tmp_path, model=model)


def test_a_mixer_without_a_handler_is_refused_naming_it(tmp_path, monkeypatch):
    """A convolution mixer we had no handler for (here LFM2's, unregistered) is found by the self-check."""
    from prefix_grouper_trl import mixers

    monkeypatch.delitem(mixers._REGISTRY, "transformers.models.lfm2.modeling_lfm2.Lfm2ShortConv")
    with pytest.raises(GroupedForwardMismatch, match=r"Lfm2ForCausalLM.*model\.layers\.0\.conv.*\(Lfm2ShortConv\)"):
        make_trainer(tmp_path, "lfm2")


def test_attention_dropout_in_training_mode_is_not_a_mismatch(tmp_path):
    """The self-check compares without dropout: a model built for dropout trains grouped as usual."""
    torch.manual_seed(0)
    config = CONFIGS["qwen3_5"]()
    config.attention_dropout = 0.5
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    trainer = make_trainer(tmp_path, model=model)
    assert trainer.model.training
    assert trainer.model.config._attn_implementation.startswith("prefix_grouped_")


# --- Training -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3_5"])
def test_five_seeded_steps_same_losses_and_parameters(tmp_path, arch):
    """A Qwen3.5-shaped hybrid (Gated DeltaNet 3:1): generation, rewards, loss and optimizer are TRL's on both
    sides."""
    from test_training import run

    _, ref_losses, ref_params = run(GRPOTrainer, tmp_path, arch=arch)
    trainer, losses, params = run(PrefixGroupedGRPOTrainer, tmp_path, arch=arch)
    assert len(losses) == len(ref_losses) == 5
    for step, (loss, ref_loss) in enumerate(zip(losses, ref_losses)):
        assert abs(loss - ref_loss) <= 1e-5, f"step {step}: loss {loss} vs GRPOTrainer {ref_loss}"
    for name, ref in ref_params.items():
        assert (params[name] - ref).abs().max().item() <= 1e-5, f"parameter {name}"
    initial = dict(tiny_model(arch, seed=0).named_parameters())
    assert max((ref_params[n] - initial[n]).abs().max().item() for n in initial) > 1e-4, "the run must train"
    logged = [entry for entry in trainer.state.log_history if "prefix_grouper/tokens_saved_frac" in entry]
    assert logged and all(entry["prefix_grouper/tokens_saved_frac"] > 0.5 for entry in logged)
