"""
The split attention paths against a dense reference of the packed-row mask (built here, in the test only), on random
q/k/v in fp64: outputs and input gradients. The varlen path (GPU kernels) runs here with a CPU reference kernel of the
same contract, so its bookkeeping is checked on every machine; the kernels themselves are GPU tests.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import make_batch, tiny_model
from test_equivalence import LAYOUT_CASES, layout_batch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

from prefix_grouper_trl.attention import sdpa_sharing_kv_heads, split_attention, split_attention_varlen
from prefix_grouper_trl.layout import build_group_layout


def dense_packed_mask(layout):
    """(T, T) bool: causal within a prefix, suffix -> own prefix + own causal tokens. Reference only."""
    total = layout.packed_tokens
    group = torch.full((total,), -1)
    suffix = torch.full((total,), -1)  # -1 on prefix tokens
    suffix_counter = 0
    for index, (start, prefix_len, suffix_lens) in enumerate(layout.group_segments()):
        cursor = start + prefix_len
        group[start : cursor + sum(suffix_lens)] = index
        for suffix_len in suffix_lens:
            suffix[cursor : cursor + suffix_len] = suffix_counter
            suffix_counter += 1
            cursor += suffix_len
    q, k = torch.arange(total)[:, None], torch.arange(total)[None, :]
    same_group = group[:, None] == group[None, :]
    key_in_prefix = (suffix == -1)[None, :]
    same_suffix = suffix[:, None] == suffix[None, :]
    return same_group & (k <= q) & (key_in_prefix | same_suffix)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """CPU stand-in with the flash-attn varlen contract: causal per segment, aligned bottom-right."""
    outputs = []
    for i in range(len(cu_q) - 1):
        qs, ks, vs = (x[c[i] : c[i + 1]].transpose(0, 1) for x, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        mask = torch.ones(qs.size(1), ks.size(1), dtype=torch.bool).tril(diagonal=ks.size(1) - qs.size(1))
        outputs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True))
    return torch.cat([o.transpose(0, 1) for o in outputs])


# The CPU split attention's base functions: transformers' own, and sdpa with grouped KV heads kept in masked calls
# (what `integration` runs for sdpa on a CPU). `(base, needs_explicit_causal_mask)`.
BASES = {
    "sdpa": (sdpa_attention_forward, False),
    "sdpa_shared_kv": (sdpa_sharing_kv_heads, False),
    "eager": (eager_attention_forward, True),
}


@pytest.fixture(scope="module")
def attention_module():
    return tiny_model("qwen2", dtype=torch.float64).model.layers[0].self_attn


def run_path(path, attention_module, layout, q, k, v):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    scale = attention_module.scaling
    if path == "dense":
        mask = dense_packed_mask(layout).view(1, 1, layout.packed_tokens, layout.packed_tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)
    elif path == "varlen":
        out, _ = split_attention_varlen(reference_varlen, q, k, v, layout, scaling=scale)
    else:
        base, eager = BASES[path]
        out, _ = split_attention(base, eager, attention_module, q, k, v, layout, scaling=scale, dropout=0.0)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    (out * weights).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("path", ["sdpa", "sdpa_shared_kv", "eager", "varlen"])
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_split_attention_matches_dense_reference(attention_module, path, case):
    layout = build_group_layout(*layout_batch(case))
    heads, kv_heads, head_dim = 4, 2, 8
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, layout.packed_tokens, head_dim, generator=generator, dtype=torch.float64)
    k = torch.randn(1, kv_heads, layout.packed_tokens, head_dim, generator=generator, dtype=torch.float64)
    v = torch.randn(1, kv_heads, layout.packed_tokens, head_dim, generator=generator, dtype=torch.float64)
    expected = run_path("dense", attention_module, layout, q, k, v)
    got = run_path(path, attention_module, layout, q, k, v)
    # transformers' eager softmax runs in fp32 whatever the input dtype.
    tolerance = 1e-6 if path == "eager" else 1e-10
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=lambda m: f"{path}/{case} {name}: {m}")
    assert layout.attention_calls == 1


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_flex_mask_function_matches_dense_reference(case):
    from prefix_grouper_trl.attention import packed_token_ids

    layout = build_group_layout(*layout_batch(case))
    group, suffix = packed_token_ids(layout, torch.device("cpu"))
    q, k = torch.arange(layout.packed_tokens)[:, None], torch.arange(layout.packed_tokens)[None, :]
    visible = (group[q] == group[k]) & (k <= q) & ((suffix[k] == -1) | (suffix[k] == suffix[q]))
    assert torch.equal(visible, dense_packed_mask(layout))


def test_flex_attention_forward_matches_repeated_forward():
    """FlexAttention runs forward only on CPU (no backward there): hidden states of every scored position."""
    from prefix_grouper_trl.integration import enable_prefix_grouping, grouped_forward

    reference, model = tiny_model("qwen2", "sdpa"), tiny_model("qwen2", "flex_attention")
    enable_prefix_grouping(model)
    input_ids, attention_mask, logits_to_keep = layout_batch("uneven_groups")
    layout = build_group_layout(input_ids, attention_mask, logits_to_keep)
    with torch.no_grad(), grouped_forward():
        packed = model.model(
            input_ids=layout.input_ids, position_ids=layout.position_ids, prefix_group_layout=layout
        ).last_hidden_state
    with torch.no_grad():
        repeated = reference.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows = layout.scored_slots // logits_to_keep
    columns = layout.scored_slots % logits_to_keep + input_ids.size(1) - logits_to_keep - 1
    torch.testing.assert_close(packed[0, layout.scored_positions], repeated[rows, columns], atol=1e-5, rtol=1e-5)
    assert layout.attention_calls == model.config.num_hidden_layers


def test_batched_suffix_path_is_exercised():
    """A single group runs the per-group loop, whose suffixes are batched per suffix when it has several."""
    from prefix_grouper_trl.attention import _group_plans, _split_plan

    layout = build_group_layout(*layout_batch("one_group"))
    assert _split_plan(layout, torch.device("cpu"), None, 32).group_plans is not None
    plans = _group_plans(layout, torch.device("cpu"), None)
    assert [plan.batched is not None for plan in plans] == [True]


# --- Buckets: several groups per call --------------------------------------------------------------------------------


def test_cost_model_buckets_by_hand():
    from prefix_grouper_trl import attention

    # Width 256 (cpu-small): a call costs 3000 pairs. Equal small groups share calls...
    assert attention.plan_buckets([63] * 4, [[16, 16]] * 4, 256) == ([[0, 1, 2, 3]], [[0, 1, 2, 3]])
    # ...but one group always runs the per-group loop, and so do groups whose calls cost little next to their pairs
    # and the gathers the buckets add (16 pairs per token).
    assert attention.plan_buckets([63], [[16, 16]], 256) is None
    assert attention.plan_buckets([511] * 4, [[128] * 8] * 4, 256) is None
    # Width 32 (the tests' tiny models): 24000 pairs per call. Padding prefix 3 to 250 costs 31k pairs, more than a
    # call, so the prefixes split by length; a group without a prefix has no prefix call.
    prefix_lens, suffix_lens = [3, 250, 5, 0, 239], [[20, 18, 20, 7, 20, 1], [5, 3], [4, 4, 2], [3, 5], [6]]
    assert attention.plan_buckets(prefix_lens, suffix_lens, 32) == ([[0, 2], [1, 4]], [[0, 2, 3], [1, 4]])
    # The pairs computed, padding included: prefixes 2 x 5*6/2 + 2 x 250*251/2; suffixes 11 rows x 20 x (5 + 20)
    # and 3 rows x 6 x (250 + 6).
    assert attention.planned_attention_pairs(prefix_lens, suffix_lens, 32) == 30 + 62750 + 5500 + 4608
    # More threads make a call dearer: two 200-token groups share calls on 2 threads, not on 1.
    assert attention.plan_buckets([200, 200], [[8, 8], [8, 8]], 256, threads=1) is None
    assert attention.plan_buckets([200, 200], [[8, 8], [8, 8]], 256, threads=2) == ([[0, 1]], [[0, 1]])


def test_calls_are_capped_and_even(monkeypatch):
    from prefix_grouper_trl import attention

    # 8 equal groups of 8 suffixes, 8 x (100 + 10) = 880 keys each; at most 2000 keys per call: 2 groups per call,
    # every call the same size rather than 2 + 2 + 2 + 2 by chance of the order.
    monkeypatch.setattr(attention, "MAX_CALL_KEY_ELEMENTS", 2000 * 256)
    buckets = attention.plan_buckets([100] * 8, [[10] * 8] * 8, 256)
    assert buckets is not None
    assert [len(bucket) for bucket in buckets[1]] == [2, 2, 2, 2]
    assert sorted(g for bucket in buckets[1] for g in bucket) == list(range(8))
    # 0 turns bucketing off.
    monkeypatch.setattr(attention, "MAX_CALL_KEY_ELEMENTS", 0)
    assert attention.plan_buckets([100] * 8, [[10] * 8] * 8, 256) is None


def test_bucketed_plan_index_maps():
    """Two groups in one prefix call and one suffix call: gathers, padding and the way back, by hand."""
    from prefix_grouper_trl.attention import _bucketed_plan

    # Rows: group A prompt 3 (prefix 2) with completions 2 and 1; group B prompt 2 (prefix 1) with completion 3.
    input_ids, attention_mask, logits_to_keep = make_batch([3, 3, 2], [2, 1, 3], [0, 0, 1])
    layout = build_group_layout(input_ids, attention_mask, logits_to_keep)
    # Packed: A prefix 0-1 | a 2-3 | b 4 | B prefix 5 | c 6-8.
    assert (layout.prefix_lens, layout.suffix_lens, layout.group_starts) == ([2, 1], [[2, 1], [3]], [0, 5])
    plan = _bucketed_plan(layout, [[0, 1]], [[0, 1]], torch.device("cpu"), None)
    prefix_call, suffix_call = plan.calls
    assert (prefix_call.rows, prefix_call.query_len, prefix_call.key_len, prefix_call.is_causal) == (2, 2, 2, True)
    assert (suffix_call.rows, suffix_call.query_len, suffix_call.key_len) == (3, 3, 5)
    # Prefix call: [0 1] and [5 5] (padding repeats the group's first prefix token). Suffix queries: a [2 3 3],
    # b [4 4 4], c [6 7 8] (padding repeats the suffix's last token).
    assert plan.query_gather.tolist() == [0, 1, 5, 5] + [2, 3, 3, 4, 4, 4, 6, 7, 8]
    # Suffix keys: [prefix slots | own slots]; padding reads the suffix's first token.
    assert plan.key_gather.tolist() == [0, 1, 5, 5] + [0, 1, 2, 3, 2] + [0, 1, 4, 4, 4] + [5, 6, 6, 7, 8]
    assert suffix_call.mask[:, 0].int().tolist() == [
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]],  # a: second slot real, third padding
        [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]],  # b: one token
        [[1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 1, 1, 1]],  # c: its prefix has one token
    ]
    # Output rows: prefix call 0-3, suffix call 4-12; packed position -> row.
    assert plan.inverse.tolist() == [0, 1, 4, 5, 7, 2, 10, 11, 12]


@pytest.mark.parametrize("path", ["sdpa", "sdpa_shared_kv", "eager"])
@pytest.mark.parametrize("max_call_keys", [None, 300], ids=["cost_model", "capped"])
def test_buckets_match_dense_reference(monkeypatch, attention_module, path, max_call_keys):
    """
    The boundary-crossing layout through the buckets (2 prefix calls, 2 suffix calls), and with calls capped at 300
    keys, which splits the long groups' shared calls (prefixes 250 and 239 apart, their suffixes apart: 6 calls).
    """
    from prefix_grouper_trl import attention

    if max_call_keys is not None:
        monkeypatch.setattr(attention, "MAX_CALL_KEY_ELEMENTS", max_call_keys * 32)
    layout = build_group_layout(*layout_batch("bucket_boundaries"))
    plan = attention._split_plan(layout, torch.device("cpu"), None, 32)
    assert plan.bucketed is not None
    assert len(plan.bucketed.calls) == (4 if max_call_keys is None else 6)
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, layout.packed_tokens, 8, generator=generator, dtype=torch.float64) for h in (4, 2, 2))
    layout._mask_cache.clear()
    expected = run_path("dense", attention_module, layout, q, k, v)
    got = run_path(path, attention_module, layout, q, k, v)
    tolerance = 1e-6 if path == "eager" else 1e-10
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=lambda m: f"{path} {name}: {m}")


@pytest.mark.parametrize("path", ["sdpa", "sdpa_shared_kv", "eager"])
@pytest.mark.parametrize("case", ["one_group", "bucket_boundaries"], ids=["loop", "buckets"])
def test_nan_reaches_the_queries_that_see_it_and_no_other_suffix(attention_module, path, case):
    """
    A NaN key/value reaches every query whose mask opens it, and no query of another suffix or group: padding never
    carries it across rows, in the loop or in the buckets (shared calls). Earlier queries of its own prompt or suffix
    may get it through 0 x NaN of the causal mask inside a kernel block, as in the repeated forward (same kernel).
    """
    layout = build_group_layout(*layout_batch(case))
    visible = dense_packed_mask(layout)
    segment = torch.empty(layout.packed_tokens, dtype=torch.long)
    count = 0
    for start, prefix_len, suffix_lens in layout.group_segments():
        bounds = [start, start + prefix_len]
        for suffix_len in suffix_lens:
            bounds.append(bounds[-1] + suffix_len)
        for first, end in zip(bounds, bounds[1:]):
            segment[first:end] = count
            count += 1
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, layout.packed_tokens, 8, generator=generator, dtype=torch.float64) for h in (4, 2, 2))
    # Every token in turn (padding slots read real tokens: any of them might be read into another row).
    for position in range(layout.packed_tokens):
        k_nan, v_nan = k.clone(), v.clone()
        k_nan[:, :, position], v_nan[:, :, position] = float("nan"), float("nan")
        base, eager = BASES[path]
        out, _ = split_attention(base, eager, attention_module, q, k_nan, v_nan, layout,
                                 scaling=attention_module.scaling, dropout=0.0)
        nan_rows = out[0].isnan().any(dim=(1, 2))
        same_segment = segment == segment[position]
        assert nan_rows[visible[:, position]].all(), f"{path}/{case}: a NaN at key {position} is hidden"
        leaked = nan_rows & ~visible[:, position] & ~same_segment
        assert not leaked.any(), f"{path}/{case}: NaN at {position} leaked to {leaked.nonzero().flatten().tolist()}"


@pytest.mark.parametrize("position_bias", [False, True], ids=["masked", "masked_with_position_bias"])
def test_sdpa_sharing_kv_heads_equals_transformers_sdpa(attention_module, position_bias):
    """
    A masked call with grouped KV heads goes to torch's SDPA with `enable_gqa` (no repeated keys and values); a call
    it does not cover (here a position bias, which its own branch would drop) goes to transformers' function.
    Outputs, the `(b, t, H, D)` layout and the input gradients are the same as transformers'.
    """
    assert attention_module.num_key_value_groups == 2
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(3, 4, 5, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 9, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(3, 1, 5, 9, generator=generator) < 0.7
    mask[..., 0] = True  # every query row sees a key
    bias = torch.randn(3, 4, 5, 9, generator=generator, dtype=torch.float64)
    extra = {"position_bias": bias} if position_bias else {}
    results = []
    for base in (sdpa_attention_forward, sdpa_sharing_kv_heads):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out, weights = base(attention_module, *inputs, mask, dropout=0.0, scaling=0.3, is_causal=False, **extra)
        assert weights is None and out.shape == (3, 5, 4, 8) and out.is_contiguous()
        out.mul(torch.arange(out.numel(), dtype=out.dtype).view(out.shape).cos()).sum().backward()
        results.append([out.detach()] + [x.grad for x in inputs])
    for name, a, b in zip(("output", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
