"""
The embedded demo: a synthetic long-prompt task, its reward, a word-level tokenizer and a tiny Qwen2 built from a
shipped config, all offline. `recipes/tiny-cpu.yaml` trains on it in a few minutes on a laptop CPU.
"""

from .builtin import BUILTIN_PREFIX, is_builtin, load_builtin_dataset, materialize_builtin_model
from .rewards import key_lookup_reward
from .task import KeyLookupTask, make_key_lookup_dataset
from .tokenizer import build_key_lookup_tokenizer

__all__ = [
    "BUILTIN_PREFIX",
    "KeyLookupTask",
    "build_key_lookup_tokenizer",
    "is_builtin",
    "key_lookup_reward",
    "load_builtin_dataset",
    "make_key_lookup_dataset",
    "materialize_builtin_model",
]
