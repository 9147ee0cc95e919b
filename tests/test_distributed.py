"""
Distributed runs on CPU, for real.

- The CLI end to end under `accelerate launch` with real DeepSpeed ZeRO-2 and ZeRO-3 (one process, gloo on CPU),
  using the same accelerate configs as the GPU recipes, overridden for a CPU: ``--mixed_precision no``.
"""

import json

import pytest
from test_demo import run_cli


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_cli_with_deepspeed_zero(stage, tmp_path):
    output_dir = tmp_path / "run"
    result = run_cli(
        [
            "--config",
            "recipes/tiny-cpu.yaml",
            "--accelerate_config",
            f"recipes/accelerate/zero{stage}.yaml",
            "--num_processes",
            "1",
            "--mixed_precision",
            "no",
            "--max_steps",
            "2",
            "--report_to",
            "none",
            "--output_dir",
            str(output_dir),
        ],
        {"PREFIX_GROUPER_TRL_HOME": str(tmp_path / "home"), "DS_ACCELERATOR": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Run finished (1 process, DeepSpeed ZeRO-{stage})." in result.stdout, result.stdout[-2000:]
    history = json.loads((output_dir / "log_history.json").read_text())
    steps = [entry for entry in history if "loss" in entry]
    assert len(steps) == 2 and all(entry["prefix_grouper/mean_group_size"] == 8 for entry in steps)
    assert (output_dir / "model.safetensors").is_file()
