"""
Rewards used by the shipped recipes, in TRL's reward-function shape: ``f(completions, <column>, **kwargs) -> floats``.

`key_lookup_reward` scores the builtin key-lookup task (``recipes/tiny-cpu.yaml``); `tldr_unigram_f1_reward` scores
summaries of ``trl-lib/tldr`` against the dataset's reference summary (the GPU recipes).

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

from .task import VALUE_WORDS


def _completion_text(completion) -> str:
    # Plain-text datasets give strings; conversational ones give [{"role": "assistant", "content": ...}].
    if isinstance(completion, list):
        return " ".join(message.get("content", "") for message in completion if isinstance(message, dict))
    return str(completion)


def key_lookup_reward(completions, answer, **kwargs) -> list[float]:
    """Score each completion against the value word hidden in its prompt (column ``answer``)."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        words = _completion_text(completion).split()
        if words == [expected]:
            rewards.append(1.0)
        elif words and words[0] == expected:
            rewards.append(0.6)
        elif words and words[0] in VALUE_WORDS:
            rewards.append(0.2)
        else:
            rewards.append(0.0)
    return rewards


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
