"""Bookkeeping of the packed layout, checked against small hand-written expectations."""

import pytest
import torch

from prefix_grouper_trl.attention import suffix_block_mask
from prefix_grouper_trl.layout import build_group_layout, find_prompt_groups, plan_row_chunks
from prefix_grouper_trl.trainer import shuffle_groups_sequence_dict

# Prompt width 3 (left-padded), completion width 3 (right-padded). Rows 0 and 2 share the prompt [10, 11].
INPUT_IDS = torch.tensor(
    [
        [0, 10, 11, 20, 21, 0],
        [5, 6, 7, 30, 0, 0],
        [0, 10, 11, 40, 41, 42],
    ]
)
ATTENTION_MASK = torch.tensor(
    [
        [0, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 1],
    ]
)


def test_packed_row_positions_labels_and_maps():
    layout = build_group_layout(INPUT_IDS, ATTENTION_MASK, logits_to_keep=3)
    #                group A: prefix | suffix row 0 | suffix row 2    group B: prefix | suffix row 1
    assert layout.input_ids.tolist() == [[10, 11, 20, 11, 40, 41, 5, 6, 7]]
    assert layout.position_ids.tolist() == [[1, 2, 3, 2, 3, 4, 0, 1, 2]]
    assert layout.shift_labels.tolist() == [[-100, 20, 21, 40, 41, 42, -100, -100, 30]]
    assert layout.scored_positions.tolist() == [1, 2, 3, 4, 5, 8]
    assert layout.scored_slots.tolist() == [0, 1, 6, 7, 8, 3]  # row * 3 + completion column
    assert layout.group_starts == [0, 6]
    assert layout.prefix_lens == [1, 2]
    assert layout.suffix_lens == [[2, 3], [1]]
    assert layout.max_span == 4
    assert layout.repeated_tokens == 13 and layout.packed_tokens == 9
    assert layout.tokens_saved_frac == pytest.approx(4 / 13)
    assert layout.mean_group_size == 1.5


def test_scatter_back_to_rows():
    layout = build_group_layout(INPUT_IDS, ATTENTION_MASK, logits_to_keep=3)
    packed = torch.arange(1.0, 10.0).view(1, 9)  # value = packed position + 1
    assert layout.scatter_to_rows(packed).tolist() == [[2, 3, 0], [9, 0, 0], [4, 5, 6]]


def test_empty_completions_and_prompt_of_one_token():
    input_ids = torch.tensor([[0, 9, 20, 21], [0, 9, 0, 0], [8, 9, 0, 0], [0, 7, 30, 0]])
    attention_mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0]])
    layout = build_group_layout(input_ids, attention_mask, logits_to_keep=2)
    # Row 1 (empty completion) shares row 0's prompt but adds nothing; row 2's group has nothing to score.
    assert layout.input_ids.tolist() == [[9, 20, 7]]
    assert layout.position_ids.tolist() == [[1, 2, 1]]
    assert layout.shift_labels.tolist() == [[20, 21, 30]]
    assert layout.prefix_lens == [0, 0] and layout.suffix_lens == [[2], [1]]
    assert layout.num_grouped_rows == 2 and layout.num_rows == 4
    assert build_group_layout(input_ids[1:3], attention_mask[1:3], logits_to_keep=2) is None


def test_groups_ignore_pad_values_and_never_merge_prefixes():
    prompt_ids = torch.tensor([[0, 5, 6], [3, 5, 6], [0, 0, 6], [5, 6, 7], [0, 5, 6]])
    prompt_mask = torch.tensor([[0, 1, 1], [0, 1, 1], [0, 0, 1], [1, 1, 1], [0, 1, 1]])
    # rows 0, 1, 4: [5, 6] (row 1 has another pad id); row 2: [6]; row 3: [5, 6, 7] has [5, 6] as a prefix only.
    assert find_prompt_groups(prompt_ids, prompt_mask).tolist() == [0, 0, 1, 2, 0]


def test_suffix_block_mask():
    mask = suffix_block_mask(prefix_len=2, suffix_lens=[2, 1], device=torch.device("cpu"))
    assert mask.shape == (1, 1, 3, 5)
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]


def test_batched_suffix_plan_and_mask():
    from prefix_grouper_trl.attention import _batched_plan, _batching_pays, batched_suffix_mask

    mask = batched_suffix_mask(prefix_len=1, suffix_lens=[2, 1], device=torch.device("cpu"))
    assert mask.shape == (2, 1, 2, 3)
    assert mask[:, 0].int().tolist() == [[[1, 1, 0], [1, 1, 1]], [[1, 1, 0], [1, 1, 0]]]
    plan = _batched_plan([2, 1, 3], torch.device("cpu"))
    # Suffix tokens 0-1 | 2 | 3-5, padded to 3 slots each; padding repeats the suffix's last token.
    assert plan.gather.tolist() == [0, 1, 1, 2, 2, 2, 3, 4, 5]
    assert plan.valid.tolist() == [0, 1, 3, 6, 7, 8]
    assert _batching_pays(prefix_len=6, suffix_lens=[5, 1, 5, 5, 4])
    assert _batching_pays(prefix_len=0, suffix_lens=[5, 5, 5])
    assert not _batching_pays(prefix_len=6, suffix_lens=[5])  # a single suffix is already its own rectangle


def test_row_chunks_follow_the_token_budget():
    # Costs: group A = prefix 1 + rows 0 (2) and 2 (3); group B = prefix 2 + row 1 (1).
    assert [c.tolist() for c in plan_row_chunks(INPUT_IDS, ATTENTION_MASK, 3, token_budget=100)] == [[0, 2, 1]]
    assert [c.tolist() for c in plan_row_chunks(INPUT_IDS, ATTENTION_MASK, 3, token_budget=6)] == [[0, 2], [1]]
    # A group split over two chunks repeats its prefix in each.
    assert [c.tolist() for c in plan_row_chunks(INPUT_IDS, ATTENTION_MASK, 3, token_budget=5)] == [[0], [2], [1]]


@pytest.mark.parametrize(
    "attention_mask, message",
    [
        (torch.tensor([[1, 1, 0, 1, 1, 0]]), "prompt_mask of row 0 is not left-padded"),
        (torch.tensor([[0, 1, 1, 0, 1, 0]]), "completion_mask of row 0 is not right-padded"),
        (torch.tensor([[0, 0, 0, 1, 1, 0]]), "empty prompt"),
    ],
)
def test_bad_padding_is_rejected(attention_mask, message):
    with pytest.raises(ValueError, match=message):
        build_group_layout(INPUT_IDS[:1], attention_mask, logits_to_keep=3)


def test_empty_batch_is_rejected():
    with pytest.raises(ValueError, match="Empty batch"):
        build_group_layout(INPUT_IDS[:0], ATTENTION_MASK[:0], logits_to_keep=3)


def test_group_shuffle_draws_like_trl_and_keeps_groups_together():
    prompts = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    group_of_row = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])  # interleaved, 4 groups of 3
    batch = {
        "prompt_ids": prompts[group_of_row],
        "prompt_mask": torch.ones(12, 2, dtype=torch.long),
        "row": torch.arange(12),
        "texts": [f"row{i}" for i in range(12)],
        "scalar": torch.tensor(7.0),
        "missing": None,
    }
    torch.manual_seed(123)
    shuffled = shuffle_groups_sequence_dict(batch)
    after_ours = torch.rand(3)
    torch.manual_seed(123)
    trl_permutation = torch.randperm(12)
    after_trl = torch.rand(3)
    assert torch.equal(after_ours, after_trl), "the shuffle must consume the random stream exactly as TRL's"

    rows = shuffled["row"]
    assert sorted(rows.tolist()) == list(range(12))
    assert shuffled["texts"] == [f"row{i}" for i in rows.tolist()]
    assert torch.equal(shuffled["prompt_ids"], batch["prompt_ids"][rows])
    assert shuffled["scalar"] is batch["scalar"] and shuffled["missing"] is None
    groups = group_of_row[rows].tolist()
    assert all(len(set(groups[i : i + 3])) == 1 for i in range(0, 12, 3)), groups
    # Group order = order of first appearance in TRL's permutation.
    first_seen = list(dict.fromkeys(group_of_row[trl_permutation].tolist()))
    assert groups[::3] == first_seen
