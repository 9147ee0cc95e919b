"""
Every recipe opens with the command that runs it, and that command parses with the CLI's parser into TRL's
dataclasses and ours, without downloading anything. An unknown key fails.
"""

import shlex
from pathlib import Path

import pytest
import yaml

from prefix_grouper_trl.cli import RecipeError, parse_grpo_args, resolve_reward_funcs

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = {"zero2": 2, "zero3": 3}


def recipe_command(recipe: Path) -> list[str]:
    """Line 1 of the recipe, `# prefix-grouper-trl grpo ...`, as argv after `grpo`."""
    first_line = recipe.read_text().splitlines()[0]
    assert first_line.startswith("# prefix-grouper-trl grpo "), f"{recipe.name}: line 1 must be the launch command"
    argv = shlex.split(first_line[1:])
    assert argv[:2] == ["prefix-grouper-trl", "grpo"]
    return argv[2:]


def test_the_recipes_are_there():
    names = {recipe.stem for recipe in RECIPES}
    assert {"tiny-cpu", "tiny-vlm-cpu"} <= names
    assert any("-vl-" in name for name in names), "a GPU recipe for a vision-language model"
    assert any("zero2" in name for name in names) and any("zero3" in name for name in names)
    assert any("lora" in name for name in names)
    assert any(name.startswith("qwen2.5-1.5b-instruct") for name in names)
    assert any(name.startswith("qwen3") for name in names)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_command_parses(recipe, monkeypatch):
    monkeypatch.chdir(REPO)  # the commands use paths relative to the repository root
    argv = recipe_command(recipe)
    assert argv[argv.index("--config") + 1] == f"recipes/{recipe.name}"
    # GPU recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU unless told it is a CPU.
    script_args, training_args, model_args, dataset_args, launch_args, _ = parse_grpo_args(
        argv + ["--use_cpu", "true"]
    )
    assert training_args.prefix_grouping
    assert training_args.num_generations >= 2
    assert training_args.per_device_train_batch_size % training_args.num_generations == 0, "groups split across steps"
    assert training_args.output_dir.startswith("outputs/")
    assert "wandb" in training_args.report_to
    assert resolve_reward_funcs(script_args)
    if not recipe.stem.startswith("tiny-"):
        assert model_args.attn_implementation == "flash_attention_2" and model_args.dtype == "bfloat16"
        assert training_args.bf16
    if "lora" in recipe.stem:
        assert model_args.use_peft and model_args.lora_r > 0
    for stage_name, stage in ACCELERATE_CONFIGS.items():
        if stage_name in recipe.stem:
            config = launch_args[launch_args.index("--accelerate_config") + 1]
            assert config == f"recipes/accelerate/{stage_name}.yaml" and (REPO / config).is_file()


@pytest.mark.parametrize("stage_name, stage", ACCELERATE_CONFIGS.items())
def test_accelerate_configs(stage_name, stage):
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "recipes" / "accelerate" / f"{stage_name}.yaml"
    config = load_config_from_file(str(path))
    assert str(config.distributed_type) in ("DEEPSPEED", "DistributedType.DEEPSPEED")
    assert config.deepspeed_config["zero_stage"] == stage
    assert yaml.safe_load(path.read_text())["mixed_precision"] == "bf16"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_unknown_key_fails_the_recipe(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    broken = tmp_path / recipe.name
    broken.write_text(recipe.read_text() + "\nper_device_train_bach_size: 8\n")
    with pytest.raises(RecipeError, match=r"Unknown key in recipe .*: 'per_device_train_bach_size'"):
        parse_grpo_args(["--config", str(broken), "--use_cpu", "true"])


def test_multimodal_open_r1_rows_are_mapped_for_trl():
    """The GPU VLM recipe's dataset adapter, on a row shaped like the hub dataset's (nothing downloaded)."""
    from datasets import Dataset, DatasetDict

    from prefix_grouper_trl.demo.builtin import multimodal_open_r1_dropped, multimodal_open_r1_row

    hub_like = DatasetDict({"train": Dataset.from_dict(
        {"image": [None], "problem": ["Find x. "], "solution": ["<answer>3</answer>"], "original_question": ["q"],
         "original_answer": ["a"]}
    )})
    mapped = hub_like.map(multimodal_open_r1_row, remove_columns=multimodal_open_r1_dropped(hub_like))["train"]
    assert sorted(mapped.column_names) == ["image", "prompt", "solution"]
    prompt = mapped[0]["prompt"]
    assert prompt[0]["role"] == "user" and prompt[0]["content"].startswith("Find x. Think step by step")
    assert "\\boxed{}" in prompt[0]["content"]
