"""
The split attention paths against a dense reference of the packed-row mask (built here, in the test only), on random
q/k/v in fp64: outputs and input gradients. The varlen path (GPU kernels) runs here with a CPU reference kernel of the
same contract, so its bookkeeping is checked on every machine; the kernels themselves are GPU tests.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model
from test_equivalence import LAYOUT_CASES, layout_batch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

from prefix_grouper_trl.attention import split_attention, split_attention_varlen
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
        base, eager = (eager_attention_forward, True) if path == "eager" else (sdpa_attention_forward, False)
        out, _ = split_attention(base, eager, attention_module, q, k, v, layout, scaling=scale, dropout=0.0)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    (out * weights).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("path", ["sdpa", "eager", "varlen"])
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
    from prefix_grouper_trl.attention import _group_plans

    layout = build_group_layout(*layout_batch("batched_suffixes"))
    plans = _group_plans(layout, torch.device("cpu"), None)
    assert [plan.batched is not None for plan in plans] == [True, True]
