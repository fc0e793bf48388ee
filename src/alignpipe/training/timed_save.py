"""Resume points by time: a checkpoint every ``save_minutes`` of training as well as every ``save_steps``.

Long GPU runs want a resume point every so many minutes whatever a step costs; the embedded default
(``save_minutes: 1``) gets one in a two-minute ``sft`` or ``dpo`` on a CPU, whose 40 and 30 steps
never reach ``save_steps: 50``. The clock starts when training (re)starts and restarts at each save.
Under several processes the main process's clock decides for all of them (a checkpoint is a
collective: every process writes its shard), so they always agree.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

clock = time.monotonic  # seconds; tests replace it with a clock they drive


def agreed(flag: bool) -> bool:
    """``flag`` of process 0, on every process (itself when there is one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [flag]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])
    return flag


class SaveTimer:
    """``due()``: ``minutes`` have passed since the start or the last ``restart()`` (never if None)."""

    def __init__(self, minutes: float | None) -> None:
        self.seconds = None if minutes is None else 60.0 * minutes
        self.last = clock()

    def restart(self) -> None:
        self.last = clock()

    def due(self) -> bool:
        if self.seconds is None:
            return False
        return agreed(clock() - self.last >= self.seconds)


class TimedSave(TrainerCallback):
    """transformers' Trainer (sft): ``control.should_save`` once ``minutes`` have passed since the
    last checkpoint (not at the last step, which the Trainer saves anyway)."""

    def __init__(self, minutes: float | None) -> None:
        self.timer = SaveTimer(minutes)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.timer.restart()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step < state.max_steps and self.timer.due():
            control.should_save = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.timer.restart()
