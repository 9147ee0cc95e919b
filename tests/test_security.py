"""
Security and hygiene (docs/RELIABILITY.md, "Security"):

- the package never unpickles: every `torch.load` passes `weights_only=True`, and there is no pickle, marshal,
  unsafe YAML, `eval` or `exec` (checked on the syntax tree of every source file, with a self-test of the checker);
- `trust_remote_code` is off by default and nothing of ours turns it on;
- secrets in the environment (`WANDB_API_KEY`, `HF_TOKEN`) or in the config (`hub_token`) appear nowhere in what a
  real run with wandb (offline)
  writes: the wandb run folder (the binary .wandb file with config and metrics, logs, requirements) and the
  output folder (checkpoint with training_args.bin, trainer_state.json, final model).
"""

import ast
import os
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers import grpo_args, prompt_dataset, tiny_model, tiny_tokenizer, token_count_reward

import prefix_grouper_trl
from prefix_grouper_trl import PrefixGroupedGRPOConfig, PrefixGroupedGRPOTrainer

PACKAGE_DIR = Path(prefix_grouper_trl.__file__).parent
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_YAML = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_constructs(source: str, filename: str = "<source>") -> list[str]:
    """Every construct of `source` that could execute data as code or turn on remote code, as `file:line: what`."""
    found = []

    def report(node, what):
        found.append(f"{filename}:{node.lineno}: {what}")

    tree = ast.parse(source)
    # Names under which `torch.load` is called: the attribute, and `from torch import load [as name]`.
    torch_load_names = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization")
        for alias in node.names
        if alias.name == "load"
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in UNSAFE_MODULES:
                    report(node, f"imports {name}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            if name.endswith(("torch.load", "serialization.load")) or name in torch_load_names:
                if not _is_true(keywords.get("weights_only")):
                    report(node, "torch.load without weights_only=True")
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                report(node, f"calls {name}")
            if name.startswith("yaml.") and name.split(".")[-1] in UNSAFE_YAML:
                report(node, f"calls {name} (use yaml.safe_load)")
            if _is_true(keywords.get("allow_pickle")):
                report(node, "allow_pickle=True")
            if _is_true(keywords.get("trust_remote_code")):
                report(node, "passes trust_remote_code=True")
            if name.endswith("dict") and any(_is_true(v) and k == "trust_remote_code" for k, v in keywords.items()):
                report(node, "trust_remote_code=True in a dict")
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if _dotted(target).endswith("trust_remote_code") and _is_true(node.value):
                    report(node, "sets trust_remote_code = True")
                if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant):
                    if target.slice.value == "trust_remote_code" and _is_true(node.value):
                        report(node, "sets ['trust_remote_code'] = True")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_true(value):
                    report(node, "{'trust_remote_code': True}")
    return found


def package_sources() -> list[Path]:
    sources = sorted(PACKAGE_DIR.rglob("*.py"))
    assert len(sources) >= 6, f"expected the package sources under {PACKAGE_DIR}"
    return sources


def test_the_package_never_unpickles_or_enables_remote_code():
    found = []
    for path in package_sources():
        found += unsafe_constructs(path.read_text(), str(path.relative_to(PACKAGE_DIR.parent)))
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\nstate = torch.load(path)",
        "import torch\nstate = torch.load(path, weights_only=False)",
        "from torch import load\nstate = load(path, weights_only=False)",
        "from torch import load as load_state\nstate = load_state(path)",
        "import pickle",
        "from pickle import loads",
        "import yaml\nrecipe = yaml.load(text, Loader=yaml.Loader)",
        "value = eval(text)",
        "import numpy as np\narray = np.load(path, allow_pickle=True)",
        "model = AutoModel.from_pretrained(name, trust_remote_code=True)",
        "kwargs = dict(trust_remote_code=True)",
        "kwargs = {'trust_remote_code': True}",
        "kwargs['trust_remote_code'] = True",
        "args.trust_remote_code = True",
    ],
)
def test_the_checker_catches_each_unsafe_construct(snippet):
    assert unsafe_constructs(snippet), f"not caught: {snippet!r}"


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\nstate = torch.load(path, weights_only=True, map_location='cpu')",
        "import yaml\nrecipe = yaml.safe_load(text)",
        "model = AutoModel.from_pretrained(name, trust_remote_code=args.trust_remote_code)",
    ],
)
def test_the_checker_accepts_safe_constructs(snippet):
    assert unsafe_constructs(snippet) == []


def test_trust_remote_code_is_off_unless_the_user_sets_it(tmp_path):
    assert PrefixGroupedGRPOConfig(output_dir=str(tmp_path), use_cpu=True).trust_remote_code is False
    # The console entry point parses a recipe without the key to False in every dataclass that has it.
    from prefix_grouper_trl.cli import make_parser

    parsed = make_parser().parse_args_and_config(
        [
            "--model_name_or_path",
            "builtin:tiny-qwen2",
            "--dataset_name",
            "builtin:key-lookup",
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "true",
        ],
        return_remaining_strings=True,
    )
    flags = [obj.trust_remote_code for obj in parsed if hasattr(obj, "trust_remote_code")]
    assert flags and not any(flags)
    # Only the user turns it on.
    user_config = PrefixGroupedGRPOConfig(output_dir=str(tmp_path), use_cpu=True, trust_remote_code=True)
    assert user_config.trust_remote_code is True


def test_secrets_never_reach_the_run_files(tmp_path, monkeypatch):
    """A real 2-step run reporting to wandb (offline) with secrets in the environment; grep every byte written."""
    wandb = pytest.importorskip("wandb")
    wandb_secret = "wandbsecret" + uuid.uuid4().hex[:29]  # 40 characters, the shape of a wandb key
    hf_secret = "hf_secret" + uuid.uuid4().hex[:25]
    wandb_dir, output_dir = tmp_path / "wandb-dir", tmp_path / "output"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_API_KEY", wandb_secret)
    monkeypatch.setenv("HF_TOKEN", hf_secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", hf_secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_PROJECT", "prefix-grouper-trl-tests")
    monkeypatch.setenv("WANDB_SILENT", "true")

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = PrefixGroupedGRPOTrainer(
            model=tiny_model("qwen2"),
            reward_funcs=token_count_reward,
            # A token given in the config too: transformers would pickle it into training_args.bin.
            args=grpo_args(
                output_dir,
                max_steps=2,
                report_to=["wandb"],
                save_strategy="steps",
                save_steps=2,
                run_name="secrets-check",
                hub_token=hf_secret,
            ),
            train_dataset=prompt_dataset(),
            processing_class=tiny_tokenizer(),
        )
        trainer.train()
        trainer.save_model(str(output_dir / "final"))
    finally:
        torch.set_num_threads(previous_threads)
        wandb.finish()
        wandb.teardown()  # stops wandb's service process, which writes the run files asynchronously

    run_dirs = [path for path in wandb_dir.rglob("offline-run-*") if path.is_dir()]
    assert len(run_dirs) == 1, f"expected one offline run under {wandb_dir}: {run_dirs}"
    run_file = next(run_dirs[0].glob("*.wandb"))
    deadline = time.monotonic() + 30
    while b"prefix_grouper/tokens_saved_frac" not in run_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)  # belt and braces: the run file is complete once its metrics are in it
    written = {
        path: path.read_bytes() for root in (wandb_dir, output_dir) for path in root.rglob("*") if path.is_file()
    }
    run_files = {path.name for path in written if run_dirs[0] in path.parents}
    assert any(name.endswith(".wandb") for name in run_files), run_files
    # Positive controls: the run config (an offline run keeps it in the .wandb file; config.yaml, where written,
    # is grepped too) and the logged metrics are readable in these bytes, so a secret would be found as well.
    wandb_file = next(data for path, data in written.items() if path.suffix == ".wandb")
    assert b"prefix_grouping_shuffle_groups" in wandb_file, "the run config is not in the .wandb file"
    assert b"prefix_grouper/tokens_saved_frac" in wandb_file, "the logged metrics are not in the .wandb file"

    for secret in (wandb_secret, hf_secret):
        leaks = [str(path.relative_to(tmp_path)) for path, data in written.items() if secret.encode() in data]
        assert leaks == [], f"secret found in {leaks}"
    assert (output_dir / "checkpoint-2" / "training_args.bin").is_file()
    # Leaving the token out of the saved arguments did not take it from the run (pushing to the Hub still works).
    assert trainer.args.hub_token == hf_secret
    assert os.environ["WANDB_API_KEY"] == wandb_secret
