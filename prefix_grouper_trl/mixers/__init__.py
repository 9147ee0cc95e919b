"""
Token mixers other than attention: recurrences and causal convolutions over a packed row.

Attention gets the shared-prefix layout through transformers' `AttentionInterface` (see `integration.py`). A
recurrent or convolutional mixer (Gated DeltaNet, Mamba, Mamba2, a short convolution) would instead run over the
packed row `[prefix | suffix_a | suffix_b ...]` as one sequence, and suffix b would start from suffix a's state. Each
such mixer class is registered here with a [`MixerKind`]: how to run it on a packed row so that every group's prefix
is processed once and every suffix continues from the prefix's final state (conv window and recurrent state).

Switching a model (`enable_mixers`) wraps the forward of each registered mixer instance: called with a layout, it
runs its kind; without one (generation, evaluation), it runs the mixer's own forward unchanged. The layout reaches the
mixer through the keyword arguments of its decoder layer, also when the layer is recomputed by gradient
checkpointing in the backward (a pre-hook on the layer reads them), so mixers whose layer does not pass `**kwargs` on
(Jamba) work the same way.

Module classes whose kind we know but cannot split exactly are listed in `_REFUSED` and stop the switch with the
layer kind named.
"""

import contextvars
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..layout import LAYOUT_KWARG, GroupLayout

# The layout of the decoder layer being run (set for the duration of the layer's forward, see
# `_make_layer_read_layout`).
_layer_layout: contextvars.ContextVar = contextvars.ContextVar("prefix_grouper_layer_layout", default=None)


@dataclass(frozen=True)
class MixerKind:
    """
    How a mixer class runs on a packed row.

    name: the layer kind, for messages (`"Gated DeltaNet"`).
    run: `(forward, module, hidden_states (1, T, D), layout, kwargs) -> (1, T, D')`, where `forward` is the mixer's
        own forward and `kwargs` the other keyword arguments its layer passed.
    """

    name: str
    run: Callable


_REGISTRY: dict[str, MixerKind] = {}
_REFUSED: dict[str, str] = {}


def _class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_mixer(module_class: type | str, kind: MixerKind) -> None:
    """Register how instances of `module_class` (a class, or its `"module.QualName"`) run on a packed row."""
    _REGISTRY[module_class if isinstance(module_class, str) else _class_key(module_class)] = kind


def mixer_kind(module: torch.nn.Module) -> MixerKind | None:
    return _REGISTRY.get(_class_key(type(module)))


def refused_kind(module: torch.nn.Module) -> str | None:
    """The layer kind of a mixer we know and refuse (no exact split), or None."""
    return _REFUSED.get(_class_key(type(module)))


def cache_kwarg_of(forward) -> str:
    """The name of a mixer forward's cache argument: `cache` (transformers >= 5.2x) or `cache_params`."""
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "cache_params"


def _wrapped_forward(self, *args, **kwargs):
    layout = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        layout = _layer_layout.get()
    inner = self._prefix_grouper_inner_forward
    if layout is None:
        return inner(*args, **kwargs)
    if args:
        hidden_states, args = args[0], args[1:]
    else:
        hidden_states = kwargs.pop("hidden_states")
    if args:
        raise TypeError(
            f"{type(self).__name__} was called with {len(args) + 1} positional arguments; prefix grouping passes "
            "a mixer its hidden states only and its cache and mask by name."
        )
    layout.mixer_calls += 1
    return self._prefix_grouper_mixer_kind.run(inner, self, hidden_states, layout, kwargs)


def _enclosing_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The nearest ancestor that is a decoder layer (transformers' `GradientCheckpointingLayer`), else the parent."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    parts = name.split(".")
    ancestors = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1, 0, -1)]
    for ancestor in ancestors:
        if isinstance(ancestor, GradientCheckpointingLayer):
            return ancestor
    return ancestors[0] if ancestors else model


_LAYOUT_LAYER_CLASSES: dict[type, type] = {}


def _layout_reading_class(layer_class: type) -> type:
    """
    A subclass of a decoder layer class whose `forward` makes the layout of its call visible to the mixers inside.

    transformers checkpoints a layer's `forward` (not `__call__`), so gradient checkpointing recomputes the layer in
    the backward without its module hooks; a subclass's `forward` is inside what is recomputed, so the mixers of a
    layer that does not pass `**kwargs` on (Jamba's Mamba layer) get the layout in the recomputation too. The subclass
    keeps the class's name, and state dicts, `isinstance` and `copy.deepcopy` are unchanged.
    """
    cached = _LAYOUT_LAYER_CLASSES.get(layer_class)
    if cached is not None:
        return cached

    def forward(self, *args, **kwargs):
        token = _layer_layout.set(kwargs.get(LAYOUT_KWARG))
        try:
            return super(subclass, self).forward(*args, **kwargs)
        finally:
            _layer_layout.reset(token)

    subclass = type(
        layer_class.__name__,
        (layer_class,),
        {"forward": forward, "__module__": layer_class.__module__, "__qualname__": layer_class.__qualname__,
         "_prefix_grouper_reads_layout": True},
    )
    _LAYOUT_LAYER_CLASSES[layer_class] = subclass
    return subclass


def _set_layer_layout(layer, args, kwargs):
    layer._prefix_grouper_tokens.append(_layer_layout.set(kwargs.get(LAYOUT_KWARG)))


def _reset_layer_layout(layer, args, kwargs, output):
    _layer_layout.reset(layer._prefix_grouper_tokens.pop())


def _make_layer_read_layout(layer: torch.nn.Module) -> None:
    """Give the mixers inside `layer` the layout its call receives (idempotent)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if getattr(layer, "_prefix_grouper_reads_layout", False):
        return
    if isinstance(layer, GradientCheckpointingLayer):
        layer.__class__ = _layout_reading_class(type(layer))
    else:  # never checkpointed by transformers: module hooks see every call
        layer._prefix_grouper_tokens = []
        layer._prefix_grouper_reads_layout = True
        layer.register_forward_pre_hook(_set_layer_layout, with_kwargs=True)
        layer.register_forward_hook(_reset_layer_layout, with_kwargs=True, always_call=True)


def mixer_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, MixerKind]]:
    """The registered mixers of a model, with their names."""
    found = []
    for name, module in model.named_modules():
        kind = mixer_kind(module)
        if kind is not None:
            found.append((name, module, kind))
    return found


def check_mixers_supported(model: torch.nn.Module) -> None:
    """Raise, naming the module and its layer kind, if the model has a mixer we know cannot be split exactly."""
    for name, module in model.named_modules():
        kind = refused_kind(module)
        if kind is not None:
            raise ValueError(
                f"{type(model).__name__} has {kind} layers ({name}: {type(module).__name__}), which prefix grouping "
                "cannot run exactly on a shared prefix yet. Set prefix_grouping=False to train this model with "
                "GRPOTrainer's repeated forward."
            )


def enable_mixers(model: torch.nn.Module) -> int:
    """
    Wrap every registered mixer of `model` (idempotent). Returns how many mixers the model has.

    Raises:
        ValueError: for a mixer kind we refuse (see `check_mixers_supported`).
    """
    check_mixers_supported(model)
    found = mixer_modules(model)
    for name, module, kind in found:
        if getattr(module, "_prefix_grouper_mixer_kind", None) is not None:
            continue
        # Bound methods, so that copy.deepcopy (TRL's reference model) rebinds both to the copy.
        module._prefix_grouper_inner_forward = module.forward
        module._prefix_grouper_mixer_kind = kind
        module.forward = types.MethodType(_wrapped_forward, module)
        _make_layer_read_layout(_enclosing_layer(model, name))
    return len(found)


def two_pass_kind(name: str, make_cache=None, on_suffix_pass=None) -> MixerKind:
    """
    A [`MixerKind`] that runs the mixer's own forward twice, joined by its cache (see `state_cache.py`).

    make_cache: `(layer_idx) -> cache`; transformers' linear-attention cache interface (`GroupStateCache`) by default.
    on_suffix_pass: `(module, cache) -> context manager` entered around the suffix pass.
    """
    from .state_cache import GroupStateCache, run_two_pass

    make_cache = make_cache or GroupStateCache

    def run(forward, module, hidden_states, layout: GroupLayout, kwargs):
        cache_kwarg = module.__dict__.get("_prefix_grouper_cache_kwarg")
        if cache_kwarg is None:
            cache_kwarg = module._prefix_grouper_cache_kwarg = cache_kwarg_of(forward)
        return run_two_pass(
            forward, module, hidden_states, layout, kwargs, cache_kwarg, make_cache,
            None if on_suffix_pass is None else (lambda cache: on_suffix_pass(module, cache)),
        )

    return MixerKind(name=name, run=run)


def _register_builtin_mixers() -> None:
    from .mamba import mamba_initial_state_in_scan
    from .state_cache import LinearStateCache

    gated_deltanet = two_pass_kind("Gated DeltaNet")
    mamba2 = two_pass_kind("Mamba2")
    short_conv = two_pass_kind("short convolution")
    mamba = two_pass_kind("Mamba", on_suffix_pass=mamba_initial_state_in_scan)
    for path in (
        "qwen3_5.modeling_qwen3_5.Qwen3_5GatedDeltaNet",
        "qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeGatedDeltaNet",
        "qwen3_next.modeling_qwen3_next.Qwen3NextGatedDeltaNet",
        "olmo_hybrid.modeling_olmo_hybrid.OlmoHybridGatedDeltaNet",
    ):
        register_mixer("transformers.models." + path, gated_deltanet)
    for path in (
        "nemotron_h.modeling_nemotron_h.NemotronHMamba2Mixer",
        "granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridMambaLayer",
        "falcon_h1.modeling_falcon_h1.FalconH1Mixer",
        "bamba.modeling_bamba.BambaMixer",
        "zamba2.modeling_zamba2.Zamba2MambaMixer",
        "mamba2.modeling_mamba2.Mamba2Mixer",
    ):
        register_mixer("transformers.models." + path, mamba2)
    for path in (
        "lfm2.modeling_lfm2.Lfm2ShortConv",
        "lfm2_moe.modeling_lfm2_moe.Lfm2MoeShortConv",
        "lfm3.modeling_lfm3.Lfm3ShortConv",
    ):
        register_mixer("transformers.models." + path, short_conv)
    for path in (
        "jamba.modeling_jamba.JambaMambaMixer",
        "mamba.modeling_mamba.MambaMixer",
        "falcon_mamba.modeling_falcon_mamba.FalconMambaMixer",
    ):
        register_mixer("transformers.models." + path, mamba)
    register_mixer(
        "transformers.models.minimax.modeling_minimax.MiniMaxLightningAttention",
        two_pass_kind("lightning attention", make_cache=LinearStateCache),
    )
    # Griffin's recurrent block keeps its conv and RG-LRU states on the module, restarts its recurrence where a
    # position id is 0, and does not mask padding: its repeated forward reads the pad tokens of left-padded prompts,
    # which a packed row does not have, so no split can reproduce it.
    _REFUSED["transformers.models.recurrent_gemma.modeling_recurrent_gemma.RecurrentGemmaRecurrentBlock"] = (
        "RG-LRU recurrent (Griffin)"
    )


_register_builtin_mixers()
