"""What every format reader shares: the reading options and the drop counter."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from alignpipe.data.errors import DataError
from alignpipe.data.formats.pairing import PairStrategy

log = logging.getLogger("alignpipe.data.formats")

Kind = Literal["sft", "prompts", "preferences", "unpaired"]
OnInvalid = Literal["error", "drop"]
_MAX_LOGGED_DROPS = 5


@dataclass(frozen=True)
class FormatOptions:
    """How to read a source (``data.<part>`` in params.yaml).

    ``format``: a name of :data:`FORMATS` or ``"auto"``; ``lang``: OpenAssistant language codes
    to keep (None: all); ``pairs``: how ranked or rated answers become pairs; ``rating``: which
    score ranks rated completions (``auto``, ``overall``, ``mean`` or an aspect name).
    """

    format: str = "auto"
    lang: tuple[str, ...] | None = None
    pairs: PairStrategy = "best_vs_worst"
    rating: str = "auto"


class Drops:
    """Counts what a source loses, by reason; raises on an invalid row unless ``on_invalid="drop"``."""

    def __init__(self, on_invalid: OnInvalid) -> None:
        self.on_invalid = on_invalid
        self.counts: Counter[str] = Counter()

    def invalid(self, exc: DataError) -> None:
        """A bad row: raise it (``error``) or count it under its reason (``drop``)."""
        if self.on_invalid == "error":
            raise exc
        self.counts[exc.reason] += 1
        if sum(self.counts.values()) <= _MAX_LOGGED_DROPS:
            log.warning("dropped invalid row: %s", exc)

    def skip(self, reason: str, n: int = 1) -> None:
        """Data the format itself says to leave out (a deleted message, a tie): always counted."""
        if n:
            self.counts[reason] += n
