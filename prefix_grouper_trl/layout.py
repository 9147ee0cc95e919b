"""
Group layout: which rows of a micro-batch share a prompt, and how they are packed into one padding-free row.

Torch only. The trainer hands us one micro-batch exactly as TRL builds it::

    input_ids      = [prompt_ids | completion_ids]          (B, L), L = P_pad + K
    attention_mask = [prompt_mask | completion_mask]         prompt left-padded, completion right-padded
    logits_to_keep = K                                       (= completion width)

Rows whose real prompt tokens are identical form a group. Each group is packed once as::

      prefix (shared)           suffix of row a            suffix of row b
    [ p0 p1 ... p_{n-2} | p_{n-1} a0 a1 ... a_{m-2} | p_{n-1} b0 b1 ... b_{k-2} ] [ next group ... ]
      labels: -100 ...  |   a0    a1 a2 ... a_{m-1} |   b0    b1 b2 ... b_{k-1} ]

The last prompt token is repeated at the head of every suffix: its hidden state is what predicts the first
completion token, and repeating it gives every packed position exactly one next-token label, so TRL's fused LM
head can score the row with pre-shifted labels. The last completion token is never fed (it has nothing to
predict), only used as a label. A row with an empty completion has no suffix; a group with no suffix is dropped.
(`feed_every_token=True` feeds those too, unscored, for statistics over every token such as an MoE aux loss.)

Attention (see `attention.py`): a prefix token attends causally within its prefix; a suffix token attends to the
whole prefix of its group and causally to its own suffix, never to another suffix::

               keys:  prefix      suffix a    suffix b
    prefix   q     [ causal      .           .        ]
    suffix a q     [ all         causal      .        ]
    suffix b q     [ all         .           causal   ]

Position ids are the column each token has in the repeated `(B, L)` forward. TRL passes no position ids, so the
model numbers columns `0..L-1` whatever the left padding; copying the column keeps every completion continuing
from the end of its prompt exactly as in the repeated forward.
"""

from dataclasses import dataclass, field

import torch

# The keyword argument that carries a [`GroupLayout`] through a model's forward to its attention and mixer layers.
LAYOUT_KWARG = "prefix_group_layout"


@dataclass
class GroupLayout:
    """
    The packed row of one micro-batch and the maps back to the `(B, K)` per-token outputs.

    Tensors (T = packed tokens, N = scored positions):
        input_ids (`(1, T)` long): packed token ids.
        position_ids (`(1, T)` long): the column of each token in the repeated forward.
        shift_labels (`(1, T)` long): the next-token label of each packed position (`-100` on prefix tokens).
        scored_positions (`(N,)` long): packed positions whose label is a completion token.
        scored_slots (`(N,)` long): the flat index `row * K + column` of each scored position in the `(B, K)` output.
        token_rows (`(T,)` long): the row of the micro-batch each packed token comes from (its column is
            `position_ids`).
        token_weights (`(1, T)` float, only with `feed_every_token`): how many rows of the repeated forward each
            packed token stands for (the group's row count on prefix tokens, 1 elsewhere).

    Python bookkeeping for the attention (one entry per group, in packed order):
        group_starts: packed offset of each group's prefix.
        prefix_lens: tokens in each group's prefix (prompt length - 1; may be 0).
        suffix_lens: per group, the length of each of its suffixes (completion lengths, all > 0).

    `prompt_width` is the width of the prompt block of the micro-batch (`L - K`), which the recurrent mixers
    reproduce for each group's prefix (see `segment_batches`).

    Statistics for logging: `num_rows` rows in the micro-batch, `num_grouped_rows` of them with a suffix,
    `num_groups` groups, `repeated_tokens` real tokens the repeated forward would encode, `packed_tokens` = T.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    shift_labels: torch.Tensor
    scored_positions: torch.Tensor
    scored_slots: torch.Tensor
    token_rows: torch.Tensor
    batch_size: int
    logits_to_keep: int
    group_starts: list[int]
    prefix_lens: list[int]
    suffix_lens: list[list[int]]
    max_span: int
    repeated_tokens: int
    num_rows: int
    num_grouped_rows: int
    prompt_width: int = 0
    token_weights: torch.Tensor | None = None
    # Filled by the forward: how many attention layers and other token mixers consumed this layout, and masks and
    # index maps cached per (device, kind).
    attention_calls: int = 0
    mixer_calls: int = 0
    _mask_cache: dict = field(default_factory=dict, repr=False)

    @property
    def packed_tokens(self) -> int:
        return self.input_ids.size(1)

    @property
    def num_groups(self) -> int:
        return len(self.group_starts)

    @property
    def tokens_saved_frac(self) -> float:
        """Fraction of the real prompt+completion tokens of the repeated forward that the packed row does not feed."""
        return 1.0 - self.packed_tokens / max(self.repeated_tokens, 1)

    @property
    def mean_group_size(self) -> float:
        return self.num_grouped_rows / max(self.num_groups, 1)

    def group_segments(self):
        """Yield `(start, prefix_len, suffix_lens)` of each group; its suffixes follow the prefix contiguously."""
        return zip(self.group_starts, self.prefix_lens, self.suffix_lens)

    def scatter_to_rows(self, packed_values: torch.Tensor) -> torch.Tensor:
        """
        Map per-position values of the packed row back to the repeated layout.

        Args:
            packed_values (`(1, T)`): one value per packed position (e.g. log-probs from the fused LM head).

        Returns:
            `(B, K)`: the value of each completion token in the original row order, 0 where the completion mask is 0,
            as TRL's fused head leaves it.
        """
        return self.scatter_scored_to_rows(packed_values[:, self.scored_positions])

    def scatter_scored_to_rows(self, scored_values: torch.Tensor) -> torch.Tensor:
        """
        Like `scatter_to_rows`, for values of the scored positions only.

        Args:
            scored_values (`(1, N)`): one value per entry of `scored_positions`, in that order.

        Returns:
            `(B, K)`, zeros where the completion mask is 0.
        """
        out = scored_values.new_zeros(self.batch_size * self.logits_to_keep)
        out = out.index_put((self.scored_slots,), scored_values[0])
        return out.view(self.batch_size, self.logits_to_keep)


def _check_devices(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.device != attention_mask.device:
        raise ValueError(
            f"input_ids is on {input_ids.device} but attention_mask on {attention_mask.device}; move both to the "
            "model's device."
        )
    if input_ids.device.type == "meta":
        raise ValueError(
            "input_ids and attention_mask are on the meta device (shapes only, no values); prefix grouping reads the "
            "token ids to find shared prompts. Pass real tensors on the model's device."
        )


def _check_padding(mask: torch.Tensor, side: str, name: str) -> None:
    steps = mask[:, 1:].to(torch.int8) - mask[:, :-1].to(torch.int8)
    bad = (steps < 0) if side == "left" else (steps > 0)
    if bad.any():
        row = int(bad.any(dim=1).nonzero()[0])
        expected = "left-padded (0s then 1s)" if side == "left" else "right-padded (1s then 0s)"
        raise ValueError(
            f"{name} of row {row} is not {expected}: {mask[row].tolist()}. Prefix grouping needs TRL's padding "
            f"layout; pad {name} on the {side}, or set prefix_grouping=False."
        )


def find_prompt_groups(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, extra_keys: torch.Tensor | None = None
) -> torch.Tensor:
    """
    Group id of each row, equal for rows whose real prompt tokens are identical.

    Args:
        prompt_ids (`(B, P)` long), prompt_mask (`(B, P)`): left-padded prompts.
        extra_keys (`(B, E)` long, optional): more of the prompt than its tokens, e.g. the ids of the distinct images
            a row's image placeholders stand for (see `multimodal.py`); rows share a group only if these match too.

    Returns:
        `(B,)` long, ids `0..num_groups-1` numbered in order of first appearance. Padding values are ignored, so
        prompts equal up to their pad ids share a group; a prompt that is a strict prefix of another has a different
        length and never does.
    """
    keyed = prompt_ids.masked_fill(prompt_mask == 0, -1)
    if extra_keys is not None:
        keyed = torch.cat([keyed, extra_keys.to(keyed.device, keyed.dtype)], dim=1)
    _, inverse = torch.unique(keyed, dim=0, return_inverse=True)
    # Renumber by first appearance so the packed order follows the batch order.
    batch_size = inverse.numel()
    first_row = torch.full((batch_size,), batch_size, dtype=torch.long, device=inverse.device)
    first_row = first_row.scatter_reduce(0, inverse, torch.arange(batch_size, device=inverse.device), reduce="amin")
    rank = torch.empty_like(first_row)
    order = torch.argsort(first_row)
    rank[order] = torch.arange(batch_size, device=inverse.device)
    return rank[inverse]


def build_group_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    feed_every_token: bool = False,
    group_ids: torch.Tensor | None = None,
) -> GroupLayout | None:
    """
    Build the packed layout of one micro-batch.

    Args:
        input_ids (`(B, L)` long): `[prompt_ids | completion_ids]`.
        attention_mask (`(B, L)`): `[prompt_mask | completion_mask]`, prompt left-padded, completion right-padded.
        logits_to_keep (`int`): K, the completion width; the prompt is `input_ids[:, :L-K]`.
        feed_every_token (`bool`): also feed what the repeated forward feeds but nothing here needs to predict: the
            last token of every completion (unscored), and a one-token suffix (the last prompt token) for every row
            with an empty completion. Every real token of the repeated forward is then fed once, except prefix tokens,
            fed once per group; `token_weights` counts how many rows each packed token stands for. Statistics over
            all tokens (an MoE load-balancing loss) are then exactly the repeated forward's.
        group_ids (`(B,)` long, optional): the group of each row, when more than the prompt tokens decides it (see
            `find_prompt_groups`'s `extra_keys`); rows of one group must have identical prompt tokens.

    Returns:
        The [`GroupLayout`], or `None` when no row has a completion token to score (never with `feed_every_token`).

    Raises:
        ValueError: on an empty batch, a prompt without tokens, or masks not padded the TRL way.
    """
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be (B, L)."
        )
    _check_devices(input_ids, attention_mask)
    batch_size, total_width = input_ids.shape
    if batch_size == 0:
        raise ValueError("Empty batch: prefix grouping needs at least one row.")
    if not 0 < logits_to_keep < total_width:
        raise ValueError(f"logits_to_keep={logits_to_keep} must be in 1..{total_width - 1} (the completion width).")
    prompt_width = total_width - logits_to_keep
    device = input_ids.device

    mask = attention_mask.bool()
    prompt_mask, completion_mask = mask[:, :prompt_width], mask[:, prompt_width:]
    _check_padding(prompt_mask, "left", "prompt_mask")
    _check_padding(completion_mask, "right", "completion_mask")
    prompt_lens = prompt_mask.sum(1)
    completion_lens = completion_mask.sum(1)
    if (prompt_lens == 0).any():
        row = int((prompt_lens == 0).nonzero()[0])
        raise ValueError(f"Row {row} has an empty prompt (prompt_mask all 0); every GRPO prompt needs a token.")

    if group_ids is None:
        group_ids = find_prompt_groups(input_ids[:, :prompt_width], prompt_mask)
    else:
        group_ids = group_ids.to(device)

    # Rows with something to feed, ordered by group then by row.
    kept_rows = (completion_lens > 0 if not feed_every_token else torch.ones_like(completion_lens, dtype=torch.bool))
    kept_rows = kept_rows.nonzero().squeeze(1)
    if kept_rows.numel() == 0:
        return None
    kept_rows = kept_rows[torch.argsort(group_ids[kept_rows], stable=True)]
    kept_groups = group_ids[kept_rows]
    # Representative row and member count of each kept group, in packed order.
    is_first = torch.ones_like(kept_groups, dtype=torch.bool)
    is_first[1:] = kept_groups[1:] != kept_groups[:-1]
    representative_rows = kept_rows[is_first]
    num_groups = representative_rows.numel()
    members_per_group = torch.bincount(torch.cumsum(is_first.long(), 0) - 1, minlength=num_groups)

    # Segments in packed order: per group, its prefix then its suffixes. Each segment is a column range of one row.
    group_prefix_lens = prompt_lens[representative_rows] - 1
    suffix_lens_t = completion_lens[kept_rows] + int(feed_every_token)
    segments_per_group = members_per_group + 1
    num_segments = int(segments_per_group.sum())
    first_segment_of_group = torch.cumsum(segments_per_group, 0) - segments_per_group
    is_prefix_segment = torch.zeros(num_segments, dtype=torch.bool, device=device)
    is_prefix_segment[first_segment_of_group] = True

    segment_rows = torch.empty(num_segments, dtype=torch.long, device=device)
    segment_rows[is_prefix_segment] = representative_rows
    segment_rows[~is_prefix_segment] = kept_rows
    segment_lens = torch.empty(num_segments, dtype=torch.long, device=device)
    segment_lens[is_prefix_segment] = group_prefix_lens
    segment_lens[~is_prefix_segment] = suffix_lens_t
    segment_first_column = torch.empty(num_segments, dtype=torch.long, device=device)
    segment_first_column[is_prefix_segment] = prompt_width - prompt_lens[representative_rows]
    segment_first_column[~is_prefix_segment] = prompt_width - 1  # the repeated last prompt token

    # Expand segments to tokens.
    packed_len = int(segment_lens.sum())
    token_segment = torch.repeat_interleave(torch.arange(num_segments, device=device), segment_lens)
    segment_offsets = torch.cumsum(segment_lens, 0) - segment_lens
    token_offset = torch.arange(packed_len, device=device) - segment_offsets[token_segment]
    token_rows = segment_rows[token_segment]
    token_columns = segment_first_column[token_segment] + token_offset
    # A suffix token at offset o predicts completion token o; with `feed_every_token`, the last one predicts nothing.
    segment_completion_lens = torch.zeros(num_segments, dtype=torch.long, device=device)
    segment_completion_lens[~is_prefix_segment] = completion_lens[kept_rows]
    token_is_scored = ~is_prefix_segment[token_segment] & (token_offset < segment_completion_lens[token_segment])

    packed_ids = input_ids[token_rows, token_columns]
    label_columns = (token_columns + 1).clamp(max=total_width - 1)
    labels = torch.where(token_is_scored, input_ids[token_rows, label_columns], torch.full_like(packed_ids, -100))
    scored_positions = token_is_scored.nonzero().squeeze(1)
    scored_slots = token_rows[scored_positions] * logits_to_keep + (token_columns[scored_positions] + 1 - prompt_width)

    # Python ints for the attention loop (one host sync).
    segment_lens_list = segment_lens.tolist()
    members_list = members_per_group.tolist()
    group_starts, prefix_lens, suffix_lens = [], [], []
    cursor = 0
    segment = 0
    for members in members_list:
        group_starts.append(cursor)
        prefix_len = segment_lens_list[segment]
        suffixes = segment_lens_list[segment + 1 : segment + 1 + members]
        prefix_lens.append(prefix_len)
        suffix_lens.append(suffixes)
        cursor += prefix_len + sum(suffixes)
        segment += 1 + members

    token_weights = None
    if feed_every_token:
        segment_weights = torch.ones(num_segments, dtype=torch.float32, device=device)
        segment_weights[is_prefix_segment] = members_per_group.float()
        token_weights = segment_weights[token_segment].unsqueeze(0)

    # Longest distance between a query and a key of one row, for sliding-window checks.
    max_span = int((prompt_lens + completion_lens).max()) - 1
    return GroupLayout(
        input_ids=packed_ids.unsqueeze(0),
        position_ids=token_columns.unsqueeze(0),
        shift_labels=labels.unsqueeze(0),
        scored_positions=scored_positions,
        scored_slots=scored_slots,
        token_rows=token_rows,
        batch_size=batch_size,
        logits_to_keep=logits_to_keep,
        group_starts=group_starts,
        prefix_lens=prefix_lens,
        suffix_lens=suffix_lens,
        max_span=max_span,
        repeated_tokens=int((prompt_lens + completion_lens).sum()),
        num_rows=batch_size,
        num_grouped_rows=int((completion_lens[kept_rows] > 0).sum()),
        prompt_width=prompt_width,
        token_weights=token_weights,
    )


def plan_row_chunks(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    token_budget: int,
    group_ids: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """
    Split the rows of a batch into chunks whose packed rows hold at most `token_budget` tokens, keeping a group's
    rows together where they fit. TRL chunks `batch_size` rows of `L` tokens each; with `token_budget = batch_size * L`
    no chunk packs more tokens than one of TRL's, so the peak activation memory is not higher. `group_ids` as in
    `build_group_layout`.

    Returns:
        A list of `(n_i,)` long tensors of row indices, groups contiguous, covering every row once.
    """
    _check_devices(input_ids, attention_mask)
    prompt_width = input_ids.size(1) - logits_to_keep
    mask = attention_mask.bool()
    prompt_lens = mask[:, :prompt_width].sum(1).tolist()
    completion_lens = mask[:, prompt_width:].sum(1).tolist()
    if group_ids is None:
        group_ids = find_prompt_groups(input_ids[:, :prompt_width], mask[:, :prompt_width])
    group_ids = group_ids.tolist()
    rows_by_group: dict[int, list[int]] = {}
    for row, group in enumerate(group_ids):
        rows_by_group.setdefault(group, []).append(row)

    chunks, current, used, open_group = [], [], 0, None
    for group in sorted(rows_by_group):
        for row in rows_by_group[group]:
            prefix_cost = prompt_lens[row] - 1 if open_group != group else 0
            cost = prefix_cost + completion_lens[row]
            if current and used + cost > token_budget:
                chunks.append(current)
                current, used = [], 0
                prefix_cost = prompt_lens[row] - 1
                cost = prefix_cost + completion_lens[row]
            current.append(row)
            used += cost
            open_group = group
    if current:
        chunks.append(current)
    return [torch.tensor(chunk, dtype=torch.long, device=input_ids.device) for chunk in chunks]


@dataclass
class SegmentBatches:
    """
    The packed row cut into two padded batches, for token mixers that carry a state along the sequence (a recurrence,
    a causal convolution): they run once over every group's prefix, then over every suffix starting from the final
    state of its group's prefix.

    Prefix batch `(G, W)`, one row per group, `W = prompt_width - 1`: each prefix sits at the columns it has in the
    repeated forward, behind the same left padding, so a mixer sees exactly the inputs it sees there::

        group 0:  [ .  .  p0 p1 p2 ]        prefix_mask [0 0 1 1 1]
        group 1:  [ q0 q1 q2 q3 q4 ]                    [1 1 1 1 1]

    Suffix batch `(n, C)`, one row per suffix (the repeated last prompt token, then the completion), right-padded to
    `C = max(longest suffix, 2)` (never one column: one-token forwards take the mixers' in-place decode path)::

        suffix 0 (group 0):  [ p3 a0 a1 . ]
        suffix 1 (group 0):  [ p3 b0 .  . ]
        suffix 2 (group 1):  [ q5 c0 c1 c2 ]

    Padding slots read index `T` (a zero row appended to the packed row); right padding never reaches a real token of
    a causal mixer, and left padding is masked exactly as in the repeated forward.

    Tensors:
        prefix_gather (`(G * W,)` long), suffix_gather (`(n * C,)` long): packed position feeding each slot.
        prefix_mask (`(G, W)` long, or None when no slot is padding): the repeated forward's prompt mask.
        suffix_group (`(n,)` long): the prefix row each suffix continues from.
        inverse (`(T,)` long): packed position -> row of `cat([prefix_out.flatten(0, 1), suffix_out.flatten(0, 1)])`.
    """

    num_groups: int
    prefix_width: int
    num_suffixes: int
    suffix_width: int
    prefix_gather: torch.Tensor
    prefix_mask: torch.Tensor | None
    suffix_gather: torch.Tensor
    suffix_group: torch.Tensor
    inverse: torch.Tensor


def segment_batches(layout: GroupLayout, device: torch.device) -> SegmentBatches:
    """The [`SegmentBatches`] of a layout, built once per layout and device and shared by every mixer layer."""
    key = ("segments", str(device))
    cached = layout._mask_cache.get(key)
    if cached is not None:
        return cached
    total = layout.packed_tokens
    num_groups = layout.num_groups
    width = max(layout.prompt_width - 1, 0)
    group_starts = torch.tensor(layout.group_starts, dtype=torch.long)
    prefix_lens = torch.tensor(layout.prefix_lens, dtype=torch.long)
    inverse = torch.empty(total, dtype=torch.long)

    column = torch.arange(width)[None, :]
    offset = column - (width - prefix_lens)[:, None]
    prefix_real = offset >= 0
    prefix_gather = torch.where(prefix_real, group_starts[:, None] + offset, torch.full_like(offset, total))
    inverse[prefix_gather[prefix_real]] = torch.arange(num_groups * width).view(num_groups, width)[prefix_real]
    prefix_mask = None if bool(prefix_real.all()) else prefix_real.long()

    suffix_starts, suffix_lens, suffix_group = [], [], []
    for group, (start, prefix_len, lens) in enumerate(layout.group_segments()):
        cursor = start + prefix_len
        for suffix_len in lens:
            suffix_starts.append(cursor)
            suffix_lens.append(suffix_len)
            suffix_group.append(group)
            cursor += suffix_len
    num_suffixes = len(suffix_lens)
    suffix_width = max(max(suffix_lens), 2)
    slot = torch.arange(suffix_width)[None, :]
    suffix_real = slot < torch.tensor(suffix_lens)[:, None]
    suffix_gather = torch.where(suffix_real, torch.tensor(suffix_starts)[:, None] + slot, torch.full_like(slot, total))
    suffix_slots = num_groups * width + torch.arange(num_suffixes * suffix_width).view(num_suffixes, suffix_width)
    inverse[suffix_gather[suffix_real]] = suffix_slots[suffix_real]

    batches = SegmentBatches(
        num_groups=num_groups,
        prefix_width=width,
        num_suffixes=num_suffixes,
        suffix_width=suffix_width,
        prefix_gather=prefix_gather.reshape(-1).to(device),
        prefix_mask=None if prefix_mask is None else prefix_mask.to(device),
        suffix_gather=suffix_gather.reshape(-1).to(device),
        suffix_group=torch.tensor(suffix_group, dtype=torch.long, device=device),
        inverse=inverse.to(device),
    )
    layout._mask_cache[key] = batches
    return batches
