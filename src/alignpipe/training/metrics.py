"""The one DVCLive wrapper of both training stages, with one resume rule.

Resume: a checkpoint carries the points logged up to it (``history``); a resumed run starts the
curves afresh and replays them, so the plots cover the whole run whether DVC deleted the old
curves (it does, they are not ``persist`` outs) or a kill left them cut mid-line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

Point = tuple[int, dict[str, float]]  # (optimizer step, {metric name: value})


class MetricsLog:
    """DVCLive on the main process (a no-op elsewhere): ``log(step, metrics)`` writes one point each."""

    def __init__(self, metrics_dir: Path, enabled: bool, history: Iterable[Point] = ()) -> None:
        self.history: list[Point] = []
        self.live: Any = None
        if enabled:
            from dvclive import Live

            self.live = Live(dir=str(metrics_dir), resume=False, save_dvc_exp=False, dvcyaml=None)
        for step, metrics in history:
            self.log(step, metrics)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        point = {name: float(value) for name, value in metrics.items()}
        self.history.append((step, point))
        if self.live is None:
            return
        self.live.step = step
        for name, value in point.items():
            self.live.log_metric(name, value)
        self.live.make_summary()

    def close(self, summary: Mapping[str, Any] | None = None) -> None:
        if self.live is None:
            return
        self.live.summary.update(summary or {})
        self.live.make_summary()
