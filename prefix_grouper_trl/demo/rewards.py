"""
Reward for the key-lookup task, in TRL's reward-function shape: ``f(completions, answer, **kwargs) -> list[float]``.

Partial credit gives a random-init policy a gradient before it ever finds the value: answering with any value word
already earns something, and only the exact one-word answer earns full reward.

| completion (words)         | reward |
| -------------------------- | ------ |
| exactly ``[answer]``       | 1.0    |
| ``[answer, ...]``          | 0.6    |
| ``[other value word, ...]``| 0.2    |
| anything else / empty      | 0.0    |
"""

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
