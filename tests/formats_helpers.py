"""Helpers of the tests/test_formats_*.py files: the fixture folder and message builders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from alignpipe.data.convert import FormatOptions, convert_source
from alignpipe.data.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def fixture(name: str) -> str:
    return str(FIXTURES / name)


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def asst(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def strip_ids(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without their id and meta columns (ids are content hashes, tested in test_formats.py)."""
    return [
        {k: v for k, v in row.items() if k not in ("id", "prompt_id", "pair_id", "example_id", "meta")}
        for row in rows
    ]


def read(source: str, kind: str, on_invalid: str = "drop", **options: Any) -> tuple[list[dict], dict, str]:
    """(rows without ids, dropped counts, format) of ``source``."""
    converted = convert_source(source, kind, on_invalid, options=FormatOptions(**options))  # type: ignore[arg-type]
    return strip_ids(converted.rows), dict(converted.dropped), converted.format


def first_error(source: str, kind: str, **options: Any) -> str:
    """The one-line message of the first bad row (``on_invalid: error``)."""
    with pytest.raises(DataError) as info:
        convert_source(source, kind, "error", options=FormatOptions(**options))  # type: ignore[arg-type]
    return str(info.value)


def jsonl(path: Path, records: list[Any]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)
