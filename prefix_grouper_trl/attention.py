"""
The split attention over a packed row (see `layout.py` for the row and the mask it implements).

For each group, two calls of the model's own attention function (`sdpa` or `eager`) on slices of the row:

1. prefix queries x prefix keys, causal: the prompt is encoded once::

       q = k = v = row[start : start + prefix_len]        is_causal (sdpa) / a (prefix_len x prefix_len) mask (eager)

2. all suffix queries of the group x the whole group segment, with a mask that opens the prefix and each suffix's
   own causal block::

       q = row[start + prefix_len : end]                  (S = sum of the group's suffix lengths)
       k = v = row[start : end]                           (prefix_len + S keys)
       mask (S, prefix_len + S):  [ 1 1 1 1 | 1 . . . . ]   suffix a, token 0
                                  [ 1 1 1 1 | 1 1 . . . ]   suffix a, token 1
                                  [ 1 1 1 1 | . . 1 . . ]   suffix b, token 0
                                  [ 1 1 1 1 | . . 1 1 . ]   ...

   When the group has several suffixes, the rectangle wastes the `S x S` pairs between different suffixes. If that
   costs more than repeating the prefix keys, the suffixes are batched instead, one row each, padded to the longest
   (`n` suffixes, `C` = longest suffix)::

       q (n, H, C, D)             the suffixes, padded
       k = v (n, H_kv, P + C, D)  [prefix keys (expanded, shared) | the suffix's own keys]
       mask (n, 1, C, P + C)      prefix open, own keys causal, padding closed

   Groups with several suffixes always take the batch: no pairs between suffixes, and a NaN in one completion stays
   in its row as in the repeated forward (in a rectangle it would reach masked siblings through 0 x NaN).

No mask over the whole packed row is ever built: masks are per group, built once per layout and shared by all
layers. Calling the model's own function on each block keeps its scaling, GQA handling, softcapping (eager) and
dtype rules, so the result equals the repeated forward up to floating-point rounding.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .layout import GroupLayout

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def suffix_block_mask(prefix_len: int, suffix_lens: list[int], device: torch.device) -> torch.Tensor:
    """
    Boolean mask `(1, 1, S, prefix_len + S)`, True where a suffix query may attend (see the module docstring).

    Example, prefix_len=2, suffix_lens=[2, 1]::

        [[1, 1, 1, 0, 0],
         [1, 1, 1, 1, 0],
         [1, 1, 0, 0, 1]]
    """
    total = sum(suffix_lens)
    lens = torch.tensor(suffix_lens, device=device)
    suffix_id = torch.repeat_interleave(torch.arange(len(suffix_lens), device=device), lens)
    offset = torch.arange(total, device=device) - (torch.cumsum(lens, 0) - lens)[suffix_id]
    own = (suffix_id[:, None] == suffix_id[None, :]) & (offset[None, :] <= offset[:, None])
    prefix = torch.ones(total, prefix_len, dtype=torch.bool, device=device)
    return torch.cat([prefix, own], dim=1).view(1, 1, total, prefix_len + total)


def _causal_mask(length: int, device: torch.device) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril().view(1, 1, length, length)


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


@dataclass
class _BatchedSuffixes:
    """Index maps of the batched suffix call of one group (see the module docstring)."""

    gather: torch.Tensor  # (n * C,) long: suffix token feeding each padded slot (padding repeats a real token)
    valid: torch.Tensor  # (S,) long: padded slot of each real suffix token, in packed order
    num_suffixes: int
    longest: int


@dataclass
class _GroupPlan:
    prefix_mask: torch.Tensor | None  # eager only: (1, 1, P, P) additive causal mask
    suffix_mask: torch.Tensor  # (1, 1, S, P + S) or, batched, (n, 1, C, P + C)
    batched: _BatchedSuffixes | None


def batched_suffix_mask(prefix_len: int, suffix_lens: list[int], device: torch.device) -> torch.Tensor:
    """
    Boolean mask `(n, 1, C, prefix_len + C)` of the batched suffix call, C = the longest suffix.

    Example, prefix_len=1, suffix_lens=[2, 1]: suffix 1's second query row is padding (its output is discarded); it
    sees keys that exist, so its softmax stays finite::

        suffix 0: [[1, 1, 0],      suffix 1: [[1, 1, 0],
                   [1, 1, 1]]                 [1, 1, 0]]
    """
    longest = max(suffix_lens)
    lens = torch.tensor(suffix_lens, device=device)[:, None, None]
    query = torch.arange(longest, device=device)[None, :, None]
    key = torch.arange(longest, device=device)[None, None, :]
    own = (key <= query) & (key < lens)
    prefix = torch.ones(len(suffix_lens), longest, prefix_len, dtype=torch.bool, device=device)
    return torch.cat([prefix, own], dim=2).unsqueeze(1)


def _batching_pays(prefix_len: int, suffix_lens: list[int]) -> bool:
    """
    Whether a group's suffixes run as a padded batch rather than as one rectangle: whenever it has several.

    Besides saving the `S x S` pairs between suffixes, the batch keeps each suffix's attention to its own prompt and
    tokens only, as in the repeated forward: in the rectangle, another suffix's keys are masked but still multiplied
    by zero, so a NaN in one completion would reach its siblings (0 x NaN), which the repeated forward never does.
    """
    return len(suffix_lens) > 1


def _batched_plan(suffix_lens: list[int], device: torch.device) -> _BatchedSuffixes:
    longest = max(suffix_lens)
    lens = torch.tensor(suffix_lens, device=device)
    starts = torch.cumsum(lens, 0) - lens
    slot = torch.arange(longest, device=device)[None, :]
    # Padding slots read the suffix's last real token: finite values, discarded afterwards.
    gather = (starts[:, None] + torch.minimum(slot, lens[:, None] - 1)).reshape(-1)
    valid = ((torch.arange(len(suffix_lens), device=device) * longest)[:, None] + slot).reshape(-1)
    valid = valid[(slot < lens[:, None]).reshape(-1)]
    return _BatchedSuffixes(gather=gather, valid=valid, num_suffixes=len(suffix_lens), longest=longest)


def _group_plans(layout: GroupLayout, device: torch.device, additive_dtype: torch.dtype | None) -> list[_GroupPlan]:
    """One plan per group, built once per layout and shared by every layer."""
    key = (str(device), additive_dtype)
    plans = layout._mask_cache.get(key)
    if plans is None:
        plans = []
        for _, prefix_len, suffix_lens in layout.group_segments():
            prefix_mask = _causal_mask(prefix_len, device) if additive_dtype is not None and prefix_len > 1 else None
            batched = _batched_plan(suffix_lens, device) if _batching_pays(prefix_len, suffix_lens) else None
            if batched is None:
                suffix_mask = suffix_block_mask(prefix_len, suffix_lens, device)
            else:
                suffix_mask = batched_suffix_mask(prefix_len, suffix_lens, device)
            if additive_dtype is not None:
                prefix_mask = None if prefix_mask is None else _as_additive(prefix_mask, additive_dtype)
                suffix_mask = _as_additive(suffix_mask, additive_dtype)
            plans.append(_GroupPlan(prefix_mask, suffix_mask, batched))
        layout._mask_cache[key] = plans
    return plans


def _batched_suffix_attention(
    base_attention: AttentionFn, module, suffix_query, prefix_key, prefix_value, suffix_key, suffix_value, plan, **kwargs
) -> torch.Tensor:
    """The suffixes of one group as a batch: `(1, H, S, D)` queries -> `(1, S, H, D)` outputs."""
    batched = plan.batched
    n, longest = batched.num_suffixes, batched.longest

    def pad(x):  # (1, h, S, D) -> (n, h, C, D)
        return x[0].index_select(1, batched.gather).unflatten(1, (n, longest)).transpose(0, 1)

    def with_prefix(prefix, suffix):  # -> (n, h_kv, P + C, D)
        return torch.cat([prefix.expand(n, -1, -1, -1), pad(suffix)], dim=2)

    out, _ = base_attention(
        module,
        pad(suffix_query),
        with_prefix(prefix_key, suffix_key),
        with_prefix(prefix_value, suffix_value),
        plan.suffix_mask,
        is_causal=False,
        **kwargs,
    )
    # (n, C, H, D) -> the real tokens, in packed order.
    return out.flatten(0, 1).index_select(0, batched.valid).unsqueeze(0)


def split_attention(
    base_attention: AttentionFn,
    needs_explicit_causal_mask: bool,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: GroupLayout,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """
    Shared-prefix attention over a packed row, by blocks of the model's own attention function.

    Args:
        base_attention: the model's attention function, `(module, q, k, v, mask, **kwargs) -> ((b, t, H, D), w)`.
        needs_explicit_causal_mask: True for `eager`, which applies no causal mask of its own; its masks are
            additive floats of the query dtype. False for `sdpa`, which takes boolean masks and `is_causal`.
        query (`(1, H, T, D)`), key and value (`(1, H_kv, T, D)`): the packed row after rotary embedding.
        layout: the [`GroupLayout`] of the row.
        kwargs: forwarded to `base_attention` (dropout, scaling, softcap, ...).

    Returns:
        `((1, T, H, D), None)`, as transformers' attention functions return.
    """
    if query.size(0) != 1 or query.size(2) != layout.packed_tokens:
        raise ValueError(
            f"Prefix-grouped attention got queries of shape {tuple(query.shape)} for a packed row of "
            f"{layout.packed_tokens} tokens; the layout does not belong to this forward."
        )
    layout.attention_calls += 1
    additive_dtype = query.dtype if needs_explicit_causal_mask else None
    plans = _group_plans(layout, query.device, additive_dtype)
    kwargs.pop("is_causal", None)

    # Split once per group and once per prefix/suffix: the backward of a split is a concatenation, while the backward
    # of each slice would allocate a zero gradient the size of the whole row (quadratic in the number of groups).
    segments = list(layout.group_segments())
    group_sizes = [prefix_len + sum(suffix_lens) for _, prefix_len, suffix_lens in segments]
    groups = zip(query.split(group_sizes, 2), key.split(group_sizes, 2), value.split(group_sizes, 2))
    pieces = []
    for (group_query, group_key, group_value), (_, prefix_len, suffix_lens), plan in zip(groups, segments, plans):
        if prefix_len == 0:
            if plan.batched is None:
                suffix_out, _ = base_attention(
                    module, group_query, group_key, group_value, plan.suffix_mask, is_causal=False, **kwargs
                )
            else:
                no_prefix_key, no_prefix_value = group_key[:, :, :0], group_value[:, :, :0]
                suffix_out = _batched_suffix_attention(
                    base_attention, module, group_query, no_prefix_key, no_prefix_value, group_key, group_value, plan,
                    **kwargs,
                )
            pieces.append(suffix_out)
            continue
        sizes = [prefix_len, group_query.size(2) - prefix_len]
        prefix_query, suffix_query = group_query.split(sizes, 2)
        prefix_key, suffix_key = group_key.split(sizes, 2)
        prefix_value, suffix_value = group_value.split(sizes, 2)
        prefix_out, _ = base_attention(
            module, prefix_query, prefix_key, prefix_value, plan.prefix_mask, is_causal=True, **kwargs
        )
        pieces.append(prefix_out)
        if plan.batched is None:
            suffix_out, _ = base_attention(
                module, suffix_query, group_key, group_value, plan.suffix_mask, is_causal=False, **kwargs
            )
        else:
            suffix_out = _batched_suffix_attention(
                base_attention, module, suffix_query, prefix_key, prefix_value, suffix_key, suffix_value, plan,
                **kwargs,
            )
        pieces.append(suffix_out)
    return torch.cat(pieces, dim=1), None


# --------------------------------------------------------------------------------------------------------------------
# Variable-length path (GPU): two varlen calls for the whole row, no mask at all.
#
#   call 1, all prefixes:   q = k = v = [prefix_0 | prefix_1 | ...]                    causal per segment
#   call 2, all suffixes:   q = [suffix_0a | suffix_0b | suffix_1a ...]
#                           k = v = [prefix_0 suffix_0a | prefix_0 suffix_0b | prefix_1 suffix_1a ...]  (gathered)
#                           causal per segment, aligned bottom-right (query i of a suffix sees its prefix and
#                           its own tokens 0..i), which is the flash-attention convention when q is shorter than k.
# --------------------------------------------------------------------------------------------------------------------

VarlenFn = Callable[..., torch.Tensor]


@dataclass
class VarlenPlan:
    """
    Index maps of the varlen path, built once per layout and device.

    prefix_positions (`(sum P,)` long): packed positions of all prefix tokens, group by group.
    cu_prefix (`(n_prefix_segments + 1,)` int32), max_prefix: offsets of the prefix segments (groups with P > 0).
    suffix_positions (`(sum S,)` long): packed positions of all suffix tokens, suffix by suffix.
    suffix_kv_positions (`(sum (P_g + S),)` long): for each suffix, its group's prefix positions then its own.
    cu_suffix_q, cu_suffix_k (`(n_suffix + 1,)` int32), max_suffix_q, max_suffix_k: their segment offsets.
    inverse (`(T,)` long): packed position -> row of `cat([prefix_out, suffix_out])`.
    """

    prefix_positions: torch.Tensor
    cu_prefix: torch.Tensor
    max_prefix: int
    suffix_positions: torch.Tensor
    suffix_kv_positions: torch.Tensor
    cu_suffix_q: torch.Tensor
    cu_suffix_k: torch.Tensor
    max_suffix_q: int
    max_suffix_k: int
    inverse: torch.Tensor


def _offsets(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)


def varlen_plan(layout: GroupLayout, device: torch.device) -> VarlenPlan:
    key = ("varlen", str(device))
    plan = layout._mask_cache.get(key)
    if plan is not None:
        return plan
    prefix_positions, prefix_lens, suffix_positions, suffix_kv_positions, suffix_q_lens, suffix_k_lens = [], [], [], [], [], []
    for start, prefix_len, suffix_lens in layout.group_segments():
        prefix = torch.arange(start, start + prefix_len)
        if prefix_len > 0:
            prefix_positions.append(prefix)
            prefix_lens.append(prefix_len)
        cursor = start + prefix_len
        for suffix_len in suffix_lens:
            own = torch.arange(cursor, cursor + suffix_len)
            suffix_positions.append(own)
            suffix_kv_positions.extend([prefix, own])
            suffix_q_lens.append(suffix_len)
            suffix_k_lens.append(prefix_len + suffix_len)
            cursor += suffix_len
    empty = torch.zeros(0, dtype=torch.long)
    prefix_positions = torch.cat(prefix_positions) if prefix_positions else empty
    suffix_positions = torch.cat(suffix_positions)
    order = torch.cat([prefix_positions, suffix_positions])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    plan = VarlenPlan(
        prefix_positions=prefix_positions.to(device),
        cu_prefix=_offsets(prefix_lens, device),
        max_prefix=max(prefix_lens, default=0),
        suffix_positions=suffix_positions.to(device),
        suffix_kv_positions=torch.cat(suffix_kv_positions).to(device),
        cu_suffix_q=_offsets(suffix_q_lens, device),
        cu_suffix_k=_offsets(suffix_k_lens, device),
        max_suffix_q=max(suffix_q_lens),
        max_suffix_k=max(suffix_k_lens),
        inverse=inverse.to(device),
    )
    layout._mask_cache[key] = plan
    return plan


def split_attention_varlen(
    varlen_fn: VarlenFn,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: GroupLayout,
    scaling: float | None = None,
) -> tuple[torch.Tensor, None]:
    """
    Shared-prefix attention with two variable-length calls (see the diagram above).

    Args:
        varlen_fn: `(q (t, H, D), k (s, H_kv, D), v, cu_q, cu_k, max_q, max_k, scale) -> (t, H, D)`, causal per
            segment and aligned bottom-right, e.g. flash-attn's `flash_attn_varlen_func(..., causal=True)`.
        query (`(1, H, T, D)`), key and value (`(1, H_kv, T, D)`): the packed row.

    Returns:
        `((1, T, H, D), None)`.
    """
    if query.size(0) != 1 or query.size(2) != layout.packed_tokens:
        raise ValueError(
            f"Prefix-grouped attention got queries of shape {tuple(query.shape)} for a packed row of "
            f"{layout.packed_tokens} tokens; the layout does not belong to this forward."
        )
    layout.attention_calls += 1
    plan = varlen_plan(layout, query.device)
    # (1, H, T, D) -> (T, H, D), the varlen token-major layout.
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    outputs = []
    if plan.prefix_positions.numel():
        q_p, k_p, v_p = (x.index_select(0, plan.prefix_positions) for x in (q, k, v))
        outputs.append(varlen_fn(q_p, k_p, v_p, plan.cu_prefix, plan.cu_prefix, plan.max_prefix, plan.max_prefix, scaling))
    q_s = q.index_select(0, plan.suffix_positions)
    k_s, v_s = (x.index_select(0, plan.suffix_kv_positions) for x in (k, v))
    outputs.append(
        varlen_fn(q_s, k_s, v_s, plan.cu_suffix_q, plan.cu_suffix_k, plan.max_suffix_q, plan.max_suffix_k, scaling)
    )
    out = torch.cat(outputs).index_select(0, plan.inverse)
    return out.unsqueeze(0), None


# --------------------------------------------------------------------------------------------------------------------
# FlexAttention path: one call over the packed row with a block-sparse mask. The BlockMask stores which (128 x 128)
# tiles are full, partial or empty; the mask function below is evaluated per tile, never as a dense (T x T) tensor.
# --------------------------------------------------------------------------------------------------------------------


def packed_token_ids(layout: GroupLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Per packed token: its group index and its suffix index (-1 on prefix tokens), both `(T,)` long.

    Example (layout.py's docstring row, two groups)::

        tokens:  p p | a a | b | q q | c
        group:   0 0   0 0   0   1 1   1
        suffix: -1 -1  0 0   1  -1 -1  2
    """
    group_sizes = [prefix_len + sum(suffix_lens) for _, prefix_len, suffix_lens in layout.group_segments()]
    group = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
    segment_lens, segment_suffix, suffix_count = [], [], 0
    for _, prefix_len, suffix_lens in layout.group_segments():
        segment_lens.append(prefix_len)
        segment_suffix.append(-1)
        for suffix_len in suffix_lens:
            segment_lens.append(suffix_len)
            segment_suffix.append(suffix_count)
            suffix_count += 1
    suffix = torch.repeat_interleave(torch.tensor(segment_suffix), torch.tensor(segment_lens))
    return group.to(device), suffix.to(device)


def flex_block_mask(layout: GroupLayout, device: torch.device):
    """The packed-row mask as a FlexAttention `BlockMask`, built once per layout and device."""
    key = ("flex", str(device))
    block_mask = layout._mask_cache.get(key)
    if block_mask is None:
        from torch.nn.attention.flex_attention import create_block_mask

        group, suffix = packed_token_ids(layout, device)

        def mask_mod(batch, head, q_idx, kv_idx):
            visible_kind = (suffix[kv_idx] == -1) | (suffix[kv_idx] == suffix[q_idx])
            return (group[q_idx] == group[kv_idx]) & (kv_idx <= q_idx) & visible_kind

        total = layout.packed_tokens
        # Compiled, the mask function is evaluated tile by tile; eager, torch evaluates it on the dense grid first.
        # FlexAttention has no backward on CPU, so CPU only ever runs it in (test) forwards, where that is fine.
        block_mask = create_block_mask(
            mask_mod, None, None, total, total, device=device, _compile=torch.device(device).type == "cuda"
        )
        layout._mask_cache[key] = block_mask
    return block_mask


def split_attention_flex(
    base_attention: AttentionFn, module, query, key, value, layout: GroupLayout, **kwargs
) -> tuple[torch.Tensor, None]:
    """Shared-prefix attention as one call of the model's flex attention with the packed-row block mask."""
    if query.size(0) != 1 or query.size(2) != layout.packed_tokens:
        raise ValueError(
            f"Prefix-grouped attention got queries of shape {tuple(query.shape)} for a packed row of "
            f"{layout.packed_tokens} tokens; the layout does not belong to this forward."
        )
    layout.attention_calls += 1
    kwargs.pop("is_causal", None)
    out, _ = base_attention(module, query, key, value, flex_block_mask(layout, query.device), **kwargs)
    return out, None
