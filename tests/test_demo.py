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
    ColourTask,
    KeyLookupTask,
    build_colour_processor,
    build_key_lookup_tokenizer,
    colour_reward,
    key_lookup_reward,
    load_builtin_processing_class,
    make_colour_dataset,
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


@pytest.mark.parametrize("reward, answer, other", [(key_lookup_reward, "v3", "v2"), (colour_reward, "red", "blue")])
def test_reward_partial_credit(reward, answer, other):
    completions = [answer, f"{answer} w1", other, f"w1 {answer}", "", [{"role": "assistant", "content": answer}]]
    assert reward(completions, [answer] * 6) == [1.0, 0.6, 0.2, 0.0, 0.0, 1.0]


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


def test_colour_task_rows():
    from prefix_grouper_trl.demo.colour_task import COLOURS, IMAGE_SIZE, QUESTION as COLOUR_QUESTION

    dataset = make_colour_dataset(ColourTask(num_colours=3, num_train=40, num_test=4, seed=3))
    assert dataset["train"].column_names == ["prompt", "image", "answer"]
    answers = set()
    for row in dataset["train"]:
        assert row["prompt"] == [{"role": "user", "content": COLOUR_QUESTION}]
        assert row["image"].size == (IMAGE_SIZE, IMAGE_SIZE)
        # The shape's colour is in the picture, exactly.
        assert COLOURS[row["answer"]] in {colour for _, colour in row["image"].getcolors(IMAGE_SIZE**2)}
        answers.add(row["answer"])
    assert answers == set(list(COLOURS)[:3])
    assert ColourTask.from_spec("num_colours=2") == ColourTask(num_colours=2)
    with pytest.raises(ValueError, match="num_shapes"):
        ColourTask.from_spec("num_shapes=2")


def test_offline_processor_expands_the_image_like_qwen():
    from PIL import Image

    processor = build_colour_processor()
    picture = Image.new("RGB", (48, 48), (9, 9, 9))
    content = [{"type": "image", "image": picture}, {"type": "text", "text": "what colour is the shape ?"}]
    messages = [[{"role": "user", "content": content}]]
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    image_token_id = processor.image_token_id
    assert int((batch["input_ids"] == image_token_id).sum()) == 36  # 12 x 12 patches, 2 x 2 merged
    assert batch["image_grid_thw"].tolist() == [[1, 12, 12]] and batch["pixel_values"].shape[0] == 144
    assert torch.equal(batch["mm_token_type_ids"][0].bool(), batch["input_ids"][0] == image_token_id)
    text = processor.decode(batch["input_ids"][0])
    assert text.startswith("<|im_start|> user <|vision_start|>") and text.endswith("<|im_start|> assistant")
    assert processor.decode([processor.tokenizer.convert_tokens_to_ids("red")]) == "red"


def test_builtin_vision_language_model_loads_with_its_processor():
    from transformers import AutoModelForImageTextToText

    folder = materialize_builtin_model("builtin:tiny-qwen2.5-vl")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    processor = load_builtin_processing_class("builtin:tiny-qwen2.5-vl", folder)
    assert model.config.image_token_id == processor.image_token_id
    assert model.config.get_text_config().vocab_size == len(processor.tokenizer)


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


def assert_demo_learned(result, output_dir, steps, margin):
    """The run succeeded, logged one reward per step, and its last 20% of steps beat its first 20% by `margin`."""
    assert result.returncode == 0, result.stderr[-4000:]
    history = json.loads((output_dir / "log_history.json").read_text())
    rewards = [entry["reward"] for entry in history if "reward" in entry]
    assert len(rewards) == steps
    window = steps // 5
    first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    assert last > first + margin, f"the demo did not learn: mean reward {first:.3f} (first 20%) -> {last:.3f} (last)"
    return history


@pytest.mark.slow
def test_demo_command_learns_and_reports(tmp_path):
    output_dir = tmp_path / "run"
    result = run_cli(
        ["--config", "recipes/tiny-cpu.yaml", "--max_steps", str(SHORT_STEPS), "--output_dir", str(output_dir)],
        {"PREFIX_GROUPER_TRL_HOME": str(tmp_path / "home"), "WANDB_MODE": "offline"},
    )
    history = assert_demo_learned(result, output_dir, SHORT_STEPS, margin=0.08)
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
    # Progress is one bar with the reward and step time, not a printed dict per step.
    assert "reward=" in result.stderr and "step=" in result.stderr
    assert "{'loss'" not in result.stdout + result.stderr


# Steps of the shortened vision demo (the recipe runs 300).
SHORT_VLM_STEPS = 40


@pytest.mark.slow
def test_vision_demo_command_learns_and_reports(tmp_path):
    output_dir = tmp_path / "run"
    result = run_cli(
        ["--config", "recipes/tiny-vlm-cpu.yaml", "--max_steps", str(SHORT_VLM_STEPS),
         "--output_dir", str(output_dir)],
        {"PREFIX_GROUPER_TRL_HOME": str(tmp_path / "home"), "WANDB_MODE": "offline"},
    )
    history = assert_demo_learned(result, output_dir, SHORT_VLM_STEPS, margin=0.1)
    saved = [
        entry["prefix_grouper/tokens_saved_frac"] for entry in history if "prefix_grouper/tokens_saved_frac" in entry
    ]
    assert saved and min(saved) > 0.8
    assert (output_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wandb (offline) : " in result.stdout and "mean reward   : " in result.stdout
    # Progress is one bar with the reward, not a printed dict per step.
    assert "reward=" in result.stderr and "{'loss'" not in result.stdout + result.stderr
