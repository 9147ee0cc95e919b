"""
Two passes through a mixer's own forward, joined by its own cache API: every group's prefix once, then every suffix
from the final state of its group's prefix.

transformers (5.2x) gives every recurrent or convolutional token mixer the same cache interface
(`get_conv_state` / `update_conv_state` / `get_recurrent_state` / `update_recurrent_state` of
`LinearAttentionCacheLayerMixin`), and its mixers continue a multi-token forward from a cached state: the causal
convolution sees the cached last inputs as its left context, the scan starts from the cached state. That is what
chunked prefill relies on. We use it for the packed row::

    pass 1  mixer(prefix batch (G, W, D), cache)           cache <- each group's conv window and recurrent state
            select the cache rows of each suffix's group   (n rows; a gather, so gradients reach the prefix)
    pass 2  mixer(suffix batch (n, C, D), cache)           each suffix continues from its group's prefix
            scatter both outputs back to the packed row    (1, T, D)

The cache layer below stores its states by assignment, never in place (transformers' own layer copies into static
buffers for CUDA graphs, which autograd cannot differentiate through), so the backward runs through the states into
the prefix.
"""

import contextlib

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin

from ..layout import GroupLayout, SegmentBatches, segment_batches


class GroupStateLayer(LinearAttentionCacheLayerMixin):
    """A linear-attention cache layer that keeps its states as autograd values (assigned, never copied into)."""

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0, **kwargs) -> None:
        if conv_states is not None and self.device is None:
            self.dtype, self.device = conv_states.dtype, conv_states.device

    def update_conv_state(
        self, conv_states: torch.Tensor, state_idx: int = 0, conv_kernel_size: int | None = None, **kwargs
    ) -> torch.Tensor:
        """
        Args:
            conv_states (`(b, channels, t)`): the convolution inputs of this forward.

        Returns:
            `(b, channels, kernel + t)` once a state is cached (the left context, then the new inputs), else the
            inputs, left-padded with zeros to at least `kernel` columns, as transformers' own layer returns them.
        """
        self.lazy_initialization(conv_states=conv_states)
        kernel = conv_kernel_size or self.conv_kernel_size[state_idx] or conv_states.shape[-1]
        self.conv_kernel_size[state_idx] = kernel
        if self.has_previous_state[state_idx]:
            full = torch.cat([self.conv_states[state_idx].to(conv_states.dtype), conv_states], dim=-1)
        else:
            full = conv_states
            if full.shape[-1] < kernel:
                full = F.pad(full, (kernel - full.shape[-1], 0))
        self.conv_states[state_idx] = full[..., -kernel:]
        self.is_conv_states_initialized[state_idx] = True
        self.has_previous_state[state_idx] = True
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        self.recurrent_states[state_idx] = recurrent_states
        self.is_recurrent_states_initialized[state_idx] = True
        self.has_previous_state[state_idx] = True
        return recurrent_states

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the states of `rows` (`(n,)` long), in that order: one row per suffix, from its group's prefix."""
        for i in range(self.number_of_states):
            if self.is_conv_states_initialized[i]:
                self.conv_states[i] = self.conv_states[i].index_select(0, rows)
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = self.recurrent_states[i].index_select(0, rows)


class GroupStateCache(Cache):
    """A `Cache` with a [`GroupStateLayer`] at every index up to `layer_idx` (a mixer reads only its own)."""

    def __init__(self, layer_idx: int, number_of_states: int = 1):
        super().__init__(layers=[GroupStateLayer(number_of_states=number_of_states) for _ in range(layer_idx + 1)])
        self.layer_idx = layer_idx

    def select_rows(self, rows: torch.Tensor) -> None:
        self.layers[self.layer_idx].select_rows(rows)

    def has_state(self) -> bool:
        return any(self.layers[self.layer_idx].has_previous_state.values())


class LinearStateCache:
    """
    The cache interface of MiniMax's lightning attention (`get_linear_cache` / `set_linear_cache`: one `(b, heads,
    head_dim, head_dim)` key-value state per layer), kept as autograd values.
    """

    def __init__(self, layer_idx: int):
        self.layer_idx = layer_idx
        self.state = None

    def get_linear_cache(self, layer_idx: int):
        return self.state if layer_idx == self.layer_idx else None

    def set_linear_cache(self, layer_idx: int, linear_cache: torch.Tensor) -> None:
        if layer_idx == self.layer_idx:
            self.state = linear_cache

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(0, rows)

    def has_state(self) -> bool:
        return self.state is not None


def _main_output(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"a token mixer returned {type(output).__name__}; expected a tensor or a tuple starting with one")


def _like(output, packed: torch.Tensor):
    """The packed output in the structure the mixer returns: a tensor, or a tuple whose other entries are None
    (per-batch side outputs such as MiniMax's returned state have no meaning for the packed row)."""
    if isinstance(output, torch.Tensor):
        return packed
    return (packed,) + (None,) * (len(output) - 1)


def gather_segments(hidden_states: torch.Tensor, batches: SegmentBatches) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`(1, T, D)` -> prefix batch `(G, W, D)` (None when W == 0) and suffix batch `(n, C, D)`, zeros on padding."""
    flat = torch.cat([hidden_states[0], hidden_states.new_zeros(1, hidden_states.size(-1))])
    prefix = None
    if batches.prefix_width:
        prefix = flat.index_select(0, batches.prefix_gather).view(batches.num_groups, batches.prefix_width, -1)
    suffix = flat.index_select(0, batches.suffix_gather).view(batches.num_suffixes, batches.suffix_width, -1)
    return prefix, suffix


def scatter_segments(prefix_out: torch.Tensor | None, suffix_out: torch.Tensor, batches: SegmentBatches):
    """Inverse of [`gather_segments`]: the two batches' outputs back to the packed row `(1, T, D')`."""
    parts = [] if prefix_out is None else [prefix_out.reshape(-1, prefix_out.size(-1))]
    parts.append(suffix_out.reshape(-1, suffix_out.size(-1)))
    return torch.cat(parts).index_select(0, batches.inverse).unsqueeze(0)


def run_two_pass(forward, module, hidden_states: torch.Tensor, layout: GroupLayout, kwargs: dict, cache_kwarg: str,
                 make_cache, on_suffix_pass=None):
    """
    Run a mixer over a packed row as described in the module docstring.

    Args:
        forward: the mixer's own forward, `(hidden_states (b, t, D), <cache_kwarg>=cache, attention_mask=...) ->
            (b, t, D')`.
        hidden_states (`(1, T, D)`): the packed row.
        kwargs: the other keyword arguments the model gave the mixer (its cache and mask are replaced).
        cache_kwarg: the name of the mixer's cache argument (`cache`, or `cache_params` in older transformers).
        make_cache: `(layer_idx) -> cache` with the interface the mixer reads, plus `select_rows` and `has_state`.
        on_suffix_pass: an optional context-manager factory `(cache) -> ctx` entered around pass 2 (for mixers whose
            scan ignores a cached state, see `mamba.py`).

    Returns:
        `(1, T, D')`, in the structure the mixer returns (a tuple's other entries become None).
    """
    batches = segment_batches(layout, hidden_states.device)
    kwargs = {k: v for k, v in kwargs.items() if k not in (cache_kwarg, "attention_mask", "cache", "cache_params")}
    cache = make_cache(module.layer_idx)
    prefix, suffix = gather_segments(hidden_states, batches)
    prefix_out = None
    if prefix is not None:
        prefix_kwargs = {cache_kwarg: cache, **kwargs}
        prefix_out = _main_output(forward(prefix, attention_mask=batches.prefix_mask, **prefix_kwargs))
        cache.select_rows(batches.suffix_group)
    context = contextlib.nullcontext() if on_suffix_pass is None else on_suffix_pass(cache)
    with context:
        output = forward(suffix, attention_mask=None, **{cache_kwarg: cache}, **kwargs)
    return _like(output, scatter_segments(prefix_out, _main_output(output), batches))
