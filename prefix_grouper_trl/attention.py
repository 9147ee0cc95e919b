"""
The split attention over a packed row (see `layout.py` for the row and the mask it implements).

Every block below is computed by the model's own attention function (`sdpa` or `eager`), which keeps its scaling,
GQA handling, softcapping (eager) and dtype rules, so the result equals the repeated forward up to floating-point
rounding. (For `sdpa` on a CPU, the masked calls pass grouped KV heads to torch's SDPA as they are instead of
repeating them per query head: `sdpa_sharing_kv_heads`.) No mask over the whole packed row is ever built: masks and
index maps are built once per layout and shared by all layers.

**Per group** (the loop; always taken for a single group), two calls on slices of the row:

1. prefix queries x prefix keys, causal: the prompt is encoded once::

       q = k = v = row[start : start + prefix_len]        is_causal (sdpa) / a (prefix_len x prefix_len) mask (eager)

2. all suffix queries of the group. With one suffix, one call against the whole group segment; with several, the
   suffixes are batched, one row each, padded to the longest (`n` suffixes, `C` = longest suffix)::

       q (n, H, C, D)             the suffixes, padded
       k = v (n, H_kv, P + C, D)  [prefix keys (expanded, shared) | the suffix's own keys]
       mask (n, 1, C, P + C)      prefix open, own keys causal, padding closed

   Batching saves the `S x S` pairs between suffixes that one rectangle `S x (P + S)` would compute, and keeps a NaN
   in one completion in its row as in the repeated forward (in a rectangle it would reach masked siblings through
   0 x NaN).

**Bucketed** (several groups per micro-batch): the per-call cost (dispatch, slicing, the backward's bookkeeping) is
paid per group and per layer in the loop. Instead, groups of similar lengths share calls: all prefixes of a bucket in
one causal call, right-padded to the bucket's longest; all suffixes of a bucket in one masked call, one row per
suffix, against its own group's prefix keys and its own keys::

    prefix call (bucket of groups 0, 2):        suffix call (bucket of suffixes a, b of group 0, c of group 2):
      q = k = v (2, H, Pmax, D)                   q (3, H, Cmax, D), k = v (3, H_kv, Pmax + Cmax, D)
      [ p0 p0 p0 p0 p0 ]  group 0                  [ p0 p0 p0 p0 p0 | a a a _ ]   mask: prefix slots < P_g open,
      [ p2 p2 p2 _  _  ]  group 2, padded          [ p0 p0 p0 p0 p0 | b b _ _ ]   own slots causal, padding closed
                                                   [ p2 p2 p2 _  _  | c c c c ]

Which groups share a call is decided once per layout from its lengths (`plan_buckets`), by a cost model in query-key
pairs: a call costs the pairs it computes, padding included, plus a fixed overhead (`CALL_OVERHEAD_PAIRS`), and the
bucketed path pays for gathering the row into its calls and back (`GATHER_PAIRS_PER_TOKEN`), which the loop's slices
do not; both measured with `python -m benchmarks.bench_attention --calibrate`. Groups sorted by length are cut into
the runs of least total cost (an exact dynamic programme over the sorted order), no call holding more than
`MAX_CALL_KEY_ELEMENTS` keys (beyond it the calls leave the CPU's caches); the buckets are taken when they cost less
than the loop. So on one thread they pay for many small groups; for longer groups the calls' overhead is small next
to their pairs and the loop stays.

Padding never changes a real output: padded keys are masked for every real query, and padded key slots read a token
that every real query of their row already sees (the group's first prefix token, the suffix's first token), so a NaN
reaches a padded slot only where the real outputs of that row are NaN already. Padded query rows see at least one real
key (finite) and are discarded.
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
    base_attention: AttentionFn, module, suffix_query, prefix_key, prefix_value, suffix_key, suffix_value, plan,
    **kwargs,
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


def sdpa_sharing_kv_heads(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """
    transformers' `sdpa_attention_forward` for the split attention's masked CPU calls, with grouped KV heads kept.

    With a mask, transformers repeats keys and values per query head before torch's SDPA (`repeat_kv`), as CUDA's
    fused kernels take no mask with grouped heads; the CPU kernel does (`enable_gqa=True`, the same kernel and the
    same sums), so the masked calls here skip the copy, its backward's reduction and the zero-filled gradients of the
    repeated keys and values. The suffix calls are masked and their keys include the prefix once per suffix, so that
    copy is the largest of the CPU path. Anything else (no mask, no grouped heads, another device, softcap, a position
    bias, attention weights asked for) goes to transformers' function unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (
        attention_mask is None
        or groups <= 1
        or query.device.type != "cpu"
        or query.size(1) != key.size(1) * groups
        or kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
        or kwargs.get("output_attentions", False)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------------------------------------
# Cost model and buckets (see the module docstring).

# The cost model, in query-key pairs of an attention of width `CALL_OVERHEAD_WIDTH` (heads x head_dim) on one thread.
# - A call costs the pairs it computes (padding included) plus `CALL_OVERHEAD_PAIRS`: dispatch, the slicing around it
#   and the backward's bookkeeping, the same whatever the call's size. A pair's cost grows with the width and shrinks
#   with the threads; the overhead does not (with threads it grows: each call's parallel regions wait for all of them),
#   so it is scaled by threads / width.
# - The bucketed path also gathers every token of the row into its calls and back (forward, and a zero-filled scatter
#   in the backward), which the loop's slices do not: `GATHER_PAIRS_PER_TOKEN` per packed token.
# Measured with `python -m benchmarks.bench_attention --calibrate` (one thread, 2-core x86 CPU, quiet host; five runs):
# 200-510 us per call and 0-4.7 us per token, a pair taking about 105 ns. The token's cost is the difference of two
# nearly equal times and the noisiest; what the choice depends on is their ratio, about 190 tokens per call saved.
CALL_OVERHEAD_PAIRS = 3000
GATHER_PAIRS_PER_TOKEN = 16
CALL_OVERHEAD_WIDTH = 256
# The largest call that takes several groups, in key elements (keys x query heads x head_dim): beyond it the keys and
# values (repeated per query head in a masked call when this was measured, before `sdpa_sharing_kv_heads`; still so
# with eager) and their gradients leave the CPU's caches, and the copies and zero-fills around the kernel cost more
# than the calls saved. A single group is never split. 0 means the per-group
# loop everywhere.
MAX_CALL_KEY_ELEMENTS = 2**20


def call_overhead_pairs(width: int, threads: int = 1) -> float:
    """The fixed cost of one call, in query-key pairs of an attention of `width` = heads x head_dim."""
    return CALL_OVERHEAD_PAIRS * CALL_OVERHEAD_WIDTH * max(threads, 1) / max(width, 1)


@dataclass(frozen=True)
class _CallKind:
    """Pairs and keys of one call over `rows` rows whose longest prefix and longest query are given."""

    pairs: Callable[[int, int, int], int]
    keys: Callable[[int, int, int], int]


# Prefix calls are causal (the kernel skips the blocks above the diagonal): rows x P(P+1)/2 pairs, P keys per row.
_PREFIX_CALL = _CallKind(
    pairs=lambda rows, prefix, query: rows * prefix * (prefix + 1) // 2,
    keys=lambda rows, prefix, query: rows * prefix,
)
# Suffix calls are masked: every row computes C x (P + C) pairs against P + C keys.
_SUFFIX_CALL = _CallKind(
    pairs=lambda rows, prefix, query: rows * query * (prefix + query),
    keys=lambda rows, prefix, query: rows * (prefix + query),
)


def _cheapest_runs(items: list[tuple[int, int, int]], kind: _CallKind, width: int, threads: int) -> list[list[int]]:
    """
    Cut `items` (in the given order) into contiguous runs, one call each, of least total cost (dynamic programme over
    the run ends; a run stops growing once it costs more than the best split found or exceeds the size cap).

    Args:
        items: `(rows, prefix_len, query_len)` of each group, sorted by length.
        kind: how a call over a run counts its pairs and keys.
        width: heads x head_dim of the attention; threads: the CPU threads it runs on.

    Returns:
        The runs, as lists of positions in `items`.
    """
    overhead = call_overhead_pairs(width, threads)
    max_keys = MAX_CALL_KEY_ELEMENTS / max(width, 1)
    count = len(items)
    # Best (cost, sum of squared keys per call) of the first `end` items: among equal costs, the most even calls.
    best = [(0.0, 0)] + [(float("inf"), 0)] * count
    run_start = [0] * (count + 1)
    for last in range(count):
        rows = longest_prefix = longest_query = 0
        for first in range(last, -1, -1):
            item_rows, prefix_len, query_len = items[first]
            rows += item_rows
            longest_prefix, longest_query = max(longest_prefix, prefix_len), max(longest_query, query_len)
            cost = overhead + kind.pairs(rows, longest_prefix, longest_query)
            keys = kind.keys(rows, longest_prefix, longest_query)
            if cost > best[last + 1][0] or (first < last and keys > max_keys):
                break  # a longer run only costs more and holds more keys; what precedes it costs >= 0
            candidate = (best[first][0] + cost, best[first][1] + keys * keys)
            if candidate < best[last + 1]:
                best[last + 1], run_start[last + 1] = candidate, first
    runs, end = [], count
    while end > 0:
        runs.append(list(range(run_start[end], end)))
        end = run_start[end]
    return runs[::-1]


def plan_buckets(
    prefix_lens: list[int], suffix_lens: list[list[int]], width: int, threads: int = 1
) -> tuple[list, list] | None:
    """
    Which groups share an attention call, from a layout's lengths: `(prefix_buckets, suffix_buckets)`, each a list of
    lists of group indices, or None when the per-group loop costs less.

    Prefix buckets hold the groups with a prefix, sorted by its length; suffix buckets hold every group (all its
    suffixes), sorted by prefix + longest suffix; each is cut into the runs of least cost (`_cheapest_runs`). The
    buckets are taken if their calls, pairs and gathers cost less than the loop's calls and pairs.
    """
    if not prefix_lens:
        return None
    with_prefix = sorted((g for g, length in enumerate(prefix_lens) if length > 0), key=lambda g: prefix_lens[g])
    prefix_runs = _cheapest_runs(
        [(1, prefix_lens[g], prefix_lens[g]) for g in with_prefix], _PREFIX_CALL, width, threads
    )
    by_span = sorted(range(len(prefix_lens)), key=lambda g: (prefix_lens[g] + max(suffix_lens[g]), g))
    suffix_runs = _cheapest_runs(
        [(len(suffix_lens[g]), prefix_lens[g], max(suffix_lens[g])) for g in by_span], _SUFFIX_CALL, width, threads
    )
    prefix_buckets = [sorted(with_prefix[i] for i in run) for run in prefix_runs]
    suffix_buckets = [sorted(by_span[i] for i in run) for run in suffix_runs]
    if all(len(bucket) == 1 for bucket in prefix_buckets + suffix_buckets):
        return None
    overhead = call_overhead_pairs(width, threads)
    tokens = sum(prefix_lens) + sum(sum(lens) for lens in suffix_lens)
    loop_calls = len(with_prefix) + len(prefix_lens)
    loop = loop_calls * overhead + _loop_pairs(prefix_lens, suffix_lens)
    bucketed = (
        (len(prefix_buckets) + len(suffix_buckets)) * overhead
        + _bucketed_pairs(prefix_lens, suffix_lens, prefix_buckets, suffix_buckets)
        + GATHER_PAIRS_PER_TOKEN * tokens
    )
    return (prefix_buckets, suffix_buckets) if bucketed < loop else None


def _loop_pairs(prefix_lens: list[int], suffix_lens: list[list[int]]) -> int:
    pairs = 0
    for prefix_len, lens in zip(prefix_lens, suffix_lens):
        pairs += _PREFIX_CALL.pairs(1, prefix_len, prefix_len)
        if _batching_pays(prefix_len, lens):
            pairs += _SUFFIX_CALL.pairs(len(lens), prefix_len, max(lens))
        else:
            pairs += sum(lens) * (prefix_len + sum(lens))
    return pairs


def _bucketed_pairs(prefix_lens, suffix_lens, prefix_buckets: list, suffix_buckets: list) -> int:
    pairs = 0
    for bucket in prefix_buckets:
        pairs += _PREFIX_CALL.pairs(len(bucket), max(prefix_lens[g] for g in bucket), 0)
    for bucket in suffix_buckets:
        rows = sum(len(suffix_lens[g]) for g in bucket)
        longest_prefix = max(prefix_lens[g] for g in bucket)
        pairs += _SUFFIX_CALL.pairs(rows, longest_prefix, max(max(suffix_lens[g]) for g in bucket))
    return pairs


def planned_attention_pairs(
    prefix_lens: list[int], suffix_lens: list[list[int]], width: int, threads: int = 1
) -> int:
    """
    Query-key pairs per layer that `split_attention` computes for a layout with these lengths (masked-out and padded
    pairs included; a causal prefix counts its lower triangle): what the benchmarks' FLOP model counts.
    """
    buckets = plan_buckets(prefix_lens, suffix_lens, width, threads)
    if buckets is None:
        return _loop_pairs(prefix_lens, suffix_lens)
    return _bucketed_pairs(prefix_lens, suffix_lens, *buckets)


@dataclass
class _Call:
    """One attention call of the bucketed path: `rows` sequences of `query_len` queries and `key_len` keys."""

    rows: int
    query_len: int
    key_len: int
    mask: torch.Tensor | None  # prefix: None (sdpa, is_causal) or additive causal (eager); suffix: (rows, 1, Lq, Lk)
    is_causal: bool


@dataclass
class _BucketedPlan:
    """
    Index maps of the bucketed path, built once per layout and shared by every layer.

    query_gather (`(sum rows * query_len,)` long), key_gather (`(sum rows * key_len,)` long): the packed position
        feeding each slot of every call's queries / keys and values, call by call (prefix calls first).
    inverse (`(T,)` long): packed position -> row of the calls' outputs, flattened and concatenated.
    """

    calls: list[_Call]
    query_gather: torch.Tensor
    key_gather: torch.Tensor
    inverse: torch.Tensor

    @property
    def query_sizes(self) -> list[int]:
        return [call.rows * call.query_len for call in self.calls]

    @property
    def key_sizes(self) -> list[int]:
        return [call.rows * call.key_len for call in self.calls]


def _bucketed_plan(
    layout: GroupLayout, prefix_buckets: list, suffix_buckets: list, device: torch.device,
    additive_dtype: torch.dtype | None,
) -> _BucketedPlan:
    group_starts = torch.tensor(layout.group_starts, dtype=torch.long)
    prefix_lens = torch.tensor(layout.prefix_lens, dtype=torch.long)
    calls, query_gather, key_gather, outputs = [], [], [], []

    for bucket in prefix_buckets:
        groups = torch.tensor(bucket, dtype=torch.long)
        lens, starts = prefix_lens[groups][:, None], group_starts[groups][:, None]
        longest = int(lens.max())
        slot = torch.arange(longest)[None, :]
        real = slot < lens
        # Padding reads the group's first prefix token, which every real query of the row sees.
        gather = torch.where(real, starts + slot, starts).reshape(-1)
        query_gather.append(gather)
        key_gather.append(gather)
        outputs.append(torch.where(real, starts + slot, -1).reshape(-1))
        mask = None
        if additive_dtype is not None and longest > 1:
            mask = _as_additive(_causal_mask(longest, torch.device("cpu")), additive_dtype)
        calls.append(_Call(len(bucket), longest, longest, mask, is_causal=True))

    for bucket in suffix_buckets:
        group_of_row, own_starts, own_lens = [], [], []
        for group in bucket:
            cursor = layout.group_starts[group] + layout.prefix_lens[group]
            for suffix_len in layout.suffix_lens[group]:
                group_of_row.append(group)
                own_starts.append(cursor)
                own_lens.append(suffix_len)
                cursor += suffix_len
        rows = torch.tensor(group_of_row, dtype=torch.long)
        own_starts = torch.tensor(own_starts, dtype=torch.long)[:, None]
        own_lens = torch.tensor(own_lens, dtype=torch.long)[:, None]
        lens, starts = prefix_lens[rows][:, None], group_starts[rows][:, None]
        longest_prefix, longest_own = int(lens.max()), int(own_lens.max())
        prefix_slot, own_slot = torch.arange(longest_prefix)[None, :], torch.arange(longest_own)[None, :]
        prefix_real, own_real = prefix_slot < lens, own_slot < own_lens
        # Padded keys read the suffix's first token (every real query of the row sees it); padded queries read the
        # suffix's last token and see its real keys, so they stay finite; their outputs are dropped.
        query_gather.append(torch.where(own_real, own_starts + own_slot, own_starts + own_lens - 1).reshape(-1))
        keys = torch.cat([torch.where(prefix_real, starts + prefix_slot, own_starts),
                          torch.where(own_real, own_starts + own_slot, own_starts)], dim=1)
        key_gather.append(keys.reshape(-1))
        outputs.append(torch.where(own_real, own_starts + own_slot, -1).reshape(-1))
        query = own_slot[:, :, None]  # (1, Cmax, 1)
        own_visible = (own_slot[:, None, :] <= query) & own_real[:, None, :]  # (n, Cmax, Cmax)
        prefix_visible = prefix_real[:, None, :].expand(-1, longest_own, -1)  # (n, Cmax, Pmax)
        mask = torch.cat([prefix_visible, own_visible], dim=2).unsqueeze(1)
        if additive_dtype is not None:
            mask = _as_additive(mask, additive_dtype)
        calls.append(_Call(len(group_of_row), longest_own, longest_prefix + longest_own, mask, is_causal=False))

    outputs = torch.cat(outputs)
    real = outputs >= 0
    inverse = torch.empty(layout.packed_tokens, dtype=torch.long)
    inverse[outputs[real]] = torch.arange(outputs.numel())[real]
    for call in calls:
        call.mask = None if call.mask is None else call.mask.to(device)
    return _BucketedPlan(
        calls=calls,
        query_gather=torch.cat(query_gather).to(device),
        key_gather=torch.cat(key_gather).to(device),
        inverse=inverse.to(device),
    )


@dataclass
class _SplitPlan:
    """How `split_attention` runs a layout: the per-group loop (`group_plans`) or the bucketed calls (`bucketed`)."""

    group_plans: list[_GroupPlan] | None
    bucketed: _BucketedPlan | None


def _split_plan(
    layout: GroupLayout, device: torch.device, additive_dtype: torch.dtype | None, width: int
) -> _SplitPlan:
    """
    The plan of a layout, decided from its lengths once per layout, device, mask dtype and width, and shared by every
    layer. On a CPU the cost model counts the threads torch runs on; elsewhere one (a GPU's per-call cost is
    not the CPU's, and the pairs dominate there).
    """
    key = ("split", str(device), additive_dtype, width)
    plan = layout._mask_cache.get(key)
    if plan is None:
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        buckets = plan_buckets(layout.prefix_lens, layout.suffix_lens, width, threads)
        if buckets is None:
            plan = _SplitPlan(_group_plans(layout, device, additive_dtype), None)
        else:
            plan = _SplitPlan(None, _bucketed_plan(layout, *buckets, device, additive_dtype))
        layout._mask_cache[key] = plan
    return plan


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
    plan = _split_plan(layout, query.device, additive_dtype, query.size(1) * query.size(3))
    kwargs.pop("is_causal", None)
    if plan.bucketed is not None:
        return _bucketed_attention(base_attention, module, query, key, value, plan.bucketed, **kwargs)
    return _per_group_attention(base_attention, module, query, key, value, layout, plan.group_plans, **kwargs)


def _as_batch(tokens: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """`(rows * length, h, D)` token-major slots of one call -> `(rows, h, length, D)`."""
    return tokens.unflatten(0, (rows, length)).transpose(1, 2)


def _bucketed_attention(
    base_attention: AttentionFn, module, query, key, value, plan: _BucketedPlan, **kwargs
) -> tuple[torch.Tensor, None]:
    """The bucketed calls: one gather per input, one call per bucket, one gather back to packed order."""
    # (1, H, T, D) -> (T, H, D): token-major rows, one gather each for all calls (the backward of a gather adds into
    # one gradient the size of the row, so one gather per tensor, not one per call).
    query_rows = query[0].transpose(0, 1).index_select(0, plan.query_gather)
    key_rows = key[0].transpose(0, 1).index_select(0, plan.key_gather)
    value_rows = value[0].transpose(0, 1).index_select(0, plan.key_gather)
    outputs = []
    for call, call_query, call_key, call_value in zip(
        plan.calls, query_rows.split(plan.query_sizes), key_rows.split(plan.key_sizes),
        value_rows.split(plan.key_sizes),
    ):
        out, _ = base_attention(
            module, _as_batch(call_query, call.rows, call.query_len), _as_batch(call_key, call.rows, call.key_len),
            _as_batch(call_value, call.rows, call.key_len), call.mask, is_causal=call.is_causal, **kwargs,
        )
        outputs.append(out.flatten(0, 1))  # (rows * query_len, H, D)
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return out.index_select(0, plan.inverse).unsqueeze(0), None


def _per_group_attention(
    base_attention: AttentionFn, module, query, key, value, layout: GroupLayout, plans: list[_GroupPlan], **kwargs
) -> tuple[torch.Tensor, None]:
    """The per-group loop: each group's prefix call, then its suffix call (see the module docstring)."""
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
    prefix_positions, prefix_lens, suffix_positions, suffix_kv_positions = [], [], [], []
    suffix_q_lens, suffix_k_lens = [], []
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
        outputs.append(
            varlen_fn(q_p, k_p, v_p, plan.cu_prefix, plan.cu_prefix, plan.max_prefix, plan.max_prefix, scaling)
        )
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
