"""
wandb, for real: a CLI run with no API key goes offline by itself, and its run file holds every step's metrics,
the prefix-sharing ones included. The run file (``run-<id>.wandb``) is read here directly: a W&B header, then
LevelDB-log framed protobuf `Record`s (wandb keeps no Python reader of its own any more).
"""

import json
import os
from pathlib import Path

from test_demo import run_cli
from wandb.proto import wandb_internal_pb2

from prefix_grouper_trl.cli import configure_wandb

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    """Every `Record` of an offline ``.wandb`` file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    position, payloads, pending = 7, [], b""
    while position + 7 <= len(data):
        if _BLOCK - position % _BLOCK < 7:  # a block's tail too short for a header is padding
            position += _BLOCK - position % _BLOCK
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == _FULL:
            payloads.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            payloads.append(pending + chunk)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def wandb_history(path: Path) -> list[dict]:
    rows = []
    for record in read_wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def test_offline_run_records_every_metric(tmp_path):
    output_dir = tmp_path / "run"
    steps = 3
    result = run_cli(
        ["--config", "recipes/tiny-cpu.yaml", "--max_steps", str(steps), "--output_dir", str(output_dir)],
        # No WANDB_* at all and a HOME without .netrc: no API key, so the CLI must pick offline mode itself.
        {"PREFIX_GROUPER_TRL_HOME": str(tmp_path / "home"), "HOME": str(tmp_path), "WANDB_API_KEY": ""},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "wandb (offline) : " in result.stdout

    run_files = list((output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, "one offline run under output_dir/wandb"
    records = read_wandb_records(run_files[0])
    kinds = {record.WhichOneof("record_type") for record in records}
    assert {"run", "config", "history", "exit"} <= kinds

    logged = [row for row in wandb_history(run_files[0]) if "train/reward" in row]
    assert [row["train/global_step"] for row in logged] == list(range(1, steps + 1))
    expected = [entry for entry in json.loads((output_dir / "log_history.json").read_text()) if "reward" in entry]
    for row, entry in zip(logged, expected, strict=True):
        for key in ("reward", "loss", "prefix_grouper/tokens_saved_frac", "prefix_grouper/mean_group_size"):
            assert abs(row[f"train/{key}"] - entry[key]) < 1e-6, key
        assert 0.5 < row["train/prefix_grouper/tokens_saved_frac"] < 1
        assert row["train/prefix_grouper/mean_group_size"] == 8

    config = next(record.config for record in records if record.WhichOneof("record_type") == "config")
    config_keys = {item.key for item in config.update}
    assert {"prefix_grouping", "num_generations", "learning_rate"} <= config_keys


def test_mode_follows_the_api_key(tmp_path, monkeypatch):
    class Args:
        report_to = ["wandb"]
        output_dir = str(tmp_path / "out")

    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.setenv(name, "")  # recorded, so the test restores the caller's environment
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))

    assert configure_wandb(Args())
    assert os.environ["WANDB_MODE"] == "offline"
    assert os.environ["WANDB_DIR"] == str(Path(Args.output_dir).resolve())
    assert os.environ["WANDB_PROJECT"] == "prefix-grouper-trl"

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    configure_wandb(Args())
    assert "WANDB_MODE" not in os.environ  # online: wandb's own default

    Args.report_to = ["none"]
    assert not configure_wandb(Args())
