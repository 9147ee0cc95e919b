"""
The one place that touches transformers: registering the prefix-grouped attention and switching models to it.

For each base implementation we support (`sdpa`, `eager`) we register `prefix_grouped_<base>` in
`AttentionInterface` and `AttentionMaskInterface`. The registered attention is a dispatcher:

- called with `prefix_group_layout=<GroupLayout>` (our grouped forward), it runs the split attention;
- called without it (generation, evaluation, any plain forward), it runs the model's own `<base>` attention,
  unchanged, with the mask `<base>` would get.

The mask function returns `None` while a grouped forward is running (`grouped_forward()` context): the split
attention builds its own block masks, and the model must not build a (T x T) mask over the packed row.
"""

import contextlib
import contextvars
import inspect
import sys
from functools import partial

import torch

from .attention import sdpa_sharing_kv_heads, split_attention, split_attention_flex, split_attention_varlen
from .layout import LAYOUT_KWARG
from .mixers import enable_mixers

PREFIX = "prefix_grouped_"
SUPPORTED_BASES = ("sdpa", "eager", "flash_attention_2", "flex_attention")

_grouped_forward_active = contextvars.ContextVar("prefix_grouper_grouped_forward", default=False)
_registered = False


def _model_eager_attention(module: torch.nn.Module):
    """The `eager_attention_forward` of the module's own modeling file (it may softcap, as Gemma2 does)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def _flash_attn_varlen(dropout: float, softcap: float | None):
    """flash-attn 2's varlen kernel as a `VarlenFn` (imported lazily: flash-attn needs CUDA to build)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package (`pip install "
            "prefix_grouper_trl[flash-attn]` on a CUDA machine), or load the model with attn_implementation='sdpa'."
        ) from error

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        return flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scale, causal=True,
            softcap=0.0 if softcap is None else softcap,
        )

    return varlen


def _torch_varlen(query: torch.Tensor, key: torch.Tensor, dropout: float, softcap: float | None):
    """torch's own varlen flash kernel (CUDA, fp16/bf16, torch>=2.9) as a `VarlenFn`, or None where it cannot run."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or dropout or softcap is not None:
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    extra = {}
    # torch 2.11's varlen_attn has no `enable_gqa` (its flash kernel takes fewer kv heads as they are); newer ones do.
    if "enable_gqa" in inspect.signature(varlen_attn).parameters:
        extra["enable_gqa"] = query.size(1) != key.size(1)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        # window (-1, 0): causal, aligned bottom-right as in flash-attn.
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0), **extra)

    return varlen


def _dispatch(base: str, module, query, key, value, attention_mask, **kwargs):
    layout = kwargs.pop(LAYOUT_KWARG, None)
    if base == "eager":
        base_fn = _model_eager_attention(module)
    elif base == "flash_attention_2":
        from transformers.integrations.flash_attention import flash_attention_forward as base_fn
    elif base == "flex_attention":
        from transformers.integrations.flex_attention import flex_attention_forward as base_fn
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as base_fn
    if layout is None:
        return base_fn(module, query, key, value, attention_mask, **kwargs)
    sliding_window = kwargs.get("sliding_window")
    if sliding_window is not None and sliding_window <= layout.max_span:
        raise ValueError(
            f"{type(module).__name__} uses a sliding window of {sliding_window} tokens, shorter than a "
            f"prompt+completion of this batch ({layout.max_span + 1} tokens). Prefix grouping supports only windows "
            "that cover a whole row: shorten prompts/max_completion_length, or set prefix_grouping=False."
        )
    if base == "flex_attention":
        return split_attention_flex(base_fn, module, query, key, value, layout, **kwargs)
    dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
    softcap = kwargs.get("softcap")
    if base == "flash_attention_2":
        varlen = _flash_attn_varlen(dropout, softcap)
    elif base == "sdpa":
        varlen = _torch_varlen(query, key, dropout, softcap)
    else:
        varlen = None
    if varlen is not None:
        return split_attention_varlen(varlen, query, key, value, layout, scaling=kwargs.get("scaling"))
    if base == "sdpa":
        base_fn = sdpa_sharing_kv_heads
    return split_attention(base_fn, base == "eager", module, query, key, value, layout, **kwargs)


def _mask(base_mask_fn, *args, **kwargs):
    if _grouped_forward_active.get():
        return None
    return base_mask_fn(*args, **kwargs)


def register_prefix_grouped_attention() -> None:
    """
    Register `prefix_grouped_sdpa` and `prefix_grouped_eager` with transformers. Idempotent.

    Raises:
        ImportError: when the installed transformers has no `AttentionInterface` / `AttentionMaskInterface`.
    """
    global _registered
    if _registered:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError as error:  # pragma: no cover - depends on the installed version
        raise ImportError(
            "prefix_grouper_trl needs transformers>=5.0 (AttentionInterface and AttentionMaskInterface). "
            "Upgrade with `pip install -U transformers`."
        ) from error
    for base in SUPPORTED_BASES:
        AttentionInterface.register(PREFIX + base, partial(_dispatch, base))
        AttentionMaskInterface.register(PREFIX + base, partial(_mask, ALL_MASK_ATTENTION_FUNCTIONS[base]))
    _registered = True


@contextlib.contextmanager
def grouped_forward():
    """Inside this context, models switched to `prefix_grouped_*` build no attention mask of their own."""
    token = _grouped_forward_active.set(True)
    try:
        yield
    finally:
        _grouped_forward_active.reset(token)


def base_attn_implementation(model) -> str:
    impl = model.config._attn_implementation or "sdpa"
    return impl[len(PREFIX) :] if impl.startswith(PREFIX) else impl


def check_model_supported(model) -> None:
    """Raise a clear error for models the shared-prefix forward cannot handle exactly."""
    config = model.config
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder model; prefix grouping supports decoder-only causal LMs. "
            "Set prefix_grouping=False."
        )
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        raise ValueError(
            f"{name} uses bidirectional attention; prefix grouping needs causal attention. Set prefix_grouping=False."
        )
    base = base_attn_implementation(model)
    if base not in SUPPORTED_BASES:
        raise ValueError(
            f"{name} uses attn_implementation={base!r}, which prefix grouping does not split yet; supported: "
            f"{', '.join(SUPPORTED_BASES)}. Load the model with attn_implementation='sdpa' (or 'eager'), or set "
            "prefix_grouping=False."
        )


# Layer types (transformers' `config.layer_types`) whose layer has a softmax attention: "hybrid" is Falcon-H1's and
# Zamba2's attention-and-Mamba layer. "linear_attention" layers (Gated DeltaNet, Mamba, lightning attention) and "conv"
# layers are mixers (see mixers/).
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "attention", "hybrid")


def expected_attention_layers(model) -> int | None:
    """How many attention layers a forward of `model` runs (from `config.layer_types`), or None if unknown."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return sum(str(layer_type) in ATTENTION_LAYER_TYPES for layer_type in layer_types)
    return getattr(config, "num_hidden_layers", None)


def enable_prefix_grouping(model) -> None:
    """
    Switch a transformers model (not a PEFT or DeepSpeed wrapper) to the prefix-grouped dispatcher of its current
    attention implementation. Idempotent; a model switched this way behaves as before for every plain forward.
    """
    register_prefix_grouped_attention()
    check_model_supported(model)
    num_mixers = enable_mixers(model)
    impl = model.config._attn_implementation or "sdpa"
    if not impl.startswith(PREFIX):
        try:
            model.set_attn_implementation(PREFIX + impl)
        except ValueError:
            # A model without attention (Mamba, Mamba2, Falcon-Mamba) has no attention backend to switch; its
            # mixers carry the layout.
            if num_mixers and expected_attention_layers(model) == 0:
                return
            raise
    if not model.config._attn_implementation.startswith(PREFIX):
        raise ValueError(
            f"{type(model).__name__} did not accept attn_implementation={PREFIX + impl!r} (its modeling code does not "
            "dispatch through transformers' AttentionInterface). Set prefix_grouping=False."
        )


def disable_prefix_grouping(model) -> None:
    """Restore the model's own attention implementation (e.g. before saving its config)."""
    impl = model.config._attn_implementation
    if impl and impl.startswith(PREFIX):
        model.set_attn_implementation(impl[len(PREFIX) :])
