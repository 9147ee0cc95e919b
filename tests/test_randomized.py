"""
Randomized equivalence: micro-batches drawn by hypothesis give the same per-token log-probs, entropies and parameter
gradients through the shared-prefix forward as through GRPOTrainer's repeated forward, on one trainer.

Each drawn micro-batch has 1-4 prompt groups of 1-16 rows (at most `MAX_ROWS` rows in all), prompts of 1-300 tokens
left-padded, completions of 0-100 tokens right-padded, extra all-padding columns on either side, rows shuffled, and
prompts related to an earlier group's prompt: identical (the two groups are one prompt and must merge), a strict
prefix or an extension of it, or a suffix of it (same right-aligned columns, shorter); these must NOT merge. Masked
positions hold either the pad id or random ids, so prompts equal up to their padding must merge. Real tokens may use
the pad id. Old/reference log-probs are chunked by TRL's `batch_size`, which is drawn too.

Profiles (`HYPOTHESIS_PROFILE`):
- `ci` (default): `CI_EXAMPLES` derandomized examples (and `CI_LOW_PRECISION_EXAMPLES` fp64/bf16 ones), the same on
  every run;
- `long`: `HYPOTHESIS_MAX_EXAMPLES` (default 3000) fresh random examples, a tenth as many for fp64/bf16, e.g.
  `HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_randomized.py --hypothesis-show-statistics`.

Low precision, on fewer batches: fp64 matches to 1e-12; bf16 log-probs and entropies are bounded by the repeated bf16
forward's own error against fp64 (STYLE habit 7). Counts and coverage of the recorded runs: docs/RELIABILITY.md.
"""

import os
from dataclasses import dataclass

import pytest
import torch
from helpers import (
    CONFIGS,
    VOCAB_SIZE,
    assert_close_verbose,
    grpo_args,
    prompt_dataset,
    tiny_tokenizer,
    token_count_reward,
)
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from test_equivalence import logps_and_grads
from transformers import AutoModelForCausalLM
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from prefix_grouper_trl import PrefixGroupedGRPOTrainer
from prefix_grouper_trl.integration import enable_prefix_grouping
from prefix_grouper_trl.layout import build_group_layout, find_prompt_groups

CI_EXAMPLES = 100
CI_LOW_PRECISION_EXAMPLES = 20
MAX_ROWS = 24
MAX_PROMPT_LEN = 300
MAX_COMPLETION_LEN = 100
MAX_GROUP_SIZE = 16

_common = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True
)
settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, database=None, **_common)
settings.register_profile("long", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", 3000)), **_common)
PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(PROFILE_NAME)
# fp64/bf16 cases run three forwards on extra model copies: fewer of them (a tenth in the long profile).
LOW_PRECISION = settings(
    PROFILE,
    max_examples=CI_LOW_PRECISION_EXAMPLES if PROFILE_NAME == "ci" else max(PROFILE.max_examples // 10, 1),
)

RELATIONS = ("fresh", "same", "prefix_of", "extends", "suffix_of")


def _lengths(low: int, high: int, short: int):
    # Half the draws short, so that a CI run of a few dozen cases covers many shapes; the full range stays reachable.
    return st.one_of(st.integers(low, short), st.integers(low, high))


@dataclass
class GroupSpec:
    relation: str  # to the prompt of group `base` (see RELATIONS)
    base: int
    prompt_len: int
    completion_lens: list[int]


@dataclass
class BatchSpec:
    seed: int
    groups: list[GroupSpec]
    extra_prompt_columns: int
    extra_completion_columns: int
    random_pad_ids: bool
    row_order: list[int]
    batch_size: int | None  # TRL's chunking of old/reference log-probs; None for the policy forward

    @property
    def num_rows(self) -> int:
        return sum(len(group.completion_lens) for group in self.groups)


@st.composite
def batch_specs(draw) -> BatchSpec:
    num_groups = draw(st.integers(1, 4))
    rows_left = MAX_ROWS
    groups: list[GroupSpec] = []
    for index in range(num_groups):
        largest = min(MAX_GROUP_SIZE, rows_left - (num_groups - index - 1))
        size = draw(st.one_of(st.integers(1, largest), st.just(largest)))  # the largest group often, 16 included
        rows_left -= size
        relation = draw(st.sampled_from(RELATIONS)) if index else "fresh"
        base = draw(st.integers(0, index - 1)) if index else 0
        base_len = groups[base].prompt_len if index else 0
        if relation == "same":
            prompt_len = base_len
        elif relation in ("prefix_of", "suffix_of") and base_len > 1:
            prompt_len = draw(_lengths(1, base_len - 1, min(16, base_len - 1)))
        elif relation == "extends" and base_len < MAX_PROMPT_LEN:
            prompt_len = draw(_lengths(base_len + 1, MAX_PROMPT_LEN, min(base_len + 16, MAX_PROMPT_LEN)))
        else:
            relation, prompt_len = "fresh", draw(_lengths(1, MAX_PROMPT_LEN, 16))
        longest_completion = draw(_lengths(0, MAX_COMPLETION_LEN, 8))
        completion_lens = draw(st.lists(st.integers(0, longest_completion), min_size=size, max_size=size))
        groups.append(GroupSpec(relation, base, prompt_len, completion_lens))
    num_rows = MAX_ROWS - rows_left
    return BatchSpec(
        seed=draw(st.integers(0, 2**31 - 1)),
        groups=groups,
        extra_prompt_columns=draw(st.integers(0, 3)),
        extra_completion_columns=draw(st.integers(0, 3)),
        random_pad_ids=draw(st.booleans()),
        row_order=draw(st.permutations(range(num_rows))),
        batch_size=draw(st.one_of(st.none(), st.integers(1, num_rows))),
    )


def build_batch(spec: BatchSpec):
    """`input_ids (B, L)`, `attention_mask (B, L)`, `logits_to_keep` of a spec, in TRL's padding layout."""
    return build_batch_and_prompts(spec)[0]


def build_batch_and_prompts(spec: BatchSpec):
    """`build_batch`'s batch and the real prompt tokens of each of its rows (as tuples)."""
    generator = torch.Generator().manual_seed(spec.seed)

    def tokens(n):  # real tokens may be any id, the pad id included
        return torch.randint(0, VOCAB_SIZE, (n,), generator=generator)

    prompts: list[torch.Tensor] = []
    for group in spec.groups:
        base = prompts[group.base] if prompts else None
        if group.relation == "same":
            prompt = base.clone()
        elif group.relation == "prefix_of":
            prompt = base[: group.prompt_len].clone()
        elif group.relation == "suffix_of":
            prompt = base[-group.prompt_len :].clone()
        elif group.relation == "extends":
            prompt = torch.cat([base, tokens(group.prompt_len - base.numel())])
        else:
            prompt = tokens(group.prompt_len)
        prompts.append(prompt)

    rows = [(prompt, length) for prompt, group in zip(prompts, spec.groups) for length in group.completion_lens]
    prompt_width = max(prompt.numel() for prompt, _ in rows) + spec.extra_prompt_columns
    completion_width = max(length for _, length in rows) + spec.extra_completion_columns
    if completion_width == 0:
        completion_width = 1  # TRL's completion tensor always has a column
    input_ids, attention_mask, row_prompts = [], [], []
    for row in spec.row_order:
        prompt, completion_len = rows[row]
        row_prompts.append(tuple(prompt.tolist()))
        pad_left, pad_right = prompt_width - prompt.numel(), completion_width - completion_len
        if spec.random_pad_ids:
            left, right = tokens(pad_left), tokens(pad_right)
        else:
            left, right = torch.zeros(pad_left, dtype=torch.long), torch.zeros(pad_right, dtype=torch.long)
        input_ids.append(torch.cat([left, prompt, tokens(completion_len), right]))
        attention_mask.append(
            torch.cat([torch.zeros(pad_left), torch.ones(prompt.numel() + completion_len), torch.zeros(pad_right)])
        )
    batch = torch.stack(input_ids), torch.stack(attention_mask).long(), completion_width
    return batch, row_prompts


def assert_gradients_close(grads: dict, ref_grads: dict, rtol: float = 1e-4, floor: float = 1e-2) -> None:
    """
    Per parameter tensor, max |grad - ref| <= rtol * max |ref| (the `max_relative_diff` criterion of
    test_equivalence.py), where a tensor whose reference gradient is below `floor` x the largest gradient of the model
    is measured against that floor, i.e. an absolute 1e-6 of the largest gradient (about 8 fp32 rounding steps).
    Such tensors occur when every scored row is one token long: one key, so the attention's q/k gradients are zero
    mathematically; the repeated forward gets exactly 0, the split attention up to ~1.2e-7 of the largest gradient.
    """
    assert grads.keys() == ref_grads.keys() and grads
    model_scale = max(ref.abs().max().item() for ref in ref_grads.values())
    for name, ref in ref_grads.items():
        scale = ref.abs().max().item()
        if scale < floor * model_scale:
            event(f"floor used: {name}")
        error = (grads[name] - ref).abs().max().item()
        assert error <= rtol * max(
            scale, floor * model_scale
        ), f"gradient of {name}: max |diff| {error:.3g}, max |ref| {scale:.3g}, largest gradient {model_scale:.3g}"


def _record_coverage(spec: BatchSpec, row_prompts, batch) -> None:
    """What the drawn cases covered, shown by `--hypothesis-show-statistics`."""
    from prefix_grouper_trl.attention import _batching_pays, plan_buckets

    layout = build_group_layout(*batch)
    if layout is not None:
        # The trainer's tiny Qwen2: 4 heads of 8.
        buckets = plan_buckets(layout.prefix_lens, layout.suffix_lens, width=32)
        if buckets is None:
            event("per-group loop")
            for _, prefix_len, suffix_lens in layout.group_segments():
                event("suffixes batched" if _batching_pays(prefix_len, suffix_lens) else "suffixes as one rectangle")
        else:
            prefix_buckets, suffix_buckets = buckets
            event(f"buckets: {len(prefix_buckets)} prefix call(s) for {sum(map(len, prefix_buckets))} prefixes")
            event(f"buckets: {len(suffix_buckets)} suffix call(s) for {layout.num_groups} groups")
    for group in spec.groups[1:]:
        event(f"relation {group.relation}")
    event(f"rows {(spec.num_rows - 1) // 8 * 8 + 1}-{(spec.num_rows - 1) // 8 * 8 + 8}")
    longest_prompt = max(group.prompt_len for group in spec.groups)
    event("longest prompt >= 200" if longest_prompt >= 200 else "longest prompt < 200")
    completion_lens = [length for group in spec.groups for length in group.completion_lens]
    event("some completion >= 50" if max(completion_lens) >= 50 else "all completions < 50")
    if 0 in completion_lens:
        event("empty completion in batch")
    if max(len(group.completion_lens) for group in spec.groups) == MAX_GROUP_SIZE:
        event(f"a group of {MAX_GROUP_SIZE} rows")
    if spec.batch_size is not None and spec.batch_size < spec.num_rows:
        event("chunked (batch_size < rows)")
    event(f"distinct prompts {len(set(row_prompts))}")
    if spec.random_pad_ids:
        event("random ids in masked positions")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """
    A tiny Qwen2 initialised 10x wider than helpers' default (std 0.2): its attention is peaked instead of nearly
    uniform, so q/k gradients are within ~3x of the largest gradient and a wrong mask shows in them.
    """
    torch.manual_seed(0)
    config = CONFIGS["qwen2"]()
    config.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return PrefixGroupedGRPOTrainer(
        model=model,
        reward_funcs=token_count_reward,
        args=grpo_args(tmp_path_factory.mktemp("randomized")),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
    )


# Found by the long profile: every scored row is one token long, so q/k gradients are zero mathematically.
ONE_TOKEN_ROWS_ONLY = BatchSpec(
    seed=1,
    groups=[GroupSpec("fresh", 0, 4, [0]), GroupSpec("fresh", 0, 1, [1])],
    extra_prompt_columns=0,
    extra_completion_columns=0,
    random_pad_ids=False,
    row_order=[0, 1],
    batch_size=None,
)
# Found by the long profile: bf16 outputs a rounding step apart (see the bf16 test).
ONE_TOKEN_PROMPTS_BF16_STEP = BatchSpec(
    seed=1,
    groups=[
        GroupSpec("fresh", 0, 1, [0, 0, 0, 0, 0, 0, 0, 0, 4, 5, 5, 2]),
        GroupSpec("same", 0, 1, [0]),
        GroupSpec("fresh", 0, 1, [1]),
    ],
    extra_prompt_columns=0,
    extra_completion_columns=0,
    random_pad_ids=False,
    row_order=[0, 1, 13, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 2],
    batch_size=None,
)


@PROFILE
@given(spec=batch_specs())
@example(spec=ONE_TOKEN_ROWS_ONLY)
@example(spec=ONE_TOKEN_PROMPTS_BF16_STEP)
def test_random_micro_batches_match_repeated_forward(trainer, spec):
    (input_ids, attention_mask, logits_to_keep), row_prompts = build_batch_and_prompts(spec)
    _record_coverage(spec, row_prompts, (input_ids, attention_mask, logits_to_keep))

    # Rows share a group exactly when their real prompt tokens are equal: pad ids never matter, prefixes never merge.
    prompt_width = input_ids.size(1) - logits_to_keep
    group_ids = find_prompt_groups(input_ids[:, :prompt_width], attention_mask[:, :prompt_width]).tolist()
    first_row_of_prompt = {}
    expected = [first_row_of_prompt.setdefault(prompt, row) for row, prompt in enumerate(row_prompts)]
    assert [group_ids[row] for row in expected] == group_ids, "rows grouped differently from their prompt tokens"
    assert len(set(group_ids)) == len(first_row_of_prompt)

    parent = lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(trainer, *a, **k)  # noqa: E731
    kwargs = dict(batch_size=spec.batch_size)
    ref_logps, ref_entropies, ref_grads = logps_and_grads(
        trainer, parent, input_ids, attention_mask, logits_to_keep, **kwargs
    )
    logps, entropies, grads = logps_and_grads(
        trainer, trainer._get_per_token_logps_and_entropies, input_ids, attention_mask, logits_to_keep, **kwargs
    )
    assert_close_verbose("log-probs", logps, ref_logps, atol=1e-5)
    assert_close_verbose("entropies", entropies, ref_entropies, atol=1e-5)
    assert_gradients_close(grads, ref_grads)
    completion_mask = attention_mask[:, -logits_to_keep:].bool()
    assert (logps[~completion_mask] == 0).all() and (entropies[~completion_mask] == 0).all()


# --- Low precision -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_by_dtype(trainer):
    """
    The trainer's fp32 policy as new fp64 and bf16 models, with TRL's fused LM head and the prefix-grouped dispatcher.

    Not `copy.deepcopy(trainer.model)`: TRL's fused-head forward closes over the original model's bound forward, so a
    deep copy would still run the fp32 original.
    """
    models = {}
    for dtype in (torch.float64, torch.bfloat16):
        model = AutoModelForCausalLM.from_config(trainer.model.config, attn_implementation="sdpa", dtype=dtype)
        model.load_state_dict(trainer.model.state_dict())
        add_fused_lm_head(model, temperature=trainer.temperature, outputs=("log_probs", "entropy"))
        enable_prefix_grouping(model)
        models[dtype] = model
    return models


def _logps(trainer, model, batch, grouped: bool):
    method = (
        trainer._get_per_token_logps_and_entropies
        if grouped
        else (lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(trainer, *a, **k))
    )
    with torch.no_grad():
        logps, entropies, _ = method(model, *batch, compute_entropy=True)
    return logps.double(), entropies.double()


@LOW_PRECISION
@given(spec=batch_specs())
def test_fp64_is_exact_to_1e_12(trainer, models_by_dtype, spec):
    model = models_by_dtype[torch.float64]
    batch = build_batch(spec)
    ref_logps, ref_entropies = _logps(trainer, model, batch, grouped=False)
    logps, entropies = _logps(trainer, model, batch, grouped=True)
    assert_close_verbose("fp64 log-probs", logps, ref_logps, atol=1e-12)
    assert_close_verbose("fp64 entropies", entropies, ref_entropies, atol=1e-12)


def _ratio_bucket(grouped_error: torch.Tensor, repeated_error: torch.Tensor) -> str:
    ratio = grouped_error.max().item() / max(repeated_error.max().item(), 1e-30)
    return next(str(bound) for bound in (1.0, 1.1, 1.5, 2.0, 4.0, float("inf")) if ratio <= bound)


@LOW_PRECISION
@given(spec=batch_specs())
@example(spec=ONE_TOKEN_PROMPTS_BF16_STEP)
def test_bf16_error_is_bounded_by_the_repeated_forwards_own_error(trainer, models_by_dtype, spec):
    """
    |grouped_bf16 - ref_fp64| <= 2 |repeated_bf16 - ref_fp64| + eps, in max and in mean over scored tokens, where eps
    is one bf16 rounding step at the outputs' magnitude (`finfo(bf16).eps * max |ref|`): both forwards return bf16
    values, and where the repeated one happens to land on the bf16 value nearest the fp64 reference, the grouped one
    can land a step away (seen in the long profile: 0.019 vs 0.0013 on an entropy of ~3.5, whose step is 0.016).
    """
    batch = build_batch(spec)
    scored = batch[1][:, -batch[2] :].bool()
    if not scored.any():
        return
    ref_logps, ref_entropies = _logps(trainer, models_by_dtype[torch.float64], batch, grouped=False)
    repeated_logps, repeated_entropies = _logps(trainer, models_by_dtype[torch.bfloat16], batch, grouped=False)
    grouped_logps, grouped_entropies = _logps(trainer, models_by_dtype[torch.bfloat16], batch, grouped=True)
    for name, grouped, repeated, ref in (
        ("log-probs", grouped_logps, repeated_logps, ref_logps),
        ("entropies", grouped_entropies, repeated_entropies, ref_entropies),
    ):
        grouped_error, repeated_error = (grouped - ref).abs()[scored], (repeated - ref).abs()[scored]
        eps = torch.finfo(torch.bfloat16).eps * ref[scored].abs().max().item()
        event(f"bf16 {name}: max error ratio grouped/repeated <= {_ratio_bucket(grouped_error, repeated_error)}")
        assert (
            grouped_error.max() <= 2 * repeated_error.max() + eps
        ), f"bf16 {name}: max error {grouped_error.max():.3g} vs repeated {repeated_error.max():.3g}"
        assert (
            grouped_error.mean() <= 2 * repeated_error.mean() + eps
        ), f"bf16 {name}: mean error {grouped_error.mean():.3g} vs repeated {repeated_error.mean():.3g}"
