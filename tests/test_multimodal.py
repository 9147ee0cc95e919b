"""
Vision-language prompts (Qwen2.5-VL, Qwen3-VL, Qwen3.5): the grouped forward runs the vision tower once per distinct
image or video and each prompt once, and its log-probs, entropies and gradients (vision tower included) equal
GRPOTrainer's repeated forward (fp32: 1e-5 on log-probs and entropies, 1e-4 relative on gradients).
"""

import warnings

import pytest
import torch
from helpers import (
    assert_close_verbose,
    grpo_args,
    image,
    make_vlm_batch,
    max_relative_diff,
    MORE_VLM_ARCHITECTURES,
    prompt_dataset,
    randomize_lora_b,
    text,
    tiny_tokenizer,
    tiny_vlm,
    token_count_reward,
    video,
    VLM_ARCHITECTURES,
)
from test_equivalence import logps_and_grads
from trl import GRPOTrainer

from prefix_grouper_trl import PrefixGroupedGRPOTrainer
from prefix_grouper_trl.layout import build_group_layout
from prefix_grouper_trl.multimodal import dedupe_blocks, prepare_visual_batch, row_visual_keys

# name -> (prompts, rows): prompts by name (see helpers.make_vlm_batch), rows as (prompt name, completion length).
VLM_CASES = {
    "one_group": ({"a": [text(1, 3), image(1, 2, 2), text(2, 2)]}, [("a", 3), ("a", 5), ("a", 1), ("a", 4)]),
    "interleaved_groups": (
        {"a": [text(1, 3), image(1, 2, 2)], "b": [image(2, 1, 2), text(3, 4)], "c": [text(4, 2), image(3, 2, 1)]},
        [("a", 3), ("b", 2), ("a", 4), ("c", 5), ("b", 1), ("c", 2), ("a", 2)],
    ),
    # Same tokens (and the same image size), other pixels: never one group.
    "same_text_other_image": (
        {"a": [text(1, 3), image(1, 2, 2), text(2, 2)], "b": [text(1, 3), image(2, 2, 2), text(2, 2)]},
        [("a", 3), ("b", 2), ("a", 4), ("b", 5)],
    ),
    "multi_image_prompt": (
        {
            "a": [image(1, 2, 2), text(1, 2), image(2, 1, 2), text(2, 1), image(1, 2, 2)],
            "b": [text(3, 2), image(2, 1, 2)],
        },
        [("a", 3), ("a", 2), ("b", 4), ("a", 1), ("b", 2)],
    ),
    # Images of different sizes, prompts of different lengths (left padding), a text-only prompt beside image prompts.
    "different_sizes_and_lengths": (
        {"a": [text(1, 1), image(1, 1, 1)], "b": [text(2, 9), image(2, 3, 2), text(3, 3)], "c": [text(4, 6)]},
        [("b", 3), ("a", 4), ("c", 2), ("b", 1), ("a", 2), ("c", 5)],
    ),
    "empty_completions": (
        {"a": [text(1, 3), image(1, 2, 2)], "b": [image(2, 1, 1), text(2, 2)]},
        [("a", 3), ("a", 0), ("b", 0), ("b", 0), ("a", 2)],
    ),
    # The same image in two prompts with different text: two groups, one vision-tower pass for the image.
    "same_image_other_text": (
        {"a": [text(1, 3), image(1, 2, 2)], "b": [text(2, 4), image(1, 2, 2)]},
        [("a", 3), ("b", 2), ("a", 4), ("b", 1)],
    ),
}


def make_vlm_trainer(tmp_path, arch, **overrides):
    return PrefixGroupedGRPOTrainer(
        model=tiny_vlm(arch),
        reward_funcs=token_count_reward,
        args=grpo_args(tmp_path, **overrides),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
    )


def repeated_forward(model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, **inputs):
    """GRPOTrainer's forward of one chunk, for inputs its signature does not take (videos)."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-logits_to_keep] = -100
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True, **inputs)
    return outputs.log_probs[:, -logits_to_keep:], outputs.entropy[:, -logits_to_keep:], None


class VisionPatches:
    """Counts the patch rows the vision tower receives."""

    def __init__(self, model):
        self.counts = []
        self.handle = model.model.visual.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        self.counts.append(args[0].size(0))

    def take(self) -> list[int]:
        counts, self.counts = self.counts, []
        return counts


def distinct_patches(inputs, pixel_key="pixel_values", grid_key="image_grid_thw") -> int:
    if inputs.get(pixel_key) is None:
        return 0
    sizes = inputs[grid_key].prod(-1).tolist()
    blocks = list(inputs[pixel_key].split(sizes))
    ids = dedupe_blocks(blocks, [tuple(grid) for grid in inputs[grid_key].tolist()])
    return sum(sizes[ids.index(content_id)] for content_id in set(ids))


def assert_vlm_equivalent(trainer, input_ids, attention_mask, logits_to_keep, inputs, reference=None, **kwargs):
    """Grouped vs repeated forward, and the vision tower sees each distinct image (and video) once per call."""
    if reference is None:
        reference = lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(trainer, *a, **k)  # noqa: E731
    patches = VisionPatches(trainer.model)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="PrefixGroupedGRPOTrainer")  # no silent fallback
            ref_logps, ref_entropies, ref_grads = logps_and_grads(
                trainer, reference, input_ids, attention_mask, logits_to_keep, **inputs, **kwargs
            )
            repeated_patches = sum(patches.take())
            logps, entropies, grads = logps_and_grads(
                trainer, trainer._get_per_token_logps_and_entropies, input_ids, attention_mask, logits_to_keep,
                **inputs, **kwargs,
            )
            grouped_patches = sum(patches.take())
    finally:
        patches.handle.remove()
    assert_close_verbose("log-probs", logps, ref_logps, atol=1e-5)
    assert_close_verbose("entropies", entropies, ref_entropies, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    assert any(name.startswith("model.visual.") for name in grads), "the vision tower must get gradients"
    for name in ref_grads:
        assert max_relative_diff(grads[name], ref_grads[name]) <= 1e-4, f"gradient of {name}"
    distinct = distinct_patches(inputs) + distinct_patches(inputs, "pixel_values_videos", "video_grid_thw")
    # Fewer when a prompt has no completion token to score: its images are not needed at all.
    expected = distinct if (attention_mask[:, -logits_to_keep:].sum(1) > 0).all() else grouped_patches
    assert grouped_patches == expected <= distinct, f"vision tower saw {grouped_patches} patches, {distinct} distinct"
    return repeated_patches, grouped_patches


@pytest.fixture(scope="module", params=VLM_ARCHITECTURES)
def vlm_trainer(request, tmp_path_factory):
    trainer = make_vlm_trainer(tmp_path_factory.mktemp(request.param), request.param)
    trainer.test_arch = request.param
    return trainer


def vlm_arch(trainer) -> str:
    return trainer.test_arch


@pytest.mark.parametrize("case", list(VLM_CASES))
def test_matches_repeated_forward(vlm_trainer, case):
    prompts, rows = VLM_CASES[case]
    batch = make_vlm_batch(vlm_arch(vlm_trainer), prompts, rows)
    repeated, grouped = assert_vlm_equivalent(vlm_trainer, *batch)
    if case != "empty_completions":
        assert grouped < repeated


@pytest.mark.parametrize("arch", MORE_VLM_ARCHITECTURES)
def test_other_registered_families(tmp_path, arch):
    """Qwen2-VL and the MoE variants go through the same interface: one mixed case each, images and videos."""
    trainer = make_vlm_trainer(tmp_path, arch)
    prompts = {
        "a": [text(1, 3), image(1, 2, 2), video(1, 2, 1, 1)],
        "b": [text(1, 3), image(2, 2, 2), video(1, 2, 1, 1)],
    }
    input_ids, attention_mask, logits_to_keep, inputs = make_vlm_batch(arch, prompts, [("a", 3), ("b", 2), ("a", 4)])
    inputs.pop("num_images")
    assert_vlm_equivalent(trainer, input_ids, attention_mask, logits_to_keep, inputs, reference=repeated_forward)


def test_videos_and_images_together(vlm_trainer):
    """Videos go straight to the model (TRL's generation passes images only), next to images."""
    arch = vlm_arch(vlm_trainer)
    prompts = {
        "a": [text(1, 3), video(1, 2, 1, 2), text(2, 2)],
        "b": [text(1, 3), video(2, 2, 1, 2), text(2, 2), image(1, 2, 1)],
        "c": [video(1, 2, 1, 2), text(4, 1), image(3, 1, 2)],
    }
    rows = [("a", 3), ("b", 2), ("a", 4), ("c", 3), ("b", 1), ("c", 0), ("a", 2)]
    input_ids, attention_mask, logits_to_keep, inputs = make_vlm_batch(arch, prompts, rows)
    inputs.pop("num_images")  # not given for videos either: rows' items are found from their placeholders
    if arch == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.tensor([0.5, 2.0, 0.5, 0.5, 2.0, 0.5, 0.5])
    vlm_trainer.model.train()
    assert_vlm_equivalent(vlm_trainer, input_ids, attention_mask, logits_to_keep, inputs, reference=repeated_forward)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_chunked_old_and_reference_logps(vlm_trainer, batch_size):
    """TRL chunks old/ref log-probs by rows; a group split across chunks still encodes its image once per call."""
    prompts, rows = VLM_CASES["interleaved_groups"]
    batch = make_vlm_batch(vlm_arch(vlm_trainer), prompts, rows)
    assert_vlm_equivalent(vlm_trainer, *batch, batch_size=batch_size)


def test_same_text_other_image_is_never_one_group(vlm_trainer):
    prompts, rows = VLM_CASES["same_text_other_image"]
    input_ids, attention_mask, logits_to_keep, inputs = make_vlm_batch(vlm_arch(vlm_trainer), prompts, rows)
    prompt_width = input_ids.size(1) - logits_to_keep
    assert torch.equal(input_ids[0, :prompt_width], input_ids[1, :prompt_width])  # same tokens
    visual = prepare_visual_batch(vlm_trainer.model, input_ids, attention_mask, logits_to_keep, inputs)
    assert visual.group_ids.tolist() == [0, 1, 0, 1]
    layout = build_group_layout(input_ids, attention_mask, logits_to_keep, group_ids=visual.group_ids)
    assert layout.num_groups == 2


def test_generation_batch_shuffle_keeps_images_apart():
    """TRL's shuffle sees `pixel_values` as one tensor per row: rows group by text and pixels."""
    blocks = [torch.ones(4, 3), torch.zeros(4, 3), torch.ones(4, 3), torch.zeros(4, 3), torch.ones(2, 3)]
    grids = [torch.tensor([[1, 2, 2]])] * 4 + [torch.tensor([[1, 1, 2]])]
    keys = row_visual_keys({"pixel_values": blocks, "image_grid_thw": grids})
    assert keys.squeeze(1).tolist() == [0, 1, 0, 1, 2]
    assert row_visual_keys({"pixel_values": None}) is None


def test_dedupe_is_exact():
    base = torch.randn(6, 4)
    nudged = base.clone()
    nudged[3, 2] += 1e-7
    nan = base.clone()
    nan[0, 0] = float("nan")
    assert dedupe_blocks([base, base.clone(), nudged, nan, nan]) == [0, 0, 1, 2, 3]


def test_completion_with_image_placeholders_falls_back(tmp_path):
    """Tool responses can put images inside a completion: no prompt owns them, so the batch is not grouped."""
    trainer = make_vlm_trainer(tmp_path, "qwen2_5_vl")
    prompts, rows = VLM_CASES["one_group"]
    input_ids, attention_mask, logits_to_keep, inputs = make_vlm_batch("qwen2_5_vl", prompts, rows)
    extra = torch.randn(4, inputs["pixel_values"].size(1))
    input_ids[0, -logits_to_keep] = trainer.model.config.image_token_id
    inputs["mm_token_type_ids"][0, -logits_to_keep] = 1
    inputs["pixel_values"] = torch.cat([inputs["pixel_values"][:16], extra, inputs["pixel_values"][16:]])
    inputs["image_grid_thw"] = torch.cat([inputs["image_grid_thw"][:1], torch.tensor([[1, 2, 2]]),
                                          inputs["image_grid_thw"][1:]])
    inputs["num_images"] = [2, 1, 1, 1]
    with pytest.warns(UserWarning, match="a completion holds image placeholder tokens"):
        logps = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, logits_to_keep,
                                                           **inputs)[0]
    parent = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, input_ids, attention_mask,
                                                            logits_to_keep, **inputs)[0]
    assert torch.equal(logps, parent)


def test_unsupported_family_falls_back_once_naming_the_class(tmp_path):
    import transformers as tf
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    config = tf.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=8, patch_size=4),
        text_config=dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
        image_token_id=60, vision_feature_layer=-1, image_seq_length=4,
    )
    trainer = PrefixGroupedGRPOTrainer(
        model=AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa"),
        reward_funcs=token_count_reward,
        args=grpo_args(tmp_path),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
    )
    input_ids = torch.tensor([[5, 60, 60, 60, 60, 7, 8, 9], [5, 60, 60, 60, 60, 7, 10, 11]])
    attention_mask = torch.ones_like(input_ids)
    inputs = {"pixel_values": torch.randn(1, 3, 8, 8).repeat(2, 1, 1, 1), "num_images": [1, 1]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            logps = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, 2, **inputs)
    messages = [str(w.message) for w in caught if "PrefixGroupedGRPOTrainer" in str(w.message)]
    assert len(messages) == 1 and "LlavaForConditionalGeneration" in messages[0]
    parent = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, input_ids, attention_mask, 2,
                                                            **inputs)
    assert torch.equal(logps[0], parent[0])


@pytest.mark.parametrize("use_reentrant", [False])
def test_gradient_checkpointing(tmp_path, use_reentrant):
    trainer = make_vlm_trainer(tmp_path, "qwen3_vl")
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    trainer.model.train()
    prompts, rows = VLM_CASES["interleaved_groups"]
    assert_vlm_equivalent(trainer, *make_vlm_batch("qwen3_vl", prompts, rows))


def test_peft_lora_with_reference(tmp_path):
    peft = pytest.importorskip("peft")
    trainer = PrefixGroupedGRPOTrainer(
        model=tiny_vlm("qwen2_5_vl"),
        reward_funcs=token_count_reward,
        args=grpo_args(tmp_path, beta=0.1),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "qkv", "fc1"]),
    )
    randomize_lora_b(trainer.model)
    prompts, rows = VLM_CASES["multi_image_prompt"]
    input_ids, attention_mask, logits_to_keep, inputs = make_vlm_batch("qwen2_5_vl", prompts, rows)
    parent = lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(trainer, *a, **k)  # noqa: E731
    ref = logps_and_grads(trainer, parent, input_ids, attention_mask, logits_to_keep, **inputs)
    ours = logps_and_grads(trainer, trainer._get_per_token_logps_and_entropies, input_ids, attention_mask,
                           logits_to_keep, **inputs)
    assert_close_verbose("log-probs", ours[0], ref[0], atol=1e-5)
    assert any("visual" in name for name in ours[2]), "LoRA on the vision tower gets gradients"
    for name in ref[2]:
        assert max_relative_diff(ours[2][name], ref[2][name]) <= 1e-4, f"gradient of {name}"
    with trainer.model.disable_adapter(), torch.no_grad():
        parent_ref = parent(trainer.model, input_ids, attention_mask, logits_to_keep, **inputs)[0]
        grouped_ref = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask,
                                                                 logits_to_keep, **inputs)[0]
    assert_close_verbose("reference log-probs", grouped_ref, parent_ref, atol=1e-5)
    assert (grouped_ref - ours[0]).abs().max() > 1e-3


def run_vlm_training(trainer_cls, tmp_path, model_dir, **overrides):
    from trl import GRPOConfig

    from prefix_grouper_trl.demo import colour_reward, load_builtin_dataset
    from prefix_grouper_trl.demo.vision_processor import load_colour_processor

    # Plain SGD: Adam divides each gradient by its own size, so a tiny one moves as much as a large one. Measured with
    # AdamW: gradients agree to 1.3e-6 of the largest, but a patch-embedding entry of 3e-8 (the largest is 6e-2)
    # differs by 1e-8 from float32 summation order, and g / (|g| + 1e-8) turns that into 1e-4 of the step.
    values = dict(max_steps=3, learning_rate=0.5, optim="sgd", per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=3, temperature=1.0)
    values.update(overrides)
    config_cls = GRPOConfig if trainer_cls is GRPOTrainer else None
    args = grpo_args(tmp_path / trainer_cls.__name__, config_cls=config_cls, **values)
    args.model_init_kwargs = {"dtype": "float32"}
    dataset = load_builtin_dataset("builtin:colour-shapes", "num_train=64,num_test=0")["train"]
    trainer = trainer_cls(
        model=model_dir,
        reward_funcs=colour_reward,
        args=args,
        train_dataset=dataset,
        processing_class=load_colour_processor(model_dir),
    )
    patches = VisionPatches(trainer.model)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return trainer, losses, params, sum(patches.take())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        # A reference model, and old-policy log-probs computed over two micro-batches in chunks of TRL's batch size.
        dict(beta=0.1, num_iterations=2, steps_per_generation=2, gradient_accumulation_steps=2,
             per_device_train_batch_size=4, max_steps=2),
    ],
    ids=["plain", "reference-and-old-logps"],
)
def test_seeded_training_matches_grpo_trainer(tmp_path, monkeypatch, overrides):
    """`trainer.train()` with the offline processor on a tiny image dataset: GRPOTrainer's losses and parameters."""
    from prefix_grouper_trl.demo import materialize_builtin_model

    monkeypatch.setenv("PREFIX_GROUPER_TRL_HOME", str(tmp_path / "home"))
    model_dir = materialize_builtin_model("builtin:tiny-qwen2.5-vl")
    _, ref_losses, ref_params, ref_patches = run_vlm_training(GRPOTrainer, tmp_path, model_dir, **overrides)
    trainer, losses, params, patches = run_vlm_training(PrefixGroupedGRPOTrainer, tmp_path, model_dir, **overrides)
    assert len(losses) == len(ref_losses) == overrides.get("max_steps", 3)
    for step, (loss, ref_loss) in enumerate(zip(losses, ref_losses)):
        assert abs(loss - ref_loss) <= 1e-5, f"step {step}: loss {loss} vs GRPOTrainer {ref_loss}"
    initial = dict(tiny_vlm_from(model_dir).named_parameters())
    for name, ref in ref_params.items():
        assert (params[name] - ref).abs().max().item() <= 1e-5, f"parameter {name}"
    moved = {n: (ref_params[n] - initial[n]).abs().max().item() for n in initial}
    assert max(v for n, v in moved.items() if "visual" in n) > 1e-5
    logged = [entry for entry in trainer.state.log_history if "prefix_grouper/tokens_saved_frac" in entry]
    assert logged and all(entry["prefix_grouper/tokens_saved_frac"] > 0.5 for entry in logged)
    assert all(entry["prefix_grouper/mean_group_size"] == 4.0 for entry in logged)
    # Generation runs the vision tower on every row in both trainers; the log-prob forwards share each image.
    assert patches < ref_patches


def tiny_vlm_from(model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)


@pytest.mark.parametrize("arch", ["qwen3_vl_moe", "qwen3_5_moe_vl"])
def test_moe_aux_loss_with_images(tmp_path, arch):
    """`output_router_logits`: the load-balancing loss weights each shared prompt token by its group's rows."""
    trainer = make_vlm_trainer(tmp_path, arch)
    prompts = {"a": [text(1, 3), image(1, 2, 2)], "b": [text(2, 2), image(2, 1, 2)]}
    rows = [("a", 3), ("b", 2), ("a", 4), ("b", 0)]
    input_ids, attention_mask, logits_to_keep, inputs = make_vlm_batch(arch, prompts, rows)
    ours = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, logits_to_keep,
                                                      compute_aux_loss=True, **inputs)
    parent = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, input_ids, attention_mask,
                                                            logits_to_keep, compute_aux_loss=True, **inputs)
    assert_close_verbose("log-probs", ours[0], parent[0], atol=1e-5)
    assert_close_verbose("aux loss", ours[2], parent[2], atol=1e-6)
