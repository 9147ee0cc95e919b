"""
The command line's progress display: one bar for the whole run, with what a person watching GRPO wants to see.

transformers prints every logged dict (30-odd metrics) on a line of its own, once per logging step; with
``logging_steps: 1`` that is one dict per step. The metrics still go to the log history, wandb and the run's plot; on
the terminal the CLI shows instead::

    GRPO  62%|██████▏   | 186/300 [00:44<00:26, 4.3 step/s, reward=0.81, step=0.23s, prompt saved=86%]

``disable_tqdm: true`` keeps transformers' own behaviour (no bar, the dicts printed).
"""

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

STEP_TIME_KEY = "step_time"
SAVED_KEY = "prefix_grouper/tokens_saved_frac"


class RewardProgressBar(TrainerCallback):
    """A tqdm bar over the training steps whose postfix holds the latest reward, step time and prompt tokens saved."""

    def __init__(self):
        self.bar = None
        self.postfix = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="GRPO", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "reward" in logs:
            self.postfix["reward"] = f"{logs['reward']:.3g}"
        if STEP_TIME_KEY in logs:
            self.postfix["step"] = f"{logs[STEP_TIME_KEY]:.2g}s"
        if SAVED_KEY in logs:
            self.postfix["prompt saved"] = f"{100 * logs[SAVED_KEY]:.0f}%"
        if self.postfix:
            self.bar.set_postfix(self.postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_reward_progress_bar(trainer) -> None:
    """Replace transformers' per-log printing with `RewardProgressBar`, unless the run disabled tqdm."""
    if trainer.args.disable_tqdm:
        return
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(RewardProgressBar())
