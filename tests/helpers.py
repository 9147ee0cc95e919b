"""Tiny models, an offline tokenizer and batch builders shared by the tests (no hub access anywhere)."""

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.models.gemma.configuration_gemma import GemmaConfig
from transformers.models.gemma2.configuration_gemma2 import Gemma2Config
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config

VOCAB_SIZE = 64
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=8),
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=8),
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=8, sliding_window=512, attn_logit_softcapping=50.0),
    "gemma3": lambda: Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=512),
}
ARCHITECTURES = ["qwen2", "qwen3", "llama", "mistral", "gemma"]


def _hybrid_configs():
    """Tiny hybrid decoders (attention plus recurrent or convolutional mixers), one per family, built from configs."""
    import transformers as tf

    base = {k: v for k, v in _COMMON.items() if k not in ("intermediate_size", "num_hidden_layers")}
    deltanet = dict(
        head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
    )
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
    attention_keys = ("num_attention_heads", "num_key_value_heads", "max_position_embeddings")
    no_attention = {k: v for k, v in base.items() if k not in attention_keys}
    no_attention["num_hidden_layers"] = 2
    mamba2 = dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4,
                  mamba_chunk_size=8)
    return {
        # Gated DeltaNet 3:1 with full attention, as in every Qwen3.5 checkpoint.
        "qwen3_5": lambda: tf.Qwen3_5TextConfig(
            **base, intermediate_size=64, num_hidden_layers=4, **deltanet,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
        ),
        "qwen3_5_moe": lambda: tf.Qwen3_5MoeTextConfig(
            **base, num_hidden_layers=2, **deltanet, **moe, layer_types=["linear_attention", "full_attention"],
        ),
        "qwen3_next": lambda: tf.Qwen3NextConfig(
            **base, intermediate_size=64, num_hidden_layers=2, **deltanet, **moe,
            layer_types=["linear_attention", "full_attention"],
        ),
        "nemotron_h": lambda: tf.NemotronHConfig(
            **base, intermediate_size=64, layers_block_type=["mamba", "attention", "mlp", "mamba"], head_dim=8,
            ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, conv_kernel=4, chunk_size=8,
        ),
        "granitemoehybrid": lambda: tf.GraniteMoeHybridConfig(
            **base, intermediate_size=64, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
            num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32, **mamba2,
        ),
        "falcon_h1": lambda: tf.FalconH1Config(
            **base, intermediate_size=64, num_hidden_layers=2, head_dim=8, mamba_d_ssm=32,
            **{**mamba2, "mamba_n_heads": 4},
        ),
        "jamba": lambda: tf.JambaConfig(
            **base, intermediate_size=64, num_hidden_layers=4, num_experts=4, num_experts_per_tok=2,
            expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,
            mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
        ),
        "lfm2": lambda: tf.Lfm2Config(
            **base, intermediate_size=64, num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"],
            conv_L_cache=3,
        ),
        "lfm3": lambda: tf.Lfm3Config(**base, intermediate_size=64, num_hidden_layers=3, head_dim=8, conv_L_cache=3),
        "bamba": lambda: tf.BambaConfig(
            **base, intermediate_size=64, num_hidden_layers=2, attn_layer_indices=[1], **mamba2,
        ),
        "minimax": lambda: tf.MiniMaxConfig(
            **base, intermediate_size=64, num_hidden_layers=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["linear_attention", "full_attention"], block_size=8,
        ),
        "recurrent_gemma": lambda: tf.RecurrentGemmaConfig(
            **{k: v for k, v in base.items() if k != "max_position_embeddings"}, intermediate_size=64,
            num_hidden_layers=3, lru_width=32, attention_window_size=512, conv1d_width=4,
            block_types=["recurrent", "attention", "recurrent"],
        ),
        "olmo_hybrid": lambda: tf.OlmoHybridConfig(
            **base, intermediate_size=64, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
        ),
        "zamba2": lambda: tf.Zamba2Config(
            **base, intermediate_size=64, num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "mamba"],
            mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=2, n_mamba_heads=8, chunk_size=8,
        ),
        "lfm2_moe": lambda: tf.Lfm2MoeConfig(
            **base, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3, num_dense_layers=1,
            num_experts=4, num_experts_per_tok=2, layer_types=["conv", "full_attention", "conv"], conv_L_cache=3,
        ),
        # Attention-free: every token mixer is a recurrence; their models do not pass `**kwargs` to their blocks.
        "mamba": lambda: tf.MambaConfig(**no_attention, state_size=8, expand=2, conv_kernel=4),
        "falcon_mamba": lambda: tf.FalconMambaConfig(**no_attention, state_size=8, expand=2, conv_kernel=4),
        "mamba2": lambda: tf.Mamba2Config(
            **no_attention, num_heads=8, head_dim=8, state_size=8, expand=2, conv_kernel=4, n_groups=2, chunk_size=8,
        ),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(
            **base, intermediate_size=64, num_hidden_layers=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=16,
        ),
    }


CONFIGS.update(_hybrid_configs())
HYBRID_ARCHITECTURES = [
    "qwen3_5", "qwen3_5_moe", "qwen3_next", "nemotron_h", "granitemoehybrid", "falcon_h1", "jamba", "lfm2", "lfm3",
    "bamba", "minimax", "olmo_hybrid", "zamba2", "lfm2_moe",
]


def moderate_deltanet_decay(model) -> None:
    """
    Gated DeltaNet decay rates in exp(uniform(-4.6, 0)) = [0.01, 1] instead of transformers' init range [0.01, 16].

    With rates up to 16 the state forgets within a token or two, and the gradients of `A_log`, `dt_bias` and
    `in_proj_a` are sums that cancel to ~1e-5 of their terms: GRPOTrainer's own gradients of them then move by ~4e-4
    relative from three extra columns of left padding (the fp32 chunked kernel's rounding), so a 1e-4 comparison
    would measure rounding, not the split.
    """
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("GatedDeltaNet"):
                module.A_log.copy_(torch.empty_like(module.A_log).uniform_(-4.6, 0.0, generator=generator))


def tiny_model(arch: str = "qwen2", attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    if arch in ("mamba", "falcon_mamba", "mamba2"):  # attention-free: no attention implementation to choose
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    moderate_deltanet_decay(model)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `t0 .. t63`, built in-process."""
    vocab = {f"t{i}": i for i in range(VOCAB_SIZE)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3", padding_side="left"
    )


def prompt_dataset(num_prompts: int = 4, min_len: int = 5, max_len: int = 12, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(num_prompts):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        tokens = torch.randint(4, VOCAB_SIZE, (length,), generator=generator).tolist()
        prompts.append(" ".join(f"t{t}" for t in tokens))
    return Dataset.from_dict({"prompt": prompts})


def token_count_reward(completions, **kwargs):
    """Deterministic reward: fraction of even token ids in the completion (any text works)."""
    rewards = []
    for completion in completions:
        words = completion.split()
        rewards.append(sum(int(w[1:]) % 2 == 0 for w in words if w[1:].isdigit()) / max(len(words), 1))
    return rewards


def make_batch(prompt_lens, completion_lens, group_of_row=None, width_prompt=None, width_completion=None, seed=0):
    """
    A TRL-style micro-batch: rows with `prompt_lens[i]` real prompt tokens (left-padded) and `completion_lens[i]`
    completion tokens (right-padded). Rows with the same `group_of_row` share the same prompt tokens.

    Returns `input_ids (B, L)`, `attention_mask (B, L)`, `logits_to_keep`.
    """
    generator = torch.Generator().manual_seed(seed)
    group_of_row = list(range(len(prompt_lens))) if group_of_row is None else group_of_row
    width_prompt = width_prompt or max(prompt_lens)
    width_completion = width_completion or max(max(completion_lens), 1)
    prompts = {}
    rows, masks = [], []
    for prompt_len, completion_len, group in zip(prompt_lens, completion_lens, group_of_row):
        if group not in prompts:
            prompts[group] = torch.randint(4, VOCAB_SIZE, (prompt_len,), generator=generator)
        prompt = prompts[group]
        assert prompt.numel() == prompt_len, "rows of one group need the same prompt length"
        completion = torch.randint(4, VOCAB_SIZE, (completion_len,), generator=generator)
        pad_left = width_prompt - prompt_len
        pad_right = width_completion - completion_len
        rows.append(torch.cat([torch.zeros(pad_left, dtype=torch.long), prompt, completion,
                               torch.zeros(pad_right, dtype=torch.long)]))
        masks.append(torch.cat([torch.zeros(pad_left), torch.ones(prompt_len + completion_len),
                                torch.zeros(pad_right)]).long())
    return torch.stack(rows), torch.stack(masks), width_completion


def grpo_args(output_dir, config_cls=None, **overrides):
    """GRPOConfig for CPU tests: fp32 (TRL defaults to bf16 autocast), no reporting, tiny generation."""
    from prefix_grouper_trl import PrefixGroupedGRPOConfig

    config_cls = config_cls or PrefixGroupedGRPOConfig

    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )
    values.update(overrides)
    return config_cls(**values)


def gpu_grouped_trainer(output_dir, model, dtype):
    """A PrefixGroupedGRPOTrainer around a model already on the GPU (bf16 mixed precision when `dtype` is bf16)."""
    from prefix_grouper_trl import PrefixGroupedGRPOTrainer

    return PrefixGroupedGRPOTrainer(
        model=model,
        reward_funcs=token_count_reward,
        args=grpo_args(output_dir, use_cpu=False, bf16=dtype == torch.bfloat16),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
    )


def assert_close_verbose(name, actual, expected, atol=0.0, rtol=0.0):
    """Assert |actual - expected| <= atol + rtol * |expected|, naming the tensor and its worst index."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    if excess.numel() and excess.max() > 0:
        worst = torch.unravel_index(excess.argmax(), excess.shape)
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{name}: worst at {worst}: got {actual[worst].item():.8g}, expected {expected[worst].item():.8g} "
            f"(|diff|={abs(actual[worst] - expected[worst]).item():.3g}, atol={atol}, rtol={rtol})"
        )


def max_relative_diff(actual, expected):
    """max |a - e| / max |e|: the gradient criterion of the equivalence tests."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------------------------------------------------
# Tiny vision-language models and their micro-batches
# ----------------------------------------------------------------------------------------------------------------------

IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_START_ID, VISION_END_ID = 60, 61, 62, 63
_PATCH, _TEMPORAL_PATCH, _MERGE = 2, 2, 2
PATCH_DIM = 3 * _TEMPORAL_PATCH * _PATCH * _PATCH


def _vlm_configs():
    import transformers as tf

    text = {k: v for k, v in _COMMON.items() if k != "num_hidden_layers"}
    ids = dict(image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
               vision_end_token_id=VISION_END_ID)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=_PATCH,
                  spatial_merge_size=_MERGE, temporal_patch_size=_TEMPORAL_PATCH, in_channels=3)
    mrope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    interleaved = {**mrope, "mrope_interleaved": True}
    deltanet = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                    linear_conv_kernel_dim=4)
    return {
        "qwen2_5_vl": lambda: tf.Qwen2_5_VLConfig(
            text_config=dict(**text, num_hidden_layers=2, rope_parameters=mrope),
            vision_config=dict(**vision, window_size=8, fullatt_block_indexes=[1]), **ids,
        ),
        "qwen3_vl": lambda: tf.Qwen3VLConfig(
            text_config=dict(**text, num_hidden_layers=2, head_dim=8, rope_parameters=interleaved),
            vision_config=dict(**vision, num_position_embeddings=64, deepstack_visual_indexes=[0]), **ids,
        ),
        # Gated DeltaNet 1:1 with full attention (every Qwen3.5 checkpoint is a hybrid).
        "qwen3_5_vl": lambda: tf.Qwen3_5Config(
            text_config=dict(**text, num_hidden_layers=2, head_dim=8, **deltanet,
                             layer_types=["linear_attention", "full_attention"],
                             rope_parameters={**interleaved, "partial_rotary_factor": 1.0}),
            vision_config=dict(**vision, num_position_embeddings=64), **ids,
        ),
        "qwen2_vl": lambda: tf.Qwen2VLConfig(
            text_config=dict(**text, num_hidden_layers=2, rope_parameters=mrope),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=4, patch_size=_PATCH,
                               spatial_merge_size=_MERGE, temporal_patch_size=_TEMPORAL_PATCH, in_channels=3),
            **ids,
        ),
        "qwen3_vl_moe": lambda: tf.Qwen3VLMoeConfig(
            text_config=dict(**text, num_hidden_layers=2, head_dim=8, rope_parameters=interleaved, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1),
            vision_config=dict(**vision, num_position_embeddings=64, deepstack_visual_indexes=[0]), **ids,
        ),
        "qwen3_5_moe_vl": lambda: tf.Qwen3_5MoeConfig(
            text_config=dict(**text, num_hidden_layers=2, head_dim=8, **deltanet, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=16, shared_expert_intermediate_size=16,
                             layer_types=["linear_attention", "full_attention"],
                             rope_parameters={**interleaved, "partial_rotary_factor": 1.0}),
            vision_config=dict(**vision, num_position_embeddings=64), **ids,
        ),
    }


VLM_CONFIGS = _vlm_configs()
# The families the issue names; the others registered in multimodal.py get one case each.
VLM_ARCHITECTURES = ["qwen2_5_vl", "qwen3_vl", "qwen3_5_vl"]
MORE_VLM_ARCHITECTURES = ["qwen2_vl", "qwen3_vl_moe", "qwen3_5_moe_vl"]
# Qwen3-VL and Qwen3.5 processors put a timestamp between the frames of a video, each frame its own placeholder run.
_FRAMES_SEPARATED = {"qwen3_vl", "qwen3_5_vl", "qwen3_vl_moe", "qwen3_5_moe_vl"}


def tiny_vlm(arch: str, attn_implementation: str = "sdpa", seed: int = 0):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(VLM_CONFIGS[arch](), attn_implementation=attn_implementation,
                                                    dtype=torch.float32)
    moderate_deltanet_decay(model)
    return model


def image(key: int, height: int, width: int) -> tuple:
    """A prompt part: an image of `height x width` merged tokens, its pixels drawn from seed `key`."""
    return ("image", key, 1, height, width)


def video(key: int, frames: int, height: int, width: int) -> tuple:
    """A prompt part: a video of `frames` temporal patches of `height x width` merged tokens each."""
    return ("video", key, frames, height, width)


def text(key: int, length: int) -> tuple:
    """A prompt part: `length` text tokens drawn from seed `key` (same key and length, same tokens)."""
    return ("text", key, length)


def make_vlm_batch(arch: str, prompts: dict, rows: list, width_completion=None, seed: int = 0, extra_prompt_pad=0):
    """
    A TRL-style vision-language micro-batch.

    Args:
        prompts: prompt name -> list of parts (`text(...)`, `image(...)`, `video(...)`).
        rows: `(prompt name, completion length)` per row.

    Returns `(input_ids, attention_mask, logits_to_keep, multimodal kwargs)`; the kwargs hold `pixel_values`,
    `image_grid_thw`, `num_images`, `mm_token_type_ids` as TRL passes them, and `pixel_values_videos`,
    `video_grid_thw` when a prompt has a video.
    """
    separated = arch in _FRAMES_SEPARATED

    def tokens_of(parts):
        tokens, types, images, videos = [], [], [], []
        for part in parts:
            if part[0] == "text":
                generator = torch.Generator().manual_seed(1000 + part[1])
                drawn = torch.randint(4, IMAGE_TOKEN_ID, (part[2],), generator=generator).tolist()
                tokens += drawn
                types += [0] * len(drawn)
                continue
            kind, key, frames, height, width = part
            per_frame = height * width
            grid = [frames, height * _MERGE, width * _MERGE]
            generator = torch.Generator().manual_seed(5000 + key)
            pixels = torch.randn(frames * height * width * _MERGE * _MERGE, PATCH_DIM, generator=generator)
            if kind == "image":
                tokens += [VISION_START_ID] + [IMAGE_TOKEN_ID] * per_frame + [VISION_END_ID]
                types += [0] + [1] * per_frame + [0]
                images.append((pixels, grid))
            else:
                runs = [per_frame] * frames if separated else [per_frame * frames]
                for index, run in enumerate(runs):
                    if index:
                        tokens.append(5 + index)  # a timestamp
                        types.append(0)
                    tokens += [VISION_START_ID] + [VIDEO_TOKEN_ID] * run + [VISION_END_ID]
                    types += [0] + [2] * run + [0]
                videos.append((pixels, grid))
        tokens.append(4)  # prompts end with text (the assistant turn's opening)
        types.append(0)
        return tokens, types, images, videos

    built = {name: tokens_of(parts) for name, parts in prompts.items()}
    width_prompt = max(len(built[name][0]) for name, _ in rows) + extra_prompt_pad
    width_completion = width_completion or max(max(length for _, length in rows), 1)
    generator = torch.Generator().manual_seed(seed)
    ids, masks, types, pixel_blocks, grids, num_images, video_blocks, video_grids = [], [], [], [], [], [], [], []
    for name, completion_len in rows:
        tokens, token_types, images, videos = built[name]
        pad_left, pad_right = width_prompt - len(tokens), width_completion - completion_len
        completion = torch.randint(4, IMAGE_TOKEN_ID, (completion_len,), generator=generator).tolist()
        ids.append([0] * pad_left + tokens + completion + [0] * pad_right)
        masks.append([0] * pad_left + [1] * (len(tokens) + completion_len) + [0] * pad_right)
        types.append([0] * pad_left + token_types + [0] * (completion_len + pad_right))
        pixel_blocks += [pixels for pixels, _ in images]
        grids += [grid for _, grid in images]
        num_images.append(len(images))
        video_blocks += [pixels for pixels, _ in videos]
        video_grids += [grid for _, grid in videos]
    inputs = {"mm_token_type_ids": torch.tensor(types)}
    if pixel_blocks:
        inputs.update(pixel_values=torch.cat(pixel_blocks), image_grid_thw=torch.tensor(grids), num_images=num_images)
    if video_blocks:
        inputs.update(pixel_values_videos=torch.cat(video_blocks), video_grid_thw=torch.tensor(video_grids))
    return torch.tensor(ids), torch.tensor(masks), width_completion, inputs


def randomize_lora_b(model, std: float = 0.1) -> None:
    """Random LoRA B matrices (PEFT starts them at zero), so that enabling or disabling the adapter changes outputs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=std)


def assert_within_repeated_error(grouped, repeated, reference, label: str, eps: float = 1e-3) -> None:
    """
    Low-precision bound (STYLE habit 7) on `(log-probs, entropies, {name: gradient})` triples: every tensor of the
    grouped run is within `2 * max |repeated - reference| + eps` of the reference (the same model, higher
    precision).
    """
    pairs = [("log-probs", grouped[0], repeated[0], reference[0])]
    pairs += [("entropies", grouped[1], repeated[1], reference[1])]
    pairs += [(f"gradient of {name}", grouped[2][name], repeated[2][name], reference[2][name])
              for name in reference[2]]
    for name, ours, theirs, exact in pairs:
        bound = 2 * (theirs - exact).abs().max() + eps
        assert (ours - exact).abs().max() <= bound, f"{label} {name}"
