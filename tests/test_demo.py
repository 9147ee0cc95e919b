"""
The embedded demo: task, reward, tokenizer and builtin model on their own, then the demo command itself, shortened,
as a user runs it (a subprocess of `python -m prefix_grouper_trl`), which must learn.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from prefix_grouper_trl.demo import (
    KeyLookupTask,
    build_key_lookup_tokenizer,
    key_lookup_reward,
    make_key_lookup_dataset,
    materialize_builtin_model,
)
from prefix_grouper_trl.demo.builtin import tiny_qwen2_config_dict
from prefix_grouper_trl.demo.rewards import tldr_unigram_f1_reward
from prefix_grouper_trl.demo.task import QUESTION, VALUE_WORDS, VOCABULARY

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PREFIX_GROUPER_TRL_HOME", str(tmp_path_factory.getbasetemp() / "pgt-home"))


def test_task_rows():
    task = KeyLookupTask(context_words=20, num_values=3, num_train=50, num_test=5, seed=7)
    dataset = make_key_lookup_dataset(task)
    assert dataset["train"].column_names == ["prompt", "answer"]
    assert (len(dataset["train"]), len(dataset["test"])) == (50, 5)
    for row in dataset["train"]:
        words = row["prompt"].split()
        assert len(words) == 20 + 4 + 8 and row["prompt"].endswith(QUESTION)
        # exactly one value word in the document, right after "key is"
        values = [word for word in words if word in VALUE_WORDS]
        assert values == [row["answer"]] and row["answer"] in VALUE_WORDS[:3]
        at = words.index(row["answer"])
        assert words[at - 2 : at + 2] == ["key", "is", row["answer"], "."]
    assert make_key_lookup_dataset(task)["train"][:] == dataset["train"][:]  # deterministic in the seed


def test_task_spec_parsing():
    assert KeyLookupTask.from_spec("context_words=5, num_values=2") == KeyLookupTask(context_words=5, num_values=2)
    assert KeyLookupTask.from_spec(None) == KeyLookupTask()
    with pytest.raises(ValueError, match="num_values=99"):
        KeyLookupTask.from_spec("num_values=99")


def test_reward_partial_credit():
    completions = ["v3", "v3 w1", "v2", "w1 v3", "", [{"role": "assistant", "content": "v3"}]]
    assert key_lookup_reward(completions, ["v3"] * 6) == [1.0, 0.6, 0.2, 0.0, 0.0, 1.0]


def test_tldr_reward():
    assert tldr_unigram_f1_reward([" the cat sat", "", "dog"], ["The cat sat.", "x", "a cat"]) == [1.0, 0.0, 0.0]
    assert tldr_unigram_f1_reward(["the cat"], ["the cat sat on it"])[0] == pytest.approx(2 * 1 * 0.4 / 1.4)


def test_tokenizer_is_one_word_one_token():
    tokenizer = build_key_lookup_tokenizer()
    ids = tokenizer(" ".join(VOCABULARY[3:]))["input_ids"]
    assert ids == list(range(3, len(VOCABULARY)))
    assert tokenizer.decode(ids) == " ".join(VOCABULARY[3:])
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert tokenizer.decode([VOCABULARY.index("v5"), tokenizer.eos_token_id], skip_special_tokens=True) == "v5"


def test_builtin_model_folder_is_written_once_and_loads():
    folder = materialize_builtin_model("builtin:tiny-qwen2")
    assert materialize_builtin_model("builtin:tiny-qwen2") == folder
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == len(VOCABULARY) == tiny_qwen2_config_dict()["vocab_size"]
    assert model.config.num_hidden_layers == 2
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    assert tokenizer("key is v5")["input_ids"] == [VOCABULARY.index(w) for w in ("key", "is", "v5")]
    # Fixed weights: the same init whatever the caller's seed.
    reference = next(model.parameters()).detach().clone()
    torch.manual_seed(123)
    assert torch.equal(next(AutoModelForCausalLM.from_pretrained(folder).parameters()), reference)


def run_cli(args, env_overrides, cwd=REPO, timeout=900):
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(env_overrides)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "prefix_grouper_trl", "grpo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Steps of the shortened demo: enough for the reward to clearly rise, see the recipe for the full run.
SHORT_STEPS = 60


@pytest.mark.slow
def test_demo_command_learns_and_reports(tmp_path):
    output_dir = tmp_path / "run"
    result = run_cli(
        ["--config", "recipes/tiny-cpu.yaml", "--max_steps", str(SHORT_STEPS), "--output_dir", str(output_dir)],
        {"PREFIX_GROUPER_TRL_HOME": str(tmp_path / "home"), "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-4000:]

    history = json.loads((output_dir / "log_history.json").read_text())
    rewards = [entry["reward"] for entry in history if "reward" in entry]
    assert len(rewards) == SHORT_STEPS
    window = SHORT_STEPS // 5
    first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    assert last > first + 0.08, f"the demo did not learn: mean reward {first:.3f} (first 20%) -> {last:.3f} (last 20%)"

    saved = [
        entry["prefix_grouper/tokens_saved_frac"] for entry in history if "prefix_grouper/tokens_saved_frac" in entry
    ]
    group_sizes = [
        entry["prefix_grouper/mean_group_size"] for entry in history if "prefix_grouper/mean_group_size" in entry
    ]
    assert saved and min(saved) > 0.5 and set(group_sizes) == {8.0}

    plot = output_dir / "training_curves.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "tokenizer.json").is_file()
    for line in (
        "final model   : " + str(output_dir),
        "metric log    : ",
        "plot          : " + str(plot),
        "wandb (offline) : ",
        "mean reward   : ",
    ):
        assert line in result.stdout, result.stdout[-2000:]
