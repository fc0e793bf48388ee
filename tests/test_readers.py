"""Readers: every local format, the hf: spec, and every way a source can be bad."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignpipe.data import readers
from alignpipe.data.errors import DataError, Where
from alignpipe.data.readers import HfSource, is_builtin, location_unit, parse_hf_source, read_source

ROWS = [
    {"prompt": "What is 2+2?", "completion": "4"},
    {"prompt": "Name a colour.", "completion": "Blue"},
]


def _write(path: Path, data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return str(path)


def test_jsonl_yields_line_numbers_and_skips_blank_lines(tmp_path: Path) -> None:
    text = json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\r\n"
    source = _write(tmp_path / "train.jsonl", "\ufeff" + text)  # a BOM and CRLF are tolerated
    assert list(read_source(source)) == [(1, ROWS[0]), (3, ROWS[1])]
    assert location_unit(source) == "line"


@pytest.mark.parametrize(
    "payload",
    [
        ROWS,
        {"data": ROWS},
        {"prompt": [r["prompt"] for r in ROWS], "completion": [r["completion"] for r in ROWS]},
    ],
    ids=["list", "data-wrapper", "columns"],
)
def test_json_forms(tmp_path: Path, payload: object) -> None:
    source = _write(tmp_path / "train.json", json.dumps(payload))
    assert list(read_source(source)) == [(0, ROWS[0]), (1, ROWS[1])]
    assert location_unit(source) == "row"


def test_parquet_with_message_lists_and_nulls(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    table = pa.Table.from_pylist([{"messages": messages, "note": None}, {"messages": messages, "note": "x"}])
    path = tmp_path / "train.parquet"
    pq.write_table(table, path)
    rows = list(read_source(str(path)))
    assert rows[0] == (0, {"messages": messages, "note": None})
    assert rows[1][0] == 1 and rows[1][1]["note"] == "x"


def test_csv_reports_the_line_where_a_record_starts(tmp_path: Path) -> None:
    text = 'prompt,completion\n"multi\nline",a\nsecond,b\n\nthird,c\n'
    rows = list(read_source(_write(tmp_path / "train.csv", text)))
    assert rows == [
        (2, {"prompt": "multi\nline", "completion": "a"}),
        (4, {"prompt": "second", "completion": "b"}),
        (6, {"prompt": "third", "completion": "c"}),
    ]


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    _write(tmp_path / "data" / "p.jsonl", json.dumps(ROWS[0]))
    assert list(read_source("data/p.jsonl", base_dir=tmp_path)) == [(1, ROWS[0])]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("hf:Anthropic/hh-rlhf@train", HfSource("Anthropic/hh-rlhf", None, "train")),
        ("hf:openai/gsm8k:main@test[:100]", HfSource("openai/gsm8k", "main", "test[:100]")),
        ("hf:imdb@train[10%:20%]", HfSource("imdb", None, "train[10%:20%]")),
    ],
)
def test_parse_hf_source(source: str, expected: HfSource) -> None:
    assert parse_hf_source(source) == expected


@pytest.mark.parametrize("source", ["hf:imdb", "hf:@train", "hf:imdb:@train", "hf:imdb@", "hf:"])
def test_parse_hf_source_rejects_malformed_specs(source: str) -> None:
    with pytest.raises(DataError, match=r"hf:<name>\[:<config>\]@<split>") as info:
        parse_hf_source(source)
    assert info.value.file == source


def test_hf_load_failure_is_a_clear_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'x/y' on the Hub\n(long traceback text)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        list(read_source("hf:x/y@train"))
    message = str(info.value)
    assert (
        message.startswith("hf:x/y@train: cannot load 'x/y'") and "local" in message and "\n" not in message
    )


def test_hf_rows_are_yielded_with_row_indices(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(name: str, config: str | None, split: str) -> list[dict]:
        calls.append((name, config, split))
        return ROWS

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert list(read_source("hf:x/y:cfg@test")) == [(0, ROWS[0]), (1, ROWS[1])]
    assert calls == [("x/y", "cfg", "test")]


def test_builtin_sources_are_not_read() -> None:
    assert is_builtin("builtin:ifeval") and not is_builtin("data/builtin.jsonl")
    with pytest.raises(DataError, match="is_builtin"):
        read_source("builtin:ifeval")


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("foo:bar", None, "unknown scheme 'foo'"),
        ("s3://bucket/x.jsonl", None, "unknown scheme 's3'"),
        ("train.txt", "hello", "unsupported file (extension '.txt')"),
        ("train", "hello", "unsupported file (no extension)"),
        ("missing.jsonl", None, "file not found"),
    ],
)
def test_bad_sources_name_the_source_and_the_accepted_forms(
    tmp_path: Path, name: str, content: str | None, fragment: str
) -> None:
    if content is not None:
        _write(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        read_source(name, base_dir=tmp_path)
    assert str(info.value).startswith(f"{name}: ") and fragment in str(info.value)
    if "file not found" not in fragment:
        assert ".jsonl, .json, .parquet or .csv" in str(info.value) and "hf:<name>" in str(info.value)


def test_a_folder_is_not_a_source(tmp_path: Path) -> None:
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match="not a file"):
        read_source(str(tmp_path / "dir.jsonl"))


@pytest.mark.parametrize(
    ("name", "data", "location", "fragment"),
    [
        ("t.jsonl", b'{"prompt": "a"}\n{"prompt": "b",}\n', "line 2", "malformed JSON"),
        (
            "t.jsonl",
            b'{"prompt": "a"}\n["not", "an", "object"]\n',
            "line 2",
            "expected a JSON object, got list",
        ),
        (
            "t.jsonl",
            b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n',
            "line 2",
            "not valid UTF-8 (byte 0xe9 at byte 15",
        ),
        ("t.json", b'[\n  {"prompt": "a"},\n  {"prompt": }\n]', "line 3", "malformed JSON"),
        (
            "t.json",
            b'[{"prompt": "a"},\n{"prompt": "\xff"}]',
            "line 2",
            "not valid UTF-8 (byte 0xff at byte 12",
        ),
        ("t.json", b'[{"prompt": "a"}, 3]', "row 1 (0-based)", "expected an object, got int"),
        ("t.json", b'"just a string"', None, "expected a list of objects or a dict of columns, got string"),
        ("t.json", b'{"prompt": ["a", "b"], "completion": ["c"]}', None, "columns have different lengths"),
        ("t.csv", b"prompt,completion\na,b\nc,d,e\n", "line 3", "3 fields, but the header has 2"),
        ("t.csv", b"prompt,completion\na,\xc3\n", "line 2", "not valid UTF-8"),
        ("t.csv", b"", "line 1", "empty CSV file"),
        ("t.csv", b"prompt,prompt\na,b\n", "line 1", "duplicate column(s) ['prompt']"),
        ("t.parquet", b"PAR1 this is not parquet", None, "not a readable parquet file"),
    ],
)
def test_bad_content_names_file_and_location(
    tmp_path: Path, name: str, data: bytes, location: str | None, fragment: str
) -> None:
    source = _write(tmp_path / name, data)
    with pytest.raises(DataError) as info:
        list(read_source(source))
    message = str(info.value)
    prefix = f"{source}: {location}: " if location else f"{source}: "
    assert message.startswith(prefix), message
    assert fragment in message and "\n" not in message


def test_data_error_format_and_pickling() -> None:
    error = DataError("expected a string, got int", field="chosen", reason="wrong_type")
    assert str(error) == "field 'chosen': expected a string, got int"
    located = error.at(Where("data/train.jsonl", 7, "line"))
    assert str(located) == "data/train.jsonl: line 7: field 'chosen': expected a string, got int"
    assert isinstance(located, ValueError) and located.reason == "wrong_type"
    clone = pickle.loads(pickle.dumps(located))
    assert str(clone) == str(located) and (clone.file, clone.row, clone.field) == (
        "data/train.jsonl",
        7,
        "chosen",
    )


def test_accepted_forms_are_listed_once() -> None:
    assert "builtin:<task>" in readers.ACCEPTED
