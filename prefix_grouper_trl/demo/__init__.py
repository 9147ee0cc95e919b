"""
The embedded demos, all offline: a synthetic long-prompt task with a word-level tokenizer and a tiny Qwen2
(`recipes/tiny-cpu.yaml`), and a synthetic image task with an offline processor and a tiny Qwen2.5-VL
(`recipes/tiny-vlm-cpu.yaml`), built from shipped configs. Both train in a few minutes on a laptop CPU.
"""

from .builtin import (
    BUILTIN_PREFIX,
    is_builtin,
    load_builtin_dataset,
    load_builtin_processing_class,
    materialize_builtin_model,
)
from .colour_task import ColourTask, make_colour_dataset
from .rewards import colour_reward, key_lookup_reward
from .task import KeyLookupTask, make_key_lookup_dataset
from .tokenizer import build_key_lookup_tokenizer
from .vision_processor import ImageOnlyQwenVLProcessor, build_colour_processor, load_colour_processor

__all__ = [
    "BUILTIN_PREFIX",
    "ColourTask",
    "ImageOnlyQwenVLProcessor",
    "KeyLookupTask",
    "build_colour_processor",
    "build_key_lookup_tokenizer",
    "colour_reward",
    "is_builtin",
    "key_lookup_reward",
    "load_builtin_dataset",
    "load_builtin_processing_class",
    "load_colour_processor",
    "make_colour_dataset",
    "make_key_lookup_dataset",
    "materialize_builtin_model",
]
