"""
Builtin models and datasets, named ``builtin:<name>`` in recipes and on the command line.

``model_name_or_path: builtin:tiny-qwen2``
    A two-layer Qwen2 (``assets/tiny-qwen2.json``) with the demo's word-level tokenizer, randomly initialised with a
    fixed seed. On first use it is written once as an ordinary model folder (``config.json``, ``model.safetensors``,
    ``tokenizer.json``) under the cache, and the CLI hands TRL that folder's path, so everything downstream (dtype,
    attention implementation, ZeRO-3 init, the reference model, PEFT) is TRL's ordinary loading path.

``dataset_name: builtin:key-lookup``
    The synthetic long-prompt task of `task.py`; ``dataset_config`` tunes it, e.g. ``context_words=64,num_values=4``.

The cache is ``$PREFIX_GROUPER_TRL_HOME`` or ``~/.cache/prefix_grouper_trl``. Folders are named by a hash of
everything that defines their content, and written to a temporary folder then renamed, so concurrent processes of a
distributed launch never see half a model.
"""

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-qwen2",)
BUILTIN_DATASETS = ("key-lookup",)
_MODEL_INIT_SEED = 0


def is_builtin(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(BUILTIN_PREFIX)


def cache_root() -> Path:
    return Path(os.environ.get("PREFIX_GROUPER_TRL_HOME", Path.home() / ".cache" / "prefix_grouper_trl"))


def _builtin_name(name: str, known: tuple[str, ...], what: str) -> str:
    short = name[len(BUILTIN_PREFIX) :]
    if short not in known:
        raise ValueError(
            f"Unknown builtin {what} {name!r}. Known: {', '.join(BUILTIN_PREFIX + item for item in known)}."
        )
    return short


def tiny_qwen2_config_dict() -> dict:
    """The shipped config with the vocabulary and special-token ids of the demo tokenizer filled in."""
    from .task import VOCABULARY

    config = json.loads(resources.files("prefix_grouper_trl").joinpath("assets", "tiny-qwen2.json").read_text())
    config.update(
        vocab_size=len(VOCABULARY),
        pad_token_id=VOCABULARY.index("<pad>"),
        eos_token_id=VOCABULARY.index("<eos>"),
        bos_token_id=None,
    )
    return config


def _write_tiny_qwen2(folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from .tokenizer import build_key_lookup_tokenizer

    config = Qwen2Config(**tiny_qwen2_config_dict())
    # A private generator keeps the weights fixed whatever seed the caller's process runs with.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_MODEL_INIT_SEED)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=True
    )
    model.save_pretrained(folder)
    build_key_lookup_tokenizer().save_pretrained(folder)


def materialize_builtin_model(name: str) -> str:
    """
    The local folder holding builtin model ``name`` (e.g. ``"builtin:tiny-qwen2"``), written on first use.

    Returns the folder as a string, ready for ``from_pretrained`` / TRL's ``model=`` argument.
    """
    import torch
    import transformers

    from .task import VOCABULARY

    short = _builtin_name(name, BUILTIN_MODELS, "model")
    recipe = json.dumps(
        [short, tiny_qwen2_config_dict(), VOCABULARY, _MODEL_INIT_SEED, transformers.__version__, torch.__version__],
        sort_keys=True,
    )
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    folder = cache_root() / "models" / f"{short}-{digest}"
    if (folder / "config.json").is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{short}-", dir=folder.parent))
    try:
        _write_tiny_qwen2(staging)
        try:
            staging.rename(folder)
        except OSError:
            # Another process finished first; its folder is identical to ours.
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


def load_builtin_dataset(name: str, spec: str | None = None):
    """The builtin dataset ``name`` (e.g. ``"builtin:key-lookup"``) as a `datasets.DatasetDict`."""
    from .task import KeyLookupTask, make_key_lookup_dataset

    _builtin_name(name, BUILTIN_DATASETS, "dataset")
    return make_key_lookup_dataset(KeyLookupTask.from_spec(spec))
