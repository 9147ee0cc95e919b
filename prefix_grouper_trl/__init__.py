"""Prefix Grouper for TRL: a drop-in `GRPOTrainer` that encodes each group's shared prompt once."""

__version__ = "0.1.0"

from .config import PrefixGroupedGRPOConfig
from .integration import register_prefix_grouped_attention
from .layout import GroupLayout, build_group_layout
from .trainer import PrefixGroupedGRPOTrainer

__all__ = [
    "GroupLayout",
    "PrefixGroupedGRPOConfig",
    "PrefixGroupedGRPOTrainer",
    "build_group_layout",
    "register_prefix_grouped_attention",
]
