"""Early stopping on the eval pairs: stop when their loss or reward accuracy stops improving.

The state (best value, its step, evaluations without improvement) is a function of the eval points
logged so far, so a resumed run rebuilds it from the checkpoint's log history and stops where an
uninterrupted run stops.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from alignpipe.params import EarlyStopping
from alignpipe.training.metrics import Point

WATCHED = {"loss": ("eval/loss", -1.0), "accuracy": ("eval/rewards/accuracies", 1.0)}  # name, sign


@dataclass
class EarlyStopper:
    """``update(step, eval metrics)`` is True when the run should stop at ``step``."""

    settings: EarlyStopping
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_at: int | None = None

    @classmethod
    def from_history(cls, settings: EarlyStopping, history: Iterable[Point]) -> EarlyStopper:
        stopper = cls(settings)
        for step, metrics in history:
            stopper.update(step, metrics)
        return stopper

    def update(self, step: int, metrics: Mapping[str, float]) -> bool:
        if self.settings.metric == "off":
            return False
        key, sign = WATCHED[self.settings.metric]
        if key not in metrics:
            return False
        value = sign * metrics[key]  # higher is better
        if self.best is None or value > self.best + self.settings.min_delta:
            self.best, self.best_step, self.bad_evals = value, step, 0
            return False
        self.bad_evals += 1
        if self.bad_evals >= self.settings.patience:
            self.stopped_at = step
            return True
        return False

    def summary(self) -> dict[str, Any]:
        if self.settings.metric == "off":
            return {"metric": "off"}
        key, sign = WATCHED[self.settings.metric]
        best = None if self.best is None else sign * self.best
        return {"metric": key, "best": best, "best_step": self.best_step, "stopped_at": self.stopped_at}
