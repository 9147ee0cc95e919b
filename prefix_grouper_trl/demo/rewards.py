"""
Rewards used by the shipped recipes, in TRL's reward-function shape: ``f(completions, <column>, **kwargs) -> floats``.

`key_lookup_reward` scores the builtin key-lookup task (``recipes/tiny-cpu.yaml``), `colour_reward` the builtin colour
task (``recipes/tiny-vlm-cpu.yaml``); `tldr_unigram_f1_reward` scores summaries of ``trl-lib/tldr`` against the
dataset's reference summary (the GPU recipes).

Key lookup:

Partial credit gives a random-init policy a gradient before it ever finds the value: answering with any value word
already earns something, and only the exact one-word answer earns full reward.

| completion (words)         | reward |
| -------------------------- | ------ |
| exactly ``[answer]``       | 1.0    |
| ``[answer, ...]``          | 0.6    |
| ``[other value word, ...]``| 0.2    |
| anything else / empty      | 0.0    |
"""

import re
from collections import Counter

from .colour_task import COLOUR_WORDS
from .task import VALUE_WORDS


def _completion_text(completion) -> str:
    # Plain-text datasets give strings; conversational ones give [{"role": "assistant", "content": ...}].
    if isinstance(completion, list):
        return " ".join(message.get("content", "") for message in completion if isinstance(message, dict))
    return str(completion)


def _one_word_reward(completions, answer, words_of_kind) -> list[float]:
    """1.0 for exactly ``[answer]``, 0.6 for ``[answer, ...]``, 0.2 for another word of the kind first, else 0.0."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        words = _completion_text(completion).split()
        if words == [expected]:
            rewards.append(1.0)
        elif words and words[0] == expected:
            rewards.append(0.6)
        elif words and words[0] in words_of_kind:
            rewards.append(0.2)
        else:
            rewards.append(0.0)
    return rewards


def key_lookup_reward(completions, answer, **kwargs) -> list[float]:
    """Score each completion against the value word hidden in its prompt (column ``answer``)."""
    return _one_word_reward(completions, answer, VALUE_WORDS)


def colour_reward(completions, answer, **kwargs) -> list[float]:
    """Score each completion against the colour of the shape in its image (column ``answer``), as above."""
    return _one_word_reward(completions, answer, COLOUR_WORDS)


_WORD = re.compile(r"[a-z0-9']+")


def _unigram_f1(candidate: str, reference: str) -> float:
    candidate_words = Counter(_WORD.findall(candidate.lower()))
    reference_words = Counter(_WORD.findall(reference.lower()))
    overlap = sum((candidate_words & reference_words).values())
    if overlap == 0:
        return 0.0
    precision = overlap / sum(candidate_words.values())
    recall = overlap / sum(reference_words.values())
    return 2 * precision * recall / (precision + recall)


def tldr_unigram_f1_reward(completions, completion, **kwargs) -> list[float]:
    """
    Unigram F1 (ROUGE-1 F, lower-cased words) between each generated summary and the reference summary in the
    dataset's ``completion`` column (``trl-lib/tldr``). In ``[0, 1]``; rambling and empty summaries both score low.
    """
    return [
        _unigram_f1(_completion_text(generated), _completion_text(reference))
        for generated, reference in zip(completions, completion, strict=True)
    ]
