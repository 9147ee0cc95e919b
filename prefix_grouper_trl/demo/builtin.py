"""
Builtin models and datasets, named ``builtin:<name>`` in recipes and on the command line.

``model_name_or_path: builtin:tiny-qwen2``
    A two-layer Qwen2 (``assets/tiny-qwen2.json``) with the demo's word-level tokenizer, randomly initialised with a
    fixed seed. On first use it is written once as an ordinary model folder (``config.json``, ``model.safetensors``,
    ``tokenizer.json``) under the cache, and the CLI hands TRL that folder's path, so everything downstream (dtype,
    attention implementation, ZeRO-3 init, the reference model, PEFT) is TRL's ordinary loading path.

``model_name_or_path: builtin:tiny-qwen2.5-vl``
    A Qwen2.5-VL (``assets/tiny-qwen2.5-vl.json``: two text layers, a two-block vision tower) with the colour task's
    offline processor (`vision_processor.py`), written the same way; `load_builtin_processing_class` gives its
    processor, which the CLI hands TRL.

``dataset_name: builtin:key-lookup``
    The synthetic long-prompt task of `task.py`; ``dataset_config`` tunes it, e.g. ``context_words=64,num_values=4``.

``dataset_name: builtin:colour-shapes``
    The synthetic image task of `colour_task.py`; ``dataset_config`` tunes it, e.g. ``num_colours=4``.

``dataset_name: builtin:multimodal-open-r1``
    Not offline: ``lmms-lab/multimodal-open-r1-8k-verified`` downloaded from the hub and mapped to the columns TRL's
    GRPO reads (``prompt`` as a user message, ``image``, ``solution`` for TRL's ``accuracy_reward``).

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
BUILTIN_MODELS = ("tiny-qwen2", "tiny-qwen2.5-vl")
BUILTIN_DATASETS = ("key-lookup", "colour-shapes", "multimodal-open-r1")
# The hub dataset behind builtin:multimodal-open-r1, and the instruction added to its questions.
MULTIMODAL_OPEN_R1 = "lmms-lab/multimodal-open-r1-8k-verified"
MULTIMODAL_OPEN_R1_INSTRUCTION = (
    " Think step by step inside <think> </think> tags, then give the final answer in \\boxed{}."
)
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


def _shipped_config(name: str) -> dict:
    return json.loads(resources.files("prefix_grouper_trl").joinpath("assets", name).read_text())


def tiny_qwen2_config_dict() -> dict:
    """The shipped config with the vocabulary and special-token ids of the demo tokenizer filled in."""
    from .task import VOCABULARY

    config = _shipped_config("tiny-qwen2.json")
    config.update(
        vocab_size=len(VOCABULARY),
        pad_token_id=VOCABULARY.index("<pad>"),
        eos_token_id=VOCABULARY.index("<eos>"),
        bos_token_id=None,
    )
    return config


def tiny_qwen2_5_vl_config_dict() -> dict:
    """The shipped vision-language config with the colour processor's vocabulary and token ids filled in."""
    from .vision_processor import VOCABULARY

    config = _shipped_config("tiny-qwen2.5-vl.json")
    token_ids = dict(vocab_size=len(VOCABULARY), pad_token_id=VOCABULARY.index("<pad>"),
                     eos_token_id=VOCABULARY.index("<eos>"), bos_token_id=None)
    config["text_config"].update(token_ids)
    config.update(
        image_token_id=VOCABULARY.index("<|image_pad|>"),
        video_token_id=VOCABULARY.index("<|video_pad|>"),
        vision_start_token_id=VOCABULARY.index("<|vision_start|>"),
        vision_end_token_id=VOCABULARY.index("<|vision_end|>"),
        **token_ids,
    )
    return config


def _builtin_config(short: str) -> dict:
    return tiny_qwen2_config_dict() if short == "tiny-qwen2" else tiny_qwen2_5_vl_config_dict()


def _write_builtin_model(short: str, folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    config_dict = dict(_builtin_config(short))
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    auto_class = AutoModelForCausalLM if short == "tiny-qwen2" else AutoModelForImageTextToText
    # The class itself, not `from_config`: under a DeepSpeed ZeRO-3 launch `from_config` partitions the parameters,
    # and the folder would be written with empty tensors.
    model_class = auto_class._model_mapping[type(config)]
    # A private generator keeps the weights fixed whatever seed the caller's process runs with.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_MODEL_INIT_SEED)
        model = model_class(config)
    text_config = config.get_text_config()
    model.generation_config = GenerationConfig(
        eos_token_id=text_config.eos_token_id, pad_token_id=text_config.pad_token_id, do_sample=True
    )
    model.save_pretrained(folder)
    if short == "tiny-qwen2":
        from .tokenizer import build_key_lookup_tokenizer

        build_key_lookup_tokenizer().save_pretrained(folder)
    else:
        from .vision_processor import build_colour_processor

        build_colour_processor().save_pretrained(folder)


def load_builtin_processing_class(name: str, folder: str):
    """The tokenizer (text model) or processor (vision-language model) of builtin ``name``, saved in ``folder``."""
    short = _builtin_name(name, BUILTIN_MODELS, "model")
    if short == "tiny-qwen2":
        from transformers import PreTrainedTokenizerFast

        # transformers maps model_type "qwen2" to Qwen2Tokenizer (byte-level BPE), which would rebuild our word-level
        # tokenizer wrongly; loading the generic class keeps tokenizer.json as it is.
        return PreTrainedTokenizerFast.from_pretrained(folder, padding_side="left", truncation_side="left")
    from .vision_processor import load_colour_processor

    return load_colour_processor(folder)


def materialize_builtin_model(name: str) -> str:
    """
    The local folder holding builtin model ``name`` (e.g. ``"builtin:tiny-qwen2"``), written on first use.

    Returns the folder as a string, ready for ``from_pretrained`` / TRL's ``model=`` argument.
    """
    import torch
    import transformers

    from . import task, vision_processor

    short = _builtin_name(name, BUILTIN_MODELS, "model")
    if short == "tiny-qwen2":
        vocabulary = task.VOCABULARY
    else:
        vocabulary = [*vision_processor.VOCABULARY, vision_processor.CHAT_TEMPLATE]
    recipe = json.dumps(
        [short, _builtin_config(short), vocabulary, _MODEL_INIT_SEED, transformers.__version__, torch.__version__],
        sort_keys=True,
    )
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    folder = cache_root() / "models" / f"{short}-{digest}"
    if (folder / "config.json").is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{short}-", dir=folder.parent))
    try:
        _write_builtin_model(short, staging)
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
    short = _builtin_name(name, BUILTIN_DATASETS, "dataset")
    if short == "multimodal-open-r1":
        from datasets import load_dataset

        dataset = load_dataset(MULTIMODAL_OPEN_R1, name=spec)
        return dataset.map(multimodal_open_r1_row, remove_columns=multimodal_open_r1_dropped(dataset))
    if short == "colour-shapes":
        from .colour_task import ColourTask, make_colour_dataset

        return make_colour_dataset(ColourTask.from_spec(spec))
    from .task import KeyLookupTask, make_key_lookup_dataset

    return make_key_lookup_dataset(KeyLookupTask.from_spec(spec))


def multimodal_open_r1_row(example: dict) -> dict:
    """One row of ``lmms-lab/multimodal-open-r1-8k-verified`` (``image``, ``problem``, ``solution``) for TRL's GRPO."""
    question = example["problem"].strip() + MULTIMODAL_OPEN_R1_INSTRUCTION
    prompt = [{"role": "user", "content": question}]
    return {"prompt": prompt, "image": example["image"], "solution": example["solution"]}


def multimodal_open_r1_dropped(dataset) -> list[str]:
    """The columns of the hub dataset that the mapped rows do not keep."""
    columns = next(iter(dataset.values())).column_names
    return [column for column in columns if column not in ("image", "solution")]
