"""
The demo task: find the value of a key hidden in a long document.

Every prompt is a long run of filler words with one fact, ``key is v<k> .``, hidden at a random place, followed by the
question. The answer is a single word copied from the document::

    w12 w40 w7 ... w3 key is v5 . w31 ... w9 question : what is key ? answer :   ->   v5

The prompt is long (76 tokens with the demo's settings) and the answer short (one token), which is the shape Prefix
Grouper is built for: the ``num_generations`` completions of a prompt share everything but a few tokens.

The vocabulary is closed and small, so a word-level tokenizer covers it exactly (see `tokenizer.py`). From random
initialisation a two-layer model first learns, within a few dozen GRPO steps, to answer with a value word at all
(partial credit, see `rewards.py`), then, after a plateau of a few hundred steps at chance level, to copy the one
value word that the document holds. The plateau ends only while each prompt's answers stay diverse, which is what
the recipe's entropy bonus is for.
"""

import random
from dataclasses import dataclass, fields

# The closed vocabulary. Changing any of these lists changes the tokenizer and so the builtin model's vocabulary.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
STRUCTURE_WORDS = ["key", "is", ".", "question", ":", "what", "?", "answer"]
MAX_VALUES = 16
MAX_FILLERS = 48
VALUE_WORDS = [f"v{index}" for index in range(MAX_VALUES)]
FILLER_WORDS = [f"w{index}" for index in range(MAX_FILLERS)]
VOCABULARY = SPECIAL_TOKENS + STRUCTURE_WORDS + VALUE_WORDS + FILLER_WORDS

QUESTION = "question : what is key ? answer :"


@dataclass(frozen=True)
class KeyLookupTask:
    """
    Parameters of the synthetic task. The defaults are those of `recipes/tiny-cpu.yaml`.

    Args:
        context_words: filler words around the hidden fact; the prompt has ``context_words + 4 + 8`` words.
        num_values: how many distinct value words can be the answer (chance level is ``1 / num_values``).
        num_fillers: how many distinct filler words the document is drawn from.
        num_train: rows of the train split.
        num_test: rows of the test split.
        seed: seed of the generator; the same seed gives the same dataset on every process.
    """

    context_words: int = 64
    num_values: int = 8
    num_fillers: int = 48
    num_train: int = 4096
    num_test: int = 64
    seed: int = 1234

    def __post_init__(self):
        if not 1 <= self.num_values <= MAX_VALUES:
            raise ValueError(f"num_values={self.num_values}: must be between 1 and {MAX_VALUES}.")
        if not 1 <= self.num_fillers <= MAX_FILLERS:
            raise ValueError(f"num_fillers={self.num_fillers}: must be between 1 and {MAX_FILLERS}.")
        if self.context_words < 0 or self.num_train < 1 or self.num_test < 0:
            raise ValueError("context_words and num_test must be >= 0 and num_train >= 1.")

    @classmethod
    def from_spec(cls, spec: str | None) -> "KeyLookupTask":
        """
        Parse ``"context_words=64,num_values=4"`` (the CLI's ``dataset_config`` for the builtin dataset).

        An empty or missing spec gives the defaults; an unknown name is an error that lists the known ones.
        """
        return task_from_spec(cls, spec, "key-lookup")


def task_from_spec(task_class, spec: str | None, dataset: str):
    """A task dataclass from ``"name=int,name=int"``; the defaults where a spec is empty, an error naming the known
    names for anything else."""
    if not spec:
        return task_class()
    known = {field.name for field in fields(task_class)}
    values = {}
    for item in spec.split(","):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in known:
            raise ValueError(
                f"dataset_config: cannot read {item.strip()!r} for the builtin {dataset} dataset; expected "
                f"comma-separated NAME=INT with NAME in {sorted(known)}."
            )
        values[name] = int(raw)
    return task_class(**values)


def make_example(task: KeyLookupTask, rng: random.Random) -> dict:
    """One row: ``{"prompt": str, "answer": str}``. The fact lands at a uniformly random filler position."""
    fillers = [rng.choice(FILLER_WORDS[: task.num_fillers]) for _ in range(task.context_words)]
    answer = VALUE_WORDS[rng.randrange(task.num_values)]
    position = rng.randint(0, task.context_words)
    words = fillers[:position] + ["key", "is", answer, "."] + fillers[position:] + QUESTION.split()
    return {"prompt": " ".join(words), "answer": answer}


def make_key_lookup_dataset(task: KeyLookupTask | None = None):
    """
    The builtin dataset as a `datasets.DatasetDict` with ``train`` and ``test`` splits, columns ``prompt`` (plain
    text, not conversational) and ``answer`` (the value word). Deterministic in ``task.seed``.
    """
    from datasets import Dataset, DatasetDict

    task = task or KeyLookupTask()
    rng = random.Random(task.seed)
    train = [make_example(task, rng) for _ in range(task.num_train)]
    test = [make_example(task, rng) for _ in range(task.num_test)]
    return DatasetDict(
        {
            "train": Dataset.from_list(train),
            "test": Dataset.from_list(test) if test else Dataset.from_dict({"prompt": [], "answer": []}),
        }
    )
