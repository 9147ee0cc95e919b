"""`PrefixGroupedGRPOConfig`: TRL's `GRPOConfig` plus the switches of the shared-prefix forward."""

from dataclasses import dataclass, field

from trl import GRPOConfig


@dataclass
class PrefixGroupedGRPOConfig(GRPOConfig):
    """
    Configuration for [`PrefixGroupedGRPOTrainer`]. Every field of TRL's `GRPOConfig` keeps its meaning; the fields
    below are added. A plain `GRPOConfig` given to the trainer behaves as this class with its defaults.
    """

    prefix_grouping: bool = field(
        default=True,
        metadata={
            "help": "Encode each shared prompt once per micro-batch (Prefix Grouper). With False the trainer is "
            "exactly TRL's GRPOTrainer."
        },
    )
    prefix_grouping_shuffle_groups: bool = field(
        default=True,
        metadata={
            "help": "Shuffle the generation batch by whole groups instead of by rows, so that each micro-batch "
            "keeps the completions of a prompt together. Consumes the random stream exactly as TRL's row shuffle."
        },
    )

    def __post_init__(self):
        # Before TRL's own checks, whose message for this case does not name the key.
        if self.num_generations is not None and self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations}: GRPO needs at least 2 completions per prompt to compute "
                "advantages. Set num_generations to 2 or more."
            )
        super().__post_init__()
        if self.prefix_grouping_shuffle_groups and not self.prefix_grouping:
            # Shuffling by groups only matters for sharing; with grouping off we keep TRL's behaviour bit for bit.
            self.prefix_grouping_shuffle_groups = False
