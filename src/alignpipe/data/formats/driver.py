"""The convert driver: read a source, pick its format's reader, give every row an id, count drops.

A format reader turns records into rows of one kind (``sft``: prompt + completion,
``prompts``: prompt, ``preferences``: prompt + chosen + rejected). Most formats are read record
by record; OpenAssistant's flat messages and HelpSteer's one-response rows are grouped first,
so their readers also have a ``finish`` step that runs after the last record.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

from alignpipe.data.errors import DataError, Where
from alignpipe.data.formats.detect import FORMATS, detect
from alignpipe.data.formats.messages import Row
from alignpipe.data.readers import location_unit, read_source

log = logging.getLogger(__name__)

Kind = Literal["sft", "prompts", "preferences"]
OnInvalid = Literal["error", "drop"]
PairStrategy = Literal["best_vs_worst", "all_pairs"]
# The id column of each kind's artifact (alignpipe.schema) and its id prefix.
ID_COLUMNS = {"sft": ("id", "sft"), "prompts": ("prompt_id", "prompt"), "preferences": ("pair_id", "pair")}
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


class Reader(Protocol):
    """Turns the records of one source into rows; errors name the record (``where``)."""

    def feed(self, record: Mapping[str, Any], where: Where) -> list[Row]: ...

    def finish(self) -> Iterable[Row]: ...


class RecordReader:
    """A reader for formats whose every record stands alone: ``rows(record) -> list of rows``."""

    def __init__(self, rows: Callable[[Mapping[str, Any]], list[Row]]) -> None:
        self.rows = rows

    def feed(self, record: Mapping[str, Any], where: Where) -> list[Row]:
        try:
            return self.rows(record)
        except DataError as exc:
            raise exc.at(where) from None

    def finish(self) -> Iterable[Row]:
        return ()


def make_reader(fmt: str, kind: Kind, options: FormatOptions, drops: Drops) -> Reader:
    """The reader of format ``fmt`` for ``kind`` rows."""
    from alignpipe.data.formats import llamafactory, oasst, rated, sharegpt, trl

    if fmt == "trl":
        return RecordReader(lambda record: trl.trl_rows(record, kind))
    if fmt == "hh":
        return RecordReader(lambda record: trl.hh_rows(record, kind))
    if fmt == "sharegpt":
        return RecordReader(lambda record: sharegpt.sharegpt_rows(record, kind))
    if fmt == "llamafactory":
        return RecordReader(lambda record: llamafactory.llamafactory_rows(record, kind))
    if fmt == "oasst":
        return oasst.OasstReader(kind, options, drops)
    if fmt in ("ultrafeedback", "helpsteer"):
        return rated.RatedReader(fmt, kind, options, drops)
    raise DataError(
        f"unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS)}", reason="bad_format"
    )


def _digest(row: Mapping[str, Any]) -> str:
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()


def row_id(kind: Kind, row: Mapping[str, Any]) -> str:
    """``<prefix>-<12 hex>``: sha1 of the row's canonical JSON, so reordering rows keeps ids."""
    return f"{ID_COLUMNS[kind][1]}-{_digest(row)[:12]}"


class Converted(NamedTuple):
    """What :func:`convert_source` read: the rows, what was dropped (by reason) and the format."""

    rows: list[dict[str, Any]]
    dropped: Counter[str]
    format: str


def _records(source: str, base_dir: Path | None) -> Iterator[tuple[Where, dict[str, Any]]]:
    unit = location_unit(source)
    for index, record in read_source(source, base_dir):
        yield Where(source, index, unit), record


def convert_source(
    source: str,
    kind: Kind,
    on_invalid: OnInvalid = "error",
    base_dir: Path | None = None,
    options: FormatOptions | None = None,
    part: str | None = None,
) -> Converted:
    """Read ``source`` and convert every record to ``kind`` rows of its artifact schema.

    The format is ``options.format``, or detected from the first record (``auto``); an
    ambiguous record raises, asking for ``data.<part>.format``. Rows get a content-hash id
    (``id``/``prompt_id``/``pair_id``, see :data:`ID_COLUMNS`) and, for sft/prompts,
    ``meta=None``. Repeated rows keep the first and count as dropped ``"duplicate"``. With
    ``on_invalid="drop"`` invalid rows are skipped and counted by reason (the first few are
    logged); with ``"error"`` the first raises. Reader errors (missing file, malformed JSON
    line, bad encoding) always raise, and so does a source that yields no valid row at all.
    """
    if kind not in ID_COLUMNS or on_invalid not in ("error", "drop"):
        raise ValueError(f"kind must be one of {sorted(ID_COLUMNS)}, on_invalid 'error' or 'drop'")
    options = options or FormatOptions()
    drops = Drops(on_invalid)
    records = _records(source, base_dir)
    first = next(records, None)
    fmt = options.format
    if fmt == "auto":
        fmt = detect(first[1], first[0], part) if first is not None else "trl"
    try:
        reader = make_reader(fmt, kind, options, drops)
    except DataError as exc:  # a setting the source cannot have: name the source
        raise DataError(exc.message, file=source, reason=exc.reason) from None
    collected = _Collector(kind, source)
    for where, record in itertools.chain([first] if first is not None else [], records):
        try:
            rows = reader.feed(record, where)
        except DataError as exc:
            drops.invalid(exc)
            continue
        collected.add(rows)
    collected.add(reader.finish())
    dropped = drops.counts + collected.duplicates
    if not collected.rows:
        detail = f" (dropped: {dict(dropped)})" if dropped else ""
        raise DataError(f"no valid {kind} rows{detail}", file=source, reason="empty")
    return Converted(collected.rows, dropped, fmt)


def convert(
    source: str,
    kind: Kind,
    on_invalid: OnInvalid = "error",
    base_dir: Path | None = None,
    options: FormatOptions | None = None,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """``(rows, dropped)`` of :func:`convert_source`."""
    converted = convert_source(source, kind, on_invalid, base_dir, options)
    return converted.rows, converted.dropped


class _Collector:
    """Rows with ids, first of each content kept; a (48-bit) id collision is an error."""

    def __init__(self, kind: Kind, source: str) -> None:
        self.kind, self.source = kind, source
        self.rows: list[dict[str, Any]] = []
        self.duplicates: Counter[str] = Counter()
        self.seen: dict[str, str] = {}  # id -> full digest

    def add(self, rows: Iterable[Row]) -> None:
        id_column = ID_COLUMNS[self.kind][0]
        for row in rows:
            rid, digest = row_id(self.kind, row), _digest(row)
            if self.seen.get(rid) == digest:
                self.duplicates["duplicate"] += 1
                continue
            if rid in self.seen:
                raise DataError(f"id collision on {rid}; please report this", file=self.source)
            self.seen[rid] = digest
            extra = {} if self.kind == "preferences" else {"meta": None}
            self.rows.append({id_column: rid, **row, **extra})
