"""
The ``prefix-grouper-trl`` command line: TRL's ``trl grpo`` with Prefix Grouper, plus a builtin offline demo.

    prefix-grouper-trl grpo --config recipes/tiny-cpu.yaml [--any_key value ...]
    python -m prefix_grouper_trl grpo --config recipes/tiny-cpu.yaml

Every key of ``trl grpo`` is accepted, with the same meaning: TRL's own ``GRPOScriptArguments``, ``ModelConfig`` and
``DatasetMixtureConfig`` are imported and parsed by TRL's ``TrlParser``; the training dataclass is
`PrefixGroupedGRPOConfig` (``GRPOConfig`` plus ``prefix_grouping``). Flags on the command line override the YAML.

Keys that are neither dataclass fields nor options of ``accelerate launch`` are an error, named with where they came
from (the YAML or the command line). Launcher keys (``--accelerate_config zero2|zero3|<file>``, ``--num_processes N``
and any other ``accelerate launch`` option) relaunch this same command under ``accelerate launch``, as ``trl grpo``
does; without them the job runs in this process.

Names understood on top of TRL's:

- ``model_name_or_path: builtin:tiny-qwen2`` and ``dataset_name: builtin:key-lookup``: see `demo/builtin.py`;
- ``reward_funcs: [key_lookup_reward]`` and ``[tldr_unigram_f1_reward]``: the recipes' rewards (`demo/rewards.py`),
  next to TRL's names and dotted import paths.

Everything that can be checked before the model is loaded is checked first (recipe path, keys, reward functions,
dataset columns), so a bad recipe fails in seconds with a message that names the key or file.
"""

import difflib
import importlib
import json
import os
import sys
from pathlib import Path

PROG = "prefix-grouper-trl"
# Set in the environment of processes started by our own relaunch, so that they train instead of relaunching.
LAUNCHED_ENV = "PREFIX_GROUPER_TRL_LAUNCHED"
# Our own launcher key; every other launcher key is an option of `accelerate launch`.
ACCELERATE_CONFIG_KEY = "accelerate_config"


class RecipeError(ValueError):
    """A recipe or command line that cannot run; the message names the key or file to fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------------


def make_parser(prog: str | None = f"{PROG} grpo"):
    """
    TRL's parser over ``(GRPOScriptArguments, PrefixGroupedGRPOConfig, ModelConfig, DatasetMixtureConfig)``.

    The same four dataclasses as ``trl grpo``'s parser, with our config in place of ``GRPOConfig``.
    """
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser
    from trl.scripts.grpo import GRPOScriptArguments

    from .config import PrefixGroupedGRPOConfig

    # No abbreviations: `--learning_rat` must be an unknown key, not a silent `--learning_rate`.
    return TrlParser(
        (GRPOScriptArguments, PrefixGroupedGRPOConfig, ModelConfig, DatasetMixtureConfig),
        prog=prog,
        allow_abbrev=False,
    )


def _launcher_option_names() -> set[str]:
    """Names (underscored, no dashes) of every option of ``accelerate launch``, plus ``accelerate_config``."""
    from accelerate.commands.launch import launch_command_parser

    names = {ACCELERATE_CONFIG_KEY}
    for option in launch_command_parser()._option_string_actions:
        if option.startswith("--"):
            names.add(option[2:].replace("-", "_"))
    names.discard("help")
    return names


def _split_remaining(strings: list[str]) -> list[tuple[str, list[str]]]:
    """``["--a", "1", "--b", "--c=2"]`` -> ``[("a", ["1"]), ("b", []), ("c", ["2"])]``; stray words keep key ``""``."""
    items: list[tuple[str, list[str]]] = []
    for token in strings:
        if token.startswith("--"):
            key, sep, value = token[2:].partition("=")
            items.append((key, [value] if sep else []))
        elif items:
            items[-1][1].append(token)
        else:
            items.append(("", [token]))
    return items


def _unknown_key_error(keys: list[str], source: str, known: set[str]) -> RecipeError:
    lines = []
    for key in keys:
        if not key:
            lines.append("a value without a key")
            continue
        close = difflib.get_close_matches(key, known, n=1)
        lines.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return RecipeError(
        f"Unknown key{'s' if len(keys) > 1 else ''} in {source}: {', '.join(lines)}. Every key must be a field of "
        "GRPOScriptArguments, PrefixGroupedGRPOConfig, ModelConfig or DatasetMixtureConfig, or an option of "
        "`accelerate launch` (see `prefix-grouper-trl grpo --help`)."
    )


def _remove_subsequence(tokens: list[str], subsequence: list[str]) -> list[str]:
    """``tokens`` without the ordered ``subsequence`` (the launcher tokens that the parser left over)."""
    kept, position = [], 0
    for token in tokens:
        if position < len(subsequence) and token == subsequence[position]:
            position += 1
        else:
            kept.append(token)
    return kept


def parse_grpo_args(argv: list[str]):
    """
    Parse ``grpo``'s arguments (everything after ``grpo``) the way ``trl grpo`` does, strictly.

    Returns ``(script_args, training_args, model_args, dataset_args, launch_args, training_argv)``:
    ``launch_args`` are the ``accelerate launch`` options found in the YAML or on the command line (a flat list of
    strings), ``training_argv`` is ``argv`` without the command line's launcher options (what a relaunched process
    is given).

    Raises `RecipeError` for a missing recipe file, an unknown key or a value that the dataclasses reject (for example
    ``num_generations < 2``), before anything is loaded.
    """
    argv = list(argv)
    config_path = None
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
            raise RecipeError("--config needs the path of a YAML recipe.")
        config_path = argv[index + 1]
        if not Path(config_path).is_file():
            raise RecipeError(f"--config: recipe file not found: {config_path}")

    parser = make_parser()
    try:
        *dataclasses, config_remaining, cli_remaining = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except FileNotFoundError as error:  # e.g. a `deepspeed` json named in the recipe
        raise RecipeError(f"{error.filename}: file not found ({error.strerror}).") from error
    except ValueError as error:  # the dataclasses' own checks in __post_init__
        source = f"recipe {config_path} or the command line" if config_path else "the command line"
        # TRL's own check on num_generations fires first and does not name the key; name it.
        raw, _ = parser.parse_known_args(argv)
        if raw.num_generations is not None and int(raw.num_generations) < 2:
            raise RecipeError(
                f"num_generations={raw.num_generations} (from {source}): GRPO needs at least 2 completions per prompt "
                "to compute advantages. Set num_generations to 2 or more."
            ) from error
        raise RecipeError(f"invalid value in {source}: {error}") from error

    known_fields = {action.dest for action in parser._actions}
    launcher_names = _launcher_option_names()
    launch_args: list[str] = []
    for strings, source in ((config_remaining, f"recipe {config_path}"), (cli_remaining, "the command line")):
        items = _split_remaining(strings)
        unknown = [key for key, _ in items if key.replace("-", "_") not in launcher_names]
        if unknown:
            raise _unknown_key_error(unknown, source, known_fields | launcher_names)
        for key, values in items:
            launch_args += [f"--{key}", *values]
    return (*dataclasses, launch_args, _remove_subsequence(argv, cli_remaining))


# ---------------------------------------------------------------------------------------------------------------------
# Resolving names to objects, before anything heavy is loaded
# ---------------------------------------------------------------------------------------------------------------------


def reward_function_registry() -> dict:
    """TRL's named reward functions (the same names ``trl grpo`` knows) and ours."""
    from trl.rewards import (
        accuracy_reward,
        get_soft_overlong_punishment,
        reasoning_accuracy_reward,
        think_format_reward,
    )

    from .demo.rewards import colour_reward, key_lookup_reward, tldr_unigram_f1_reward

    return {
        "accuracy_reward": accuracy_reward,
        "reasoning_accuracy_reward": reasoning_accuracy_reward,
        "think_format_reward": think_format_reward,
        # The same parameters as `trl grpo` uses for this name.
        "get_soft_overlong_punishment": get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256),
        "key_lookup_reward": key_lookup_reward,
        "colour_reward": colour_reward,
        "tldr_unigram_f1_reward": tldr_unigram_f1_reward,
    }


def resolve_reward_funcs(script_args) -> list:
    """Reward model path (if any) and reward functions, by registry name or dotted import path."""
    reward_funcs: list = []
    if script_args.reward_model_name_or_path:
        reward_funcs.append(script_args.reward_model_name_or_path)
    registry = reward_function_registry()
    for name in script_args.reward_funcs or []:
        if name in registry:
            reward_funcs.append(registry[name])
            continue
        if "." not in name:
            raise RecipeError(
                f"reward_funcs: unknown reward function {name!r}. Use one of {sorted(registry)} or a dotted import "
                "path such as 'my_package.rewards.my_reward'."
            )
        module_name, attribute = name.rsplit(".", 1)
        # As `trl grpo` does: modules next to the recipe's working directory are importable.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise RecipeError(f"reward_funcs: cannot import module {module_name!r} for {name!r}: {error}") from error
        if not hasattr(module, attribute):
            raise RecipeError(f"reward_funcs: module {module_name!r} has no attribute {attribute!r} (from {name!r}).")
        function = getattr(module, attribute)
        if not callable(function):
            raise RecipeError(f"reward_funcs: {name!r} is not callable.")
        reward_funcs.append(function)
    if not reward_funcs:
        raise RecipeError("reward_funcs: no reward. Set reward_funcs and/or reward_model_name_or_path.")
    return reward_funcs


def load_datasets(script_args, training_args, dataset_args):
    """
    ``(train_dataset, eval_dataset_or_None)`` as ``trl grpo`` loads them, plus ``builtin:`` datasets, then checked:
    the train (and eval) split must have a ``prompt`` column.
    """
    from datasets import load_dataset
    from trl import get_dataset

    from .demo.builtin import is_builtin, load_builtin_dataset

    if dataset_args.datasets:
        source = "datasets: " + ", ".join(config.path for config in dataset_args.datasets)
        dataset = get_dataset(dataset_args)
        # `get_dataset` names its splits "train" (and "test" when test_split_size is set).
        train_split, test_split = "train", "test"
    elif script_args.dataset_name:
        source = f"dataset_name {script_args.dataset_name}"
        train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
        if is_builtin(script_args.dataset_name):
            dataset = load_builtin_dataset(script_args.dataset_name, script_args.dataset_config)
        else:
            dataset = load_dataset(
                script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
            )
    else:
        raise RecipeError("No dataset: set dataset_name (e.g. builtin:key-lookup) or a `datasets` mixture.")

    def split(name: str, key: str):
        if name not in dataset:
            raise RecipeError(f"{key}: {source} has no split {name!r}; it has {sorted(dataset)}.")
        part = dataset[name]
        columns = part.column_names or []
        if "prompt" not in columns:
            raise RecipeError(
                f"{source}, split {name!r}: no 'prompt' column (columns: {columns}). GRPO needs the prompts in a "
                "column named 'prompt'; rename yours, e.g. with `Dataset.rename_column`, or select another dataset."
            )
        return part

    train_dataset = split(train_split, "dataset_train_split")
    eval_dataset = split(test_split, "dataset_test_split") if training_args.eval_strategy != "no" else None
    return train_dataset, eval_dataset


def resolve_model(model_args):
    """``(model name or local folder, processing class or None)``; ``builtin:`` models are written on first use."""
    from .demo.builtin import is_builtin, load_builtin_processing_class, materialize_builtin_model

    name = model_args.model_name_or_path
    if not name:
        raise RecipeError("model_name_or_path: not set. Give a hub id, a local folder or builtin:tiny-qwen2.")
    if not is_builtin(name):
        return name, None
    try:
        folder = materialize_builtin_model(name)
    except ValueError as error:
        raise RecipeError(f"model_name_or_path: {error}") from error
    return folder, load_builtin_processing_class(name, folder)


# ---------------------------------------------------------------------------------------------------------------------
# wandb
# ---------------------------------------------------------------------------------------------------------------------


def _wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def configure_wandb(training_args) -> bool:
    """
    When the run reports to wandb: offline mode unless an API key is configured (``WANDB_MODE`` wins when set), run
    files under ``output_dir`` (unless ``WANDB_DIR`` is set), project ``prefix-grouper-trl`` (unless
    ``WANDB_PROJECT`` is set). Returns whether wandb is used.
    """
    if "wandb" not in (training_args.report_to or []):
        return False
    try:
        import wandb  # noqa: F401
    except ImportError as error:
        raise RecipeError(
            "report_to: wandb is asked for but not installed. Install it (pip install 'prefix_grouper_trl[wandb]') "
            "or pass --report_to none."
        ) from error
    if not _wandb_api_key_configured():
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_PROJECT", "prefix-grouper-trl")
    if "WANDB_DIR" not in os.environ:
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        os.environ["WANDB_DIR"] = str(Path(training_args.output_dir).resolve())
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Launch and train
# ---------------------------------------------------------------------------------------------------------------------


def relaunch_with_accelerate(training_argv: list[str], launch_args: list[str]) -> None:
    """
    Run ``python -m prefix_grouper_trl grpo <training_argv>`` under ``accelerate launch <launch_args>``.

    Launcher keys that sit in the YAML reach the children too; `LAUNCHED_ENV` tells them to ignore those.

    ``--accelerate_config`` takes a file or one of TRL's packaged names (``zero1``, ``zero2``, ``zero3``,
    ``fsdp1``, ``fsdp2``, ``multi_gpu``, ``single_gpu``), resolved by TRL's own helper, exactly as ``trl grpo``.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    try:
        launch_args = resolve_accelerate_config_argument(list(launch_args))
    except ValueError as error:
        raise RecipeError(f"--accelerate_config: {error}") from error

    os.environ[LAUNCHED_ENV] = "1"
    # The children import this package by name: make sure they find the same copy we are running from.
    package_parent = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
    accelerate_args = launch_command_parser().parse_args(
        launch_args + ["--module", "prefix_grouper_trl", "grpo", *training_argv]
    )
    launch_command(accelerate_args)


def train(script_args, training_args, model_args, dataset_args) -> dict:
    """
    The job itself, in this process: check names, load, train, save, report. Returns the paths it wrote.
    """
    from trl import get_peft_config, get_quantization_config

    from . import PrefixGroupedGRPOTrainer
    from .progress import use_reward_progress_bar

    # torch sized its thread pool when it was imported, before the recipe's `env:` was applied; honour the recipe.
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    # Checks first: nothing heavy is loaded until these pass.
    reward_funcs = resolve_reward_funcs(script_args)
    use_wandb = configure_wandb(training_args)
    train_dataset, eval_dataset = load_datasets(script_args, training_args, dataset_args)
    model_path, processing_class = resolve_model(model_args)

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    trainer = PrefixGroupedGRPOTrainer(
        model=model_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    use_reward_progress_bar(trainer)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)

    report = {}
    if trainer.accelerator.is_main_process:
        report = write_run_report(trainer, training_args.output_dir, use_wandb)
    # Closes the trackers (the wandb run) and the process group.
    trainer.end()
    return report


def write_run_report(trainer, output_dir: str, use_wandb: bool) -> dict:
    """Write the metric history and the plot next to the model, and print where everything is."""
    from .demo.plotting import plot_training_curves, summarize_rewards

    output = Path(output_dir).resolve()
    history = [dict(entry) for entry in trainer.state.log_history]
    log_path = output / "log_history.json"
    log_path.write_text(json.dumps(history, indent=1))
    plot_path = plot_training_curves(history, output / "training_curves.png")
    report = {"log_history": str(log_path), "model": str(output), "plot": str(plot_path)}

    state = trainer.accelerator.state
    launch = f"{state.num_processes} process{'es' if state.num_processes > 1 else ''}"
    if trainer.is_deepspeed_enabled:
        launch += f", DeepSpeed ZeRO-{state.deepspeed_plugin.zero_stage}"
    elif state.distributed_type.value != "NO":
        launch += f", {state.distributed_type.value}"
    report["launch"] = launch
    lines = ["", f"Run finished ({launch}).", f"  final model   : {output}", f"  metric log    : {log_path}"]
    if use_wandb:
        import wandb

        if wandb.run is not None:
            report["wandb"] = wandb.run.dir and str(Path(wandb.run.dir).parent)
            mode = "offline" if wandb.run.settings._offline else "online"
            lines.append(f"  wandb ({mode}) : {report['wandb']}")
            if mode == "offline":
                lines.append(f"                  upload later with: wandb sync {report['wandb']}")
    lines.append(f"  plot          : {plot_path}")
    summary = summarize_rewards(history)
    if summary is not None:
        report.update(summary)
        lines.append(
            f"  mean reward   : {summary['reward_first']:.3f} over the first 20% of steps -> "
            f"{summary['reward_last']:.3f} over the last 20%"
        )
    saved = [
        entry["prefix_grouper/tokens_saved_frac"] for entry in history if "prefix_grouper/tokens_saved_frac" in entry
    ]
    if saved:
        lines.append(
            f"  prompt tokens not recomputed (Prefix Grouper): {100 * sum(saved) / len(saved):.1f}% on average"
        )
    print("\n".join(lines), flush=True)
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------

USAGE = f"""usage: {PROG} grpo --config RECIPE.yaml [--KEY VALUE ...]

Commands:
  grpo    GRPO training with Prefix Grouper; accepts every key of `trl grpo`.

Run `{PROG} grpo --help` for every key. The offline CPU demo:
  {PROG} grpo --config recipes/tiny-cpu.yaml
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, grpo_argv = argv[0], argv[1:]
    if command != "grpo":
        print(USAGE, file=sys.stderr)
        print(f"{PROG}: error: unknown command {command!r}; the only command is 'grpo'.", file=sys.stderr)
        return 2
    try:
        script_args, training_args, model_args, dataset_args, launch_args, training_argv = parse_grpo_args(grpo_argv)
        if launch_args and not os.environ.get(LAUNCHED_ENV):
            relaunch_with_accelerate(training_argv, launch_args)
        else:
            train(script_args, training_args, model_args, dataset_args)
    except RecipeError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
