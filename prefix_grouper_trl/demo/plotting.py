"""
The end-of-run picture: mean reward per step, and the share of prompt tokens that Prefix Grouper did not recompute.

Reads TRL's ``trainer.state.log_history`` (a list of dicts, one per logging step), so it works on any run of the CLI,
and on a ``log_history.json`` written by an earlier run.
"""

from pathlib import Path

REWARD_KEY = "reward"
SAVED_KEY = "prefix_grouper/tokens_saved_frac"
GROUP_SIZE_KEY = "prefix_grouper/mean_group_size"


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for entry in history:
        if key in entry and "step" in entry:
            steps.append(int(entry["step"]))
            values.append(float(entry[key]))
    return steps, values


def summarize_rewards(history: list[dict], fraction: float = 0.2) -> dict | None:
    """
    Mean reward over the first and the last ``fraction`` of logged steps:
    ``{"reward_first": float, "reward_last": float, "reward_steps": int}``, or None without reward logs.
    """
    _, rewards = _series(history, REWARD_KEY)
    if not rewards:
        return None
    window = max(1, int(len(rewards) * fraction))
    return {
        "reward_first": sum(rewards[:window]) / window,
        "reward_last": sum(rewards[-window:]) / window,
        "reward_steps": len(rewards),
    }


def plot_training_curves(history: list[dict], path: str | Path) -> Path:
    """Draw reward (top) and prompt-sharing savings (bottom) against the training step; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    figure, (reward_axis, saved_axis) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)

    steps, rewards = _series(history, REWARD_KEY)
    reward_axis.plot(steps, rewards, color="tab:blue", alpha=0.35, label="mean reward per step")
    if len(rewards) >= 5:
        width = max(2, len(rewards) // 20)
        smooth = [
            sum(rewards[max(0, i - width + 1) : i + 1]) / len(rewards[max(0, i - width + 1) : i + 1])
            for i in range(len(rewards))
        ]
        reward_axis.plot(steps, smooth, color="tab:blue", label=f"moving mean ({width} steps)")
    reward_axis.set_ylabel("reward")
    reward_axis.set_title("GRPO with Prefix Grouper")
    reward_axis.grid(alpha=0.3)
    reward_axis.legend(loc="lower right")

    steps_saved, saved = _series(history, SAVED_KEY)
    if saved:
        saved_axis.plot(steps_saved, [100 * value for value in saved], color="tab:green", label="prompt tokens shared")
        saved_axis.set_ylim(0, 100)
        saved_axis.legend(loc="lower right")
    else:
        saved_axis.text(0.5, 0.5, f"no '{SAVED_KEY}' logged", ha="center", va="center", transform=saved_axis.transAxes)
    saved_axis.set_ylabel("tokens not recomputed (%)")
    saved_axis.set_xlabel("step")
    saved_axis.grid(alpha=0.3)

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
