"""
Running the paper's reference implementation (PyPI `prefix-grouper`, `import prefix_grouper`) on the benchmark model.

The reference ships one transformers integration, `prefix_grouper.utils.register_transformers.register_attention()`,
which registers the attention implementation `prefix_grouper_attention`. That function splits each layer's q/k/v into
a padded prefix batch and a padded suffix batch (the prefix keys repeated once per response), and calls
`ALL_ATTENTION_FUNCTIONS[prefix_grouper_attn_func]` twice with a *2-D padding mask* `(batch, keys)`:

    prefix call:  q, k, v = (num_groups,    H, P_max,         D)   mask (num_groups,    P_max)          left-padded
    suffix call:  q       = (num_responses, H, S_max,         D)
                  k, v    = (num_responses, H, P_max + S_max, D)   mask (num_responses, P_max + S_max)  [left | right]

With `flash_attention_2` (its default and only supported backend) the 2-D mask drives unpadding and flash-attn's
causal mask is bottom-right aligned, so a suffix query `i` sees the whole prefix and its own suffix up to `i`. There is
no flash-attn on a CPU, so `sdpa_from_padding_mask` below is the missing piece: it turns the 2-D mask into the
boolean 4-D mask that flash-attn's unpadding + bottom-right causality imply and calls transformers' own
`sdpa_attention_forward`. Padded query rows (whose outputs the reference's `group()` drops) are opened to every key so
that they stay finite. When a call has no padding and square q/k, it uses `is_causal=True` and no mask, as flash-attn
would; a masked call keeps grouped KV heads as they are (`enable_gqa`, through the library's own
`attention.sdpa_sharing_kv_heads`), as flash-attn does, instead of the copy per query head that transformers makes
before a masked SDPA call. So the adapter adds no work the reference would not do, and its calls run the same
kernels as ours.

The data flow around the model follows the reference's README ("Best Practices", version >= 0.0.1rc2):
`PrefixGrouper.from_ungrouped_masks` -> `concat_input` -> `model(..., prefix_grouper=...)` returning full logits ->
`split_output(logits, include_prefix_last=1)` -> log-softmax and gather. The reference leaves position ids to the
user; we give every response the positions it has after its prompt (`0..p-1`, then `p..p+s-1` for each response).
"""

import torch
from prefix_grouper import PrefixGrouper
from prefix_grouper.utils.register_transformers import register_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from prefix_grouper_trl.attention import sdpa_sharing_kv_heads

REFERENCE_ATTENTION = "prefix_grouper_attention"
SDPA_ADAPTER = "prefix_grouper_bench_sdpa_adapter"
_registered = False


def sdpa_from_padding_mask(module, query, key, value, attention_mask, **kwargs):
    """
    SDPA with the mask flash-attn would apply for a 2-D padding mask and bottom-right causality.

    Args:
        query (`(b, H, Lq, D)`), key / value (`(b, H_kv, Lk, D)`), attention_mask (`(b, Lk)` bool, True = real key).
        The last `Lq` keys are the queries' own positions (true for both calls of the reference).
    """
    kwargs.pop("is_causal", None)
    key_valid = attention_mask.bool()
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len == k_len and bool(key_valid.all()):
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)
    offset = k_len - q_len
    device = query.device
    causal = torch.arange(k_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None] + offset
    allowed = causal[None] & key_valid[:, None, :]
    query_valid = key_valid[:, offset:]
    allowed = allowed | ~query_valid[:, :, None]
    return sdpa_sharing_kv_heads(module, query, key, value, allowed[:, None], **kwargs)


def register_reference_attention() -> None:
    """Register the reference's `prefix_grouper_attention` and our SDPA adapter with transformers. Idempotent."""
    global _registered
    if not _registered:
        register_attention()
        AttentionInterface.register(SDPA_ADAPTER, sdpa_from_padding_mask)
        _registered = True


def enable_reference(model, base_attention: str = SDPA_ADAPTER) -> None:
    """Switch `model` to the reference's attention; `base_attention` is what it calls per block."""
    register_reference_attention()
    model.set_attn_implementation(REFERENCE_ATTENTION)
    model._prefix_grouper_base_attention = base_attention


def _group_rows(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """Rows ordered by prompt group, the first row of each group and the group sizes (what the reference needs)."""
    keyed = prompt_ids.masked_fill(prompt_mask == 0, -1)
    _, group_of_row = torch.unique(keyed, dim=0, return_inverse=True)
    order = torch.argsort(group_of_row, stable=True)
    sorted_groups = group_of_row[order]
    is_first = torch.ones_like(sorted_groups, dtype=torch.bool)
    is_first[1:] = sorted_groups[1:] != sorted_groups[:-1]
    sizes = torch.bincount(torch.cumsum(is_first.long(), 0) - 1).tolist()
    return order, order[is_first], sizes


def _position_ids(prefix_grouper: PrefixGrouper, width: int, device) -> torch.Tensor:
    rows = []
    for info in prefix_grouper.group_info:
        prefix_len = info.prefix_len
        pieces = [torch.arange(prefix_len)]
        pieces += [torch.arange(prefix_len, prefix_len + suffix_len) for suffix_len in info.suffix_lens]
        row = torch.cat(pieces)
        rows.append(torch.cat([row, row.new_zeros(width - row.numel())]))
    return torch.stack(rows).to(device)


def reference_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, temperature: float = 1.0):
    """
    Per-token log-probs and entropies `(B, K)` of a TRL-style micro-batch through the reference implementation.

    Args:
        input_ids, attention_mask (`(B, L)`): `[prompt | completion]`, prompt left-padded, completion right-padded.
        logits_to_keep: K, the completion width.

    Returns:
        `(logps, entropies)`, both `(B, K)` in the original row order, 0 on padded completion positions.
    """
    prompt_width = input_ids.size(1) - logits_to_keep
    prompt_ids, completion_ids = input_ids[:, :prompt_width], input_ids[:, prompt_width:]
    prompt_mask, completion_mask = attention_mask[:, :prompt_width], attention_mask[:, prompt_width:]
    order, first_rows, sizes = _group_rows(prompt_ids, prompt_mask)
    completion_ids, completion_mask = completion_ids[order], completion_mask[order]

    prefix_grouper = PrefixGrouper.from_ungrouped_masks(
        prefix_mask=prompt_mask[first_rows],
        suffix_mask=completion_mask,
        group_sizes=sizes,
        padding_mode="right",
        device=input_ids.device,
    )
    grouped_ids = prefix_grouper.concat_input(
        prompt_ids[first_rows], prompt_mask[first_rows], completion_ids, completion_mask
    )
    padding_mask = prefix_grouper.padding_mask
    outputs = model(
        input_ids=grouped_ids,
        attention_mask=padding_mask,
        position_ids=_position_ids(prefix_grouper, grouped_ids.size(1), input_ids.device),
        prefix_grouper=prefix_grouper,
        prefix_grouper_attn_func=getattr(model, "_prefix_grouper_base_attention", SDPA_ADAPTER),
        use_cache=False,
    )
    logits = outputs.logits / temperature
    _, _, suffix_logits, suffix_mask = prefix_grouper.split_output(logits, include_prefix_last=1)
    targets = prefix_grouper.convert_padding(completion_ids, completion_mask, padding_mode="right")
    suffix_logits, suffix_mask = suffix_logits[:, :-1], suffix_mask[:, 1:]
    log_probs = suffix_logits.float().log_softmax(-1)
    logps = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * suffix_mask
    entropies = -(log_probs.exp() * log_probs).sum(-1) * suffix_mask

    width = logps.size(1)
    out_logps = logps.new_zeros(input_ids.size(0), logits_to_keep)
    out_entropies = entropies.new_zeros(input_ids.size(0), logits_to_keep)
    out_logps = out_logps.index_put((order,), torch.nn.functional.pad(logps, (0, logits_to_keep - width)))
    out_entropies = out_entropies.index_put((order,), torch.nn.functional.pad(entropies, (0, logits_to_keep - width)))
    return out_logps, out_entropies
