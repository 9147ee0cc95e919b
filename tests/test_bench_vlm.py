"""
Smoke test of `benchmarks/bench_vlm.py` at a tiny size: both paths agree, the vision tower sees the image once in the
grouped path and G times in GRPOTrainer's, and the report is written. (The benchmark itself is a script, not a test.)
"""

import pytest

from benchmarks import bench_vlm


@pytest.fixture(scope="module")
def tiny_vlm_shape():
    bench_vlm.VLM_SHAPES["test-tiny-vlm"] = dict(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=2, spatial_merge_size=2, temporal_patch_size=2, window_size=8,
                           fullatt_block_indexes=[1], in_channels=3),
    )
    yield "test-tiny-vlm"
    del bench_vlm.VLM_SHAPES["test-tiny-vlm"]


def test_paths_agree_and_share_the_image(tiny_vlm_shape):
    point = bench_vlm.VlmPoint(image_tokens=9, completion_len=4, group_size=3, text_len=6)
    raw = bench_vlm.run_vlm_point(bench_vlm.VlmCase(point, shape=tiny_vlm_shape, rounds=2))
    trl, grouped = raw["paths"]["trl"], raw["paths"]["grouped"]
    assert grouped["max_abs_logp_diff"] < 1e-5
    assert len(trl["wall_s"]) == len(grouped["wall_s"]) == 2
    patches = point.grid_side**2
    assert (trl["patches"], grouped["patches"]) == (3 * patches, patches)
    alone = bench_vlm.run_vlm_memory(bench_vlm.VlmCase(point, paths=("grouped",), shape=tiny_vlm_shape))
    assert alone["peak_mib"] >= 0 and alone["patches"] == patches


def test_report_is_written(tiny_vlm_shape, tmp_path):
    args = bench_vlm.parse_args(["--shape", tiny_vlm_shape, "--points", "4", "--completion-len", "3",
                                 "--group-size", "2", "--rounds", "1", "--out-dir", str(tmp_path)])

    class InProcess:
        def run(self, function, case):
            return function(case)

    env = bench_vlm.environment()
    rows = bench_vlm.measure([bench_vlm.VlmPoint(4, 3, 2, 6)], args, env, "test", InProcess())
    text = bench_vlm.report(rows, args, env, "test")
    assert "vision-tower patches" in text and (tmp_path / "vlm_latest.md").is_file()
    assert rows[0]["trl_vision_patches"] == 2 * rows[0]["grouped_vision_patches"]
    with pytest.raises(ValueError, match="square number"):
        bench_vlm.VlmPoint(image_tokens=10).grid_side
