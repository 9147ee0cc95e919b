"""
The command line's parsing and its refusals: every bad recipe fails before any model is loaded, with a message that
names the key or the file. All in-process and without training (the training runs are in test_demo.py).
"""

import json
from pathlib import Path

import pytest

from prefix_grouper_trl import PrefixGroupedGRPOConfig
from prefix_grouper_trl.cli import RecipeError, load_datasets, main, parse_grpo_args, resolve_reward_funcs
from prefix_grouper_trl.demo.rewards import key_lookup_reward

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "recipes" / "tiny-cpu.yaml")


def write_recipe(tmp_path, text: str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_tiny_recipe_parses_into_trls_dataclasses_and_ours():
    script_args, training_args, model_args, dataset_args, launch_args, _ = parse_grpo_args(["--config", TINY])
    assert type(training_args) is PrefixGroupedGRPOConfig and training_args.prefix_grouping
    assert model_args.model_name_or_path == "builtin:tiny-qwen2"
    assert script_args.dataset_name == "builtin:key-lookup"
    assert script_args.reward_funcs == ["key_lookup_reward"]
    assert dataset_args.datasets == []
    assert launch_args == []


def test_command_line_overrides_the_recipe():
    *_, training_args, model_args, _, _, _ = parse_grpo_args(
        ["--config", TINY, "--learning_rate", "0.123", "--prefix_grouping", "false", "--lora_r", "3"]
    )
    assert training_args.learning_rate == 0.123
    assert training_args.prefix_grouping is False
    assert model_args.lora_r == 3


def test_launcher_keys_are_split_off_for_accelerate(tmp_path):
    recipe = write_recipe(tmp_path, Path(TINY).read_text() + "\nmain_process_port: 29511\n")
    argv = ["--config", recipe, "--accelerate_config", "zero2", "--max_steps", "3", "--num_processes", "2"]
    *_, training_args, _, _, launch_args, training_argv = parse_grpo_args(argv)
    assert training_args.max_steps == 3
    assert launch_args == ["--main_process_port", "29511", "--accelerate_config", "zero2", "--num_processes", "2"]
    # What the relaunched processes get: the same command without the command line's launcher keys.
    assert training_argv == ["--config", recipe, "--max_steps", "3"]


def test_misspelt_key_in_recipe(tmp_path):
    recipe = write_recipe(tmp_path, Path(TINY).read_text() + "\nlearnig_rate: 0.1\n")
    with pytest.raises(
        RecipeError, match=r"Unknown key in recipe .*recipe\.yaml: 'learnig_rate' \(did you mean 'learning_rate'\?\)"
    ):
        parse_grpo_args(["--config", recipe])


def test_misspelt_key_on_command_line():
    with pytest.raises(RecipeError, match=r"Unknown key in the command line: 'num_generation' \(did you mean"):
        parse_grpo_args(["--config", TINY, "--num_generation", "4"])


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match=rf"--config: recipe file not found: {missing}"):
        parse_grpo_args(["--config", str(missing)])


def test_num_generations_below_two_fails_at_parse():
    with pytest.raises(RecipeError, match=r"num_generations=1"):
        parse_grpo_args(["--config", TINY, "--num_generations", "1", "--per_device_train_batch_size", "4"])


def test_reward_functions_by_trl_name_by_our_name_and_by_dotted_path():
    script_args, *_ = parse_grpo_args(
        [
            "--config",
            TINY,
            "--reward_funcs",
            "think_format_reward",
            "key_lookup_reward",
            "prefix_grouper_trl.demo.rewards.tldr_unigram_f1_reward",
        ]
    )
    funcs = resolve_reward_funcs(script_args)
    assert [f.__name__ for f in funcs] == ["think_format_reward", "key_lookup_reward", "tldr_unigram_f1_reward"]
    assert funcs[1] is key_lookup_reward


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "no_such_package.rewards.f",
            r"cannot import module 'no_such_package.rewards' for 'no_such_package.rewards.f'",
        ),
        (
            "prefix_grouper_trl.demo.rewards.missing",
            r"module 'prefix_grouper_trl.demo.rewards' has no attribute 'missing'",
        ),
        ("acuracy_reward", r"unknown reward function 'acuracy_reward'"),
    ],
)
def test_reward_function_that_cannot_be_imported(name, message):
    script_args, *_ = parse_grpo_args(["--config", TINY, "--reward_funcs", name])
    with pytest.raises(RecipeError, match=message):
        resolve_reward_funcs(script_args)


def test_dataset_without_prompt_column(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": "v1"}) for i in range(4)))
    recipe = Path(TINY).read_text().replace("dataset_name: builtin:key-lookup", "")
    recipe += f"\ndatasets:\n  - path: json\n    data_files: {data}\n"
    script_args, training_args, _, dataset_args, *_ = parse_grpo_args(["--config", write_recipe(tmp_path, recipe)])
    with pytest.raises(
        RecipeError, match=r"datasets: json, split 'train': no 'prompt' column \(columns: \['question', 'answer'\]\)"
    ):
        load_datasets(script_args, training_args, dataset_args)


def test_builtin_dataset_options_and_unknown_option():
    script_args, training_args, _, dataset_args, *_ = parse_grpo_args(
        ["--config", TINY, "--dataset_config", "context_words=10,num_train=5,num_test=0"]
    )
    train, _ = load_datasets(script_args, training_args, dataset_args)
    assert len(train) == 5 and len(train[0]["prompt"].split()) == 10 + 4 + 8
    script_args.dataset_config = "context_word=10"
    with pytest.raises(ValueError, match=r"dataset_config: cannot read 'context_word=10'"):
        load_datasets(script_args, training_args, dataset_args)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["grpo", "--config", "does/not/exist.yaml"], "recipe file not found: does/not/exist.yaml"),
        (["grpo", "--config", TINY, "--reward_funcs", "nowhere.reward"], "cannot import module 'nowhere'"),
        (["grpo", "--config", TINY, "--model_name_or_path", "builtin:huge"], "Unknown builtin model 'builtin:huge'"),
        (["train"], "unknown command 'train'"),
    ],
)
def test_main_reports_errors_without_a_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_console_script_and_module_entry_points():
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module_name, _, attribute = scripts["prefix-grouper-trl"].partition(":")
    import importlib

    assert getattr(importlib.import_module(module_name), attribute) is main
    assert "from .cli import main" in (REPO / "prefix_grouper_trl" / "__main__.py").read_text()
