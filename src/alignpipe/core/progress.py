"""Progress of a long loop: the one-line closing summary (items, seconds, throughput)."""

from __future__ import annotations

import time
from typing import Any


class Timer:
    """Times a loop and prints its one-line summary: items, seconds, throughput."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def summary(self, items: int, unit: str, **extra: Any) -> str:
        secs = self.seconds
        rate = items / secs if secs > 0 else float("inf")
        tail = "".join(f", {k}={v}" for k, v in extra.items())
        line = f"{self.what}: {items} {unit} in {secs:.1f} s ({rate:.2f} {unit}/s{tail})"
        print(line, flush=True)
        return line
