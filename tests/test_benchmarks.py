"""
Smoke test of the benchmark scripts' pieces at a tiny size (the benchmarks themselves are scripts, not timed tests):
the three log-prob paths agree, the reference adapter masks ragged batches right, the FLOP model counts what the
README says, the dense-mask check and the report writers run.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_hybrid, bench_logprob, common, reference_adapter  # noqa: E402


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_shape():
    common.MODEL_SHAPES["test-tiny"] = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    yield "test-tiny"
    del common.MODEL_SHAPES["test-tiny"]


def test_three_paths_agree_and_are_timed(tiny_shape):
    point = common.Point(prompt_len=12, completion_len=5, group_size=3, num_groups=2)
    raw = common.run_point_case(common.PointCase(point, shape=tiny_shape, rounds=2))
    assert set(raw["paths"]) == set(common.PATHS)
    for path, measured in raw["paths"].items():
        assert measured["max_abs_logp_diff"] < 1e-5, path
        assert len(measured["wall_s"]) == 2 and min(measured["cpu_s"]) > 0
    assert raw["paths"]["trl"]["peak_mib"] >= 0
    alone = common.run_memory_case(common.PointCase(point, paths=("grouped",), shape=tiny_shape))
    assert alone["peak_mib"] >= 0 and len(alone["logps"]) == point.rows


def test_reference_adapter_on_ragged_batch(tiny_shape, tmp_path):
    """Uneven prompts (left padding), uneven completions (right padding), shuffled groups: equal to GRPOTrainer."""
    from trl import GRPOTrainer

    model = common.build_model(tiny_shape)
    trainer = common.make_trainer("trl", model, "cpu", str(tmp_path))
    generator = torch.Generator().manual_seed(0)
    prompt_lens, completion_lens, groups = [7, 4, 7, 9, 4], [3, 5, 1, 4, 2], [0, 1, 0, 2, 1]
    prompts = {g: torch.randint(4, 128, (n,), generator=generator) for g, n in zip(groups, prompt_lens)}
    rows, masks = [], []
    for prompt_len, completion_len, group in zip(prompt_lens, completion_lens, groups):
        completion = torch.randint(4, 128, (completion_len,), generator=generator)
        left, right = 9 - prompt_len, 5 - completion_len
        rows.append(torch.cat([torch.zeros(left, dtype=torch.long), prompts[group], completion,
                               torch.zeros(right, dtype=torch.long)]))
        masks.append(torch.cat([torch.zeros(left), torch.ones(prompt_len + completion_len), torch.zeros(right)]))
    input_ids, attention_mask = torch.stack(rows), torch.stack(masks).long()
    expected, expected_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(
        trainer, trainer.model, input_ids, attention_mask, 5, compute_entropy=True
    )
    reference_model = common.build_model(tiny_shape)
    reference_adapter.enable_reference(reference_model)
    logps, entropies = reference_adapter.reference_logps_and_entropies(reference_model, input_ids, attention_mask, 5)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropies, expected_entropy, atol=1e-5, rtol=0)


def test_flop_counts_by_hand():
    counts = common.flop_counts(common.Point(prompt_len=5, completion_len=3, group_size=2), "cpu-small")
    # TRL: 2 rows of 8 tokens, causal 8*9/2 pairs each, every position but the last scored.
    assert (counts["trl"].linear_tokens, counts["trl"].attention_pairs, counts["trl"].head_positions) == (16, 72, 14)
    # Ours: prefix 4 + suffixes 2*3 = 10 tokens; 4*5/2 prefix pairs + suffix pairs, 6 scored positions.
    # Suffix pairs: one block-mask call, 6 x (4 + 6), or the suffixes batched, 2 x 3 x (4 + 3).
    suffix_pairs = 2 * 3 * (4 + 3) if common.suffixes_batched(4, [3, 3]) else 6 * (4 + 6)
    assert (counts["grouped"].linear_tokens, counts["grouped"].attention_pairs) == (10, 10 + suffix_pairs)
    assert counts["grouped"].head_positions == 6
    # Reference: 5 + 2*3 = 11 tokens; 5*6/2 prefix pairs + 2 x 3 x (5 + 3); logits at all 11 positions.
    assert (counts["reference"].linear_tokens, counts["reference"].attention_pairs) == (11, 15 + 48)
    assert counts["reference"].head_positions == 11
    assert counts["trl"].flops == sum(counts["trl"].parts.values())


def test_mask_check_and_reports(tiny_shape, tmp_path):
    point = common.Point(prompt_len=40, completion_len=4, group_size=2)
    check = bench_logprob.largest_trailing_blocks(point, tiny_shape)
    assert check["packed_tokens"] == 39 + 8 and check["dense"] == []

    def rows(speedup):
        return {
            "trl": {"median_s": 2.0, "peak_mib": 100.0, "attention_pairs": 1, "linear_tokens": 1},
            "grouped": {"median_s": 2.0 / speedup, "peak_mib": 30.0, "speedup_vs_trl": speedup,
                        "cpu_speedup_vs_trl": speedup, "flop_ratio_vs_trl": 4.0, "memory_ratio_vs_trl": 0.3,
                        "attention_pairs": 1, "linear_tokens": 1},
            "reference": {"median_s": 1.0, "peak_mib": 40.0},
        }

    by_point = {bench_logprob.TARGET_POINT: rows(3.8), common.Point(512, 64, 2): rows(1.5)}
    table = bench_logprob.write_table(by_point, str(tmp_path / "t.md"), "header")
    assert table.count("\n| 2048 | 128 | 8 |") == 1
    assert len(bench_logprob.write_plots(by_point, str(tmp_path), "title")) == 3
    head = bench_logprob.head_ablation(point, tiny_shape, rounds=1)
    assert set(head) == {"trl", "grouped_trl_head", "grouped"} and min(head.values()) > 0
    checks = bench_logprob.check_targets(by_point, check, head_check=head)
    verdicts = {name: passed for name, passed, _ in checks}
    assert sorted(verdicts.values(), key=str) == sorted([True, True, True, False, None], key=str)
    assert "sharing alone" in checks[-1][2]
    common.append_csv(str(tmp_path / "r.csv"), [{"a": 1, "b": 2}])
    common.append_csv(str(tmp_path / "r.csv"), [{"a": 3, "b": 4}])
    assert open(tmp_path / "r.csv").read().splitlines() == ["a,b", "1,2", "3,4"]


@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["no_reference", "reference_model"])
def test_e2e_worker(tiny_shape, beta):
    from benchmarks import bench_e2e

    case = bench_e2e.E2ECase("grouped", prompt_len=16, completion_len=4, group_size=2, steps=2, shape=tiny_shape,
                             beta=beta)
    raw = bench_e2e.run_e2e_case(case)
    row = bench_e2e.summarize(case, raw)
    assert len(raw["steps"]) == 2 and row["step_s"] > 0 and 0 < row["logprob_share"] <= 1
    assert row["generate_s"] > 0 and row["backward_s"] > 0


def test_attention_variants_agree(tiny_shape, capsys):
    from benchmarks import bench_attention

    bench_attention.main(["--shape", tiny_shape, "--prompt-len", "12", "--completion-len", "3", "--group-size", "3",
                          "--num-groups", "2", "--reps", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "max |diff| to shipped" in line]
    assert [line.split()[0] for line in lines] == ["shipped", "rectangle", "batched", "lse_merge"]
    assert all(float(line.rsplit(" ", 1)[1]) < 1e-5 for line in lines)


def test_hybrid_benchmark_and_its_flop_model(tmp_path):
    """bench_hybrid on a tiny Qwen3.5 shape: both paths agree, the table and the targets are written."""
    common.MODEL_SHAPES["test-hybrid"] = dict(
        common.MODEL_SHAPES["cpu-hybrid"], hidden_size=32, intermediate_size=64, num_attention_heads=4, head_dim=8,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        vocab_size=128, max_position_embeddings=256,
    )
    try:
        point = common.Point(prompt_len=40, completion_len=6, group_size=3)
        counts = common.flop_counts(point, "test-hybrid")
        # Tokens fed: every row whole vs one prefix (P-1) and G suffixes (C each); the delta rule on whole chunks.
        assert counts["trl"].linear_tokens == 3 * 46 and counts["grouped"].linear_tokens == 39 + 3 * 6
        # The chunked delta rule pads every sequence to whole chunks of 64: 3 x 64 vs 64 (prefix) + 3 x 64 (suffixes).
        assert counts["trl"].parts["deltanet"] > 0 and counts["grouped"].parts["deltanet"] > 0
        assert common.hybrid_flop_counts(common.Point(2048, 128, 8), "test-hybrid")["trl"].parts["deltanet"] > 5 * (
            common.hybrid_flop_counts(common.Point(2048, 128, 8), "test-hybrid")["grouped"].parts["deltanet"]
        )
        # What bench_hybrid's sweep runs in fresh processes, here in this one (the shape exists only in this process).
        args = bench_hybrid.parse_args(["--shape", "test-hybrid", "--out-dir", str(tmp_path), "--rounds", "1"])
        case = common.PointCase(point, tuple(args.paths), args.shape, rounds=1)
        raw = common.run_point_case(case)
        raw["paths"]["grouped"]["peak_mib"] = common.run_memory_case(
            common.PointCase(point, ("grouped",), args.shape)
        )["peak_mib"]
        rows = bench_logprob.summarize(point, raw, args, common.environment(), "test")
        assert {row["path"] for row in rows} == {"trl", "grouped"}
        assert all(float(row["max_abs_logp_diff_vs_trl"]) < 1e-5 for row in rows)
        bench_hybrid.TARGET_POINT, target = point, bench_hybrid.TARGET_POINT
        try:
            lines = bench_hybrid.report({point: {row["path"]: row for row in rows}}, args, common.environment(), "test")
        finally:
            bench_hybrid.TARGET_POINT = target
        written = (tmp_path / "hybrid_latest.md").read_text()
        assert "P=40 C=6 G=3" in written and "peak memory" in written and len(lines) == 2
    finally:
        del common.MODEL_SHAPES["test-hybrid"]
