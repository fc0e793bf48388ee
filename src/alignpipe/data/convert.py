"""Read a data source in any accepted format into rows of one kind, with ids and counted drops.

A format reader turns records into rows of one kind (``sft``: prompt + completion,
``prompts``: prompt, ``preferences``: prompt + chosen + rejected). Most formats are read record
by record; OpenAssistant's flat messages and HelpSteer's one-response rows are grouped first,
so their readers also have a ``finish`` step that runs after the last record. The formats
live in :mod:`alignpipe.data.formats` (one module each); this module is their public door.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from alignpipe.data.errors import DataError, Where
from alignpipe.data.formats.base import Drops, FormatOptions, Kind, OnInvalid
from alignpipe.data.formats.detect import FORMATS, detect
from alignpipe.data.formats.images import with_images
from alignpipe.data.formats.llamafactory import llamafactory_rows
from alignpipe.data.formats.messages import Row, extract_prompt
from alignpipe.data.formats.oasst import OasstReader
from alignpipe.data.formats.rated import RATED_FORMATS, RatedReader, ScoredCompletion
from alignpipe.data.formats.sharegpt import sharegpt_rows
from alignpipe.data.formats.trl import (
    hh_rows,
    hh_to_messages,
    to_preference_row,
    to_prompt_row,
    to_sft_row,
    to_unpaired_row,
    trl_rows,
)
from alignpipe.data.readers import location_unit, read_source

__all__ = [
    "FORMATS",
    "ID_COLUMNS",
    "Converted",
    "Drops",
    "FormatOptions",
    "Kind",
    "Scored",
    "ScoredCompletion",
    "convert",
    "convert_source",
    "detect",
    "extract_prompt",
    "hh_to_messages",
    "row_id",
    "scored_completions",
    "to_preference_row",
    "to_prompt_row",
    "to_sft_row",
    "to_unpaired_row",
]
# The id column of each kind's artifact (alignpipe.artifacts.schema) and its id prefix.
ID_COLUMNS = {
    "sft": ("id", "sft"),
    "prompts": ("prompt_id", "prompt"),
    "preferences": ("pair_id", "pair"),
    "unpaired": ("example_id", "unpaired"),
}
UNPAIRED_FORMATS = ("trl", "hh")  # the formats whose records carry one completion and its label


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


def make_reader(
    fmt: str, kind: Kind, options: FormatOptions, drops: Drops, image_dir: Path | None = None
) -> Reader:
    """The reader of format ``fmt`` for ``kind`` rows; TRL records' images are read from ``image_dir``
    (the data file's folder) when relative (:mod:`alignpipe.data.formats.images`)."""
    if kind == "unpaired" and fmt not in UNPAIRED_FORMATS:
        raise DataError(
            f"format {fmt!r} has no unpaired (labelled) rows; unpaired feedback is read as trl "
            "(prompt + completion + label, or messages + label) or hh",
            reason="bad_format",
        )
    if fmt == "trl":
        return RecordReader(with_images(lambda record: trl_rows(record, kind), image_dir))
    if fmt == "hh":
        return RecordReader(lambda record: hh_rows(record, kind))
    if fmt == "sharegpt":
        return RecordReader(lambda record: sharegpt_rows(record, kind))
    if fmt == "llamafactory":
        return RecordReader(lambda record: llamafactory_rows(record, kind))
    if fmt == "oasst":
        return OasstReader(kind, options, drops)
    if fmt in RATED_FORMATS:
        return RatedReader(fmt, kind, options, drops)
    raise DataError(
        f"unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS)}", reason="bad_format"
    )


def _bytes_digest(value: Any) -> str:
    """An image's bytes in a row's canonical JSON: their sha256 (text rows have none)."""
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _digest(row: Mapping[str, Any]) -> str:
    canonical = json.dumps(
        row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_bytes_digest
    )
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


def _read(
    source: str,
    base_dir: Path | None,
    fmt: str,
    part: str | None,
    reader_for: Callable[[str], Reader],
    drops: Drops,
) -> tuple[str, Iterator[Any]]:
    """(format, everything its reader makes of the records); bad records go to ``drops``.

    ``fmt="auto"`` detects the format from the first record (``trl`` for an empty source).
    """
    records = _records(source, base_dir)
    first = next(records, None)
    if fmt == "auto":
        fmt = detect(first[1], first[0], part) if first is not None else "trl"
    try:
        reader = reader_for(fmt)
    except DataError as exc:  # a setting the source cannot have: name the source
        raise DataError(exc.message, file=source, reason=exc.reason) from None

    def produce() -> Iterator[Any]:
        for where, record in itertools.chain([first] if first is not None else [], records):
            try:
                batch = reader.feed(record, where)
            except DataError as exc:
                drops.invalid(exc)
                continue
            yield from batch
        yield from reader.finish()

    return fmt, produce()


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
    image_dir = (
        None if source.startswith("hf:") else (Path(base_dir or ".") / Path(source).expanduser()).parent
    )
    fmt, rows = _read(
        source,
        base_dir,
        options.format,
        part,
        lambda f: make_reader(f, kind, options, drops, image_dir),
        drops,
    )
    collected = _Collector(kind, source)
    collected.add(rows)
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
            extra = {"meta": None} if self.kind in ("sft", "prompts") else {}
            self.rows.append({id_column: rid, **row, **extra})


class Scored(NamedTuple):
    """What :func:`scored_completions` read: every rated completion, what was dropped, the format."""

    items: list[ScoredCompletion]
    dropped: Counter[str]
    format: str


def scored_completions(
    source: str,
    options: FormatOptions | None = None,
    on_invalid: OnInvalid = "error",
    base_dir: Path | None = None,
) -> Scored:
    """Every rated completion of an UltraFeedback or HelpSteer source, with its reward by the rule.

    This is the N-completions-per-prompt view (``scored.parquet``-shaped: prompt, completion,
    reward, details), for importing ratings instead of running a reward model.
    """
    options = options or FormatOptions()
    drops = Drops(on_invalid)

    def reader_for(fmt: str) -> Reader:
        if fmt not in RATED_FORMATS:
            raise DataError(
                f"format {fmt!r} has no ratings (expected ultrafeedback or helpsteer)", reason="bad_format"
            )
        return RatedReader(fmt, "scored", options, drops)

    fmt, items = _read(source, base_dir, options.format, None, reader_for, drops)
    return Scored(list(items), drops.counts, fmt)
