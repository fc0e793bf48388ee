"""Formats: every accepted format to conversational rows, implicit prompts, bad rows, the convert driver."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignpipe.artifacts import schema
from alignpipe.data.convert import (
    convert,
    extract_prompt,
    hh_to_messages,
    row_id,
    to_preference_row,
    to_prompt_row,
    to_sft_row,
)
from alignpipe.data.errors import DataError, Where

WHERE = Where("data/train.jsonl", 7, "line")


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def asst(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}
HH_MULTI = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 4"


def _jsonl(path: Path, records: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# --- Anthropic HH text ---------------------------------------------------------------------------


def test_hh_single_and_multi_turn() -> None:
    assert hh_to_messages("\n\nHuman: Hi there \n\nAssistant:  Hello. ") == [user("Hi there"), asst("Hello.")]
    assert hh_to_messages(HH_MULTI) == [user("Hi"), asst("Hello!"), user("What is 2+2?"), asst("4")]
    # no leading blank lines, an open final turn, a paragraph break inside a turn
    assert hh_to_messages("Human: a\n\nb\n\nAssistant:") == [user("a\n\nb"), asst("")]


@pytest.mark.parametrize("text", ["just text", "preamble\n\nHuman: hi\n\nAssistant: yo"])
def test_hh_rejects_text_without_leading_marker(text: str) -> None:
    with pytest.raises(ValueError, match="marker"):
        hh_to_messages(text)


# --- SFT rows ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "prompt", "completion"),
    [
        ({"messages": [SYSTEM, user("q"), asst("a")]}, [SYSTEM, user("q")], [asst("a")]),
        ({"prompt": " q ", "completion": " a"}, [user("q")], [asst("a")]),
        ({"prompt": [user("q")], "completion": [asst("a")]}, [user("q")], [asst("a")]),
        ({"text": "\n\nHuman: q\n\nAssistant: a"}, [user("q")], [asst("a")]),
        ({"text": HH_MULTI}, [user("Hi"), asst("Hello!"), user("What is 2+2?")], [asst("4")]),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, [user("q")], [asst("a")]),
        ({"chosen": [user("q"), asst("a")], "rejected": [user("q"), asst("b")]}, [user("q")], [asst("a")]),
        ({"chosen": "\n\nHuman: q\n\nAssistant: a"}, [user("q")], [asst("a")]),
        ({"prompt": "\n\nHuman: q\n\nAssistant:", "completion": "a"}, [user("q")], [asst("a")]),
    ],
    ids=[
        "messages",
        "standard",
        "conversational",
        "hh",
        "hh-multi",
        "explicit-chosen",
        "implicit-chosen",
        "hh-chosen",
        "hh-prompt",
    ],
)
def test_sft_formats(record: dict[str, Any], prompt: list[dict], completion: list[dict]) -> None:
    assert to_sft_row(record, WHERE) == {"prompt": prompt, "completion": completion}


def test_message_extra_keys_are_dropped() -> None:
    record = {"messages": [{"role": "user", "content": "q", "name": "x"}, asst("a")]}
    assert to_sft_row(record, ("f.json", 0))["prompt"] == [user("q")]


# --- prompt rows ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "prompt"),
    [
        ({"prompt": "q"}, [user("q")]),
        ({"prompt": [SYSTEM, user("q")]}, [SYSTEM, user("q")]),
        ({"messages": [user("q"), asst("a")]}, [user("q")]),
        ({"messages": [user("q")]}, [user("q")]),
        ({"text": HH_MULTI}, [user("Hi"), asst("Hello!"), user("What is 2+2?")]),
        ({"prompt": "\n\nHuman: q\n\nAssistant:"}, [user("q")]),
        ({"chosen": [user("q"), asst("a")], "rejected": [user("q"), asst("b")]}, [user("q")]),
    ],
    ids=["standard", "conversational", "messages", "messages-open", "hh-multi", "hh-prompt", "chosen"],
)
def test_prompt_formats(record: dict[str, Any], prompt: list[dict]) -> None:
    assert to_prompt_row(record, WHERE) == {"prompt": prompt}


# --- preference rows -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"prompt": "q", "chosen": "good", "rejected": "bad"}, ([user("q")], [asst("good")], [asst("bad")])),
        (
            {"prompt": [user("q")], "chosen": [asst("good")], "rejected": [asst("bad")]},
            ([user("q")], [asst("good")], [asst("bad")]),
        ),
        (
            {"chosen": [user("q"), asst("good")], "rejected": [user("q"), asst("bad")]},
            ([user("q")], [asst("good")], [asst("bad")]),
        ),
        (
            {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"},
            ([user("q")], [asst("good")], [asst("bad")]),
        ),
        (  # UltraFeedback: a prompt string and full conversations; read as implicit, as TRL does
            {"prompt": "q", "chosen": [user("q"), asst("good")], "rejected": [user("q"), asst("bad")]},
            ([user("q")], [asst("good")], [asst("bad")]),
        ),
    ],
    ids=["explicit-standard", "explicit-conversational", "implicit-messages", "implicit-hh", "ultrafeedback"],
)
def test_preference_formats(record: dict[str, Any], expected: tuple) -> None:
    row = to_preference_row(record, WHERE)
    assert (row["prompt"], row["chosen"], row["rejected"]) == expected


def test_implicit_prompt_keeps_shared_assistant_turns() -> None:
    """Multi-turn: the shared history (with its assistant turn) is prompt; only the last answers differ."""
    history = [SYSTEM, user("Hi"), asst("Hello!"), user("2+2?")]
    prompt, chosen, rejected = extract_prompt([*history, asst("4")], [*history, asst("5")])
    assert (prompt, chosen, rejected) == (history, [asst("4")], [asst("5")])


def test_implicit_prompt_backs_off_to_the_last_assistant_turn_start() -> None:
    """Answers that share their first assistant message still split before the whole final turn."""
    chosen = [user("q"), asst("Let me think."), asst("4")]
    rejected = [user("q"), asst("Let me think."), asst("5")]
    assert extract_prompt(chosen, rejected) == ([user("q")], chosen[1:], rejected[1:])


def test_implicit_hh_prompt_ends_after_the_last_assistant_marker() -> None:
    chosen = HH_MULTI
    rejected = HH_MULTI[: -len("4")] + "five"
    row = to_preference_row({"chosen": chosen, "rejected": rejected}, WHERE)
    assert row["prompt"] == [user("Hi"), asst("Hello!"), user("What is 2+2?")]
    assert (row["chosen"], row["rejected"]) == ([asst("4")], [asst("five")])


# --- bad rows: every error names the file, the line and the field --------------------------------

BAD = [
    ("sft", {"prompt": "q"}, "completion", "missing"),
    ("sft", {"prompt": 3, "completion": "a"}, "prompt", "expected a string or a list of messages, got int"),
    (
        "sft",
        {"messages": [{"role": "tool", "content": "x"}, asst("a")]},
        "messages",
        "role 'tool' is not one",
    ),
    ("sft", {"messages": [user("q")]}, "messages", "does not end with a non-empty assistant message"),
    ("sft", {"messages": [asst("a")]}, "messages", "empty prompt"),
    ("sft", {"text": "plain text"}, "text", "not Anthropic HH text"),
    ("sft", {"prompt": "q", "completion": ["a"]}, "completion", "message 0: expected {'role', 'content'}"),
    ("sft", {"prompt": "q", "completion": [user("a")]}, "completion", "assistant messages only"),
    ("sft", {"foo": 1}, None, "unknown format: expected 'messages'"),
    ("prompts", {"prompt": "  "}, "prompt", "empty prompt"),
    ("prompts", {"prompt": [user("q"), asst("a")]}, "prompt", "must end with a user message"),
    (
        "prompts",
        {"prompt": [{"role": "user", "content": None}]},
        "prompt",
        "content must be a string, got null",
    ),
    ("prompts", {"prompt": []}, "prompt", "empty list of messages"),
    ("preferences", {"prompt": "q", "chosen": "a", "rejected": "a"}, "rejected", "identical"),
    (
        "preferences",
        {"chosen": [user("q"), asst("a")], "rejected": [user("q"), asst("a")]},
        "rejected",
        "identical",
    ),
    (
        "preferences",
        {"chosen": [user("q"), asst("a")], "rejected": [user("p"), asst("b")]},
        "rejected",
        "share no",
    ),
    (
        "preferences",
        {"chosen": HH_MULTI, "rejected": "\n\nHuman: Yo\n\nAssistant: 4"},
        "rejected",
        "share no",
    ),
    (
        "preferences",
        {
            "chosen": [user("q"), asst("a"), user("r"), asst("b")],
            "rejected": [user("q"), asst("x"), user("r"), asst("b")],
        },
        "chosen",
        "differ before their final assistant turn",
    ),
    (
        "preferences",
        {"chosen": [user("q"), asst("a")], "rejected": [user("q")]},
        "rejected",
        "empty completion",
    ),
    ("preferences", {"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", "empty completion"),
    (
        "preferences",
        {"prompt": "q", "chosen": "a"},
        "rejected",
        "missing (the record has fields 'prompt', 'chosen')",
    ),
    ("preferences", {"prompt": "q", "chosen": 5, "rejected": "b"}, "chosen", "got int"),
    ("preferences", {"chosen": "a", "rejected": "b"}, "prompt", "missing"),
    (
        "preferences",
        {"prompt": "q", "chosen": [user("q"), asst("a")], "rejected": "b"},
        "rejected",
        "whole conversation",
    ),
    (
        "preferences",
        {"chosen": [{"role": "human", "content": "q"}, asst("a")], "rejected": [user("q"), asst("b")]},
        "chosen",
        "role 'human' is not one of system, user, assistant",
    ),
    ("preferences", {"prompt": "q"}, "chosen", "missing"),
    ("preferences", {"messages": [user("q"), asst("a")]}, None, "unknown format"),
]
CONVERTERS = {"sft": to_sft_row, "prompts": to_prompt_row, "preferences": to_preference_row}


@pytest.mark.parametrize(("kind", "record", "field", "fragment"), BAD)
def test_bad_rows_name_file_line_and_field(kind: str, record: dict, field: str | None, fragment: str) -> None:
    with pytest.raises(DataError) as info:
        CONVERTERS[kind](record, WHERE)
    error = info.value
    assert (error.file, error.row, error.field) == ("data/train.jsonl", 7, field)
    prefix = "data/train.jsonl: line 7: " + (f"field {field!r}: " if field else "")
    assert str(error).startswith(prefix) and fragment in str(error), str(error)


def test_a_record_that_is_not_an_object() -> None:
    with pytest.raises(DataError, match=r"^f\.json: row 3 \(0-based\): expected an object, got list$"):
        to_prompt_row(["q"], ("f.json", 3))  # type: ignore[arg-type]


# --- the convert driver --------------------------------------------------------------------------


def test_convert_preferences_from_jsonl_matches_the_artifact_schema(tmp_path: Path) -> None:
    records = [
        {"prompt": "q1", "chosen": "a", "rejected": "b"},
        {"chosen": [user("q2"), asst("a")], "rejected": [user("q2"), asst("b")]},
    ]
    rows, dropped = convert(_jsonl(tmp_path / "p.jsonl", records), "preferences")
    assert not dropped and [r["prompt"] for r in rows] == [[user("q1")], [user("q2")]]
    assert all(r["pair_id"].startswith("pair-") and len(r["pair_id"]) == len("pair-") + 12 for r in rows)
    pa.Table.from_pylist(rows, schema=schema.PREFERENCES)  # the columns and types fit the artifact


@pytest.mark.parametrize(("kind", "table"), [("sft", schema.SFT), ("prompts", schema.PROMPTS)])
def test_convert_rows_fit_their_schema(tmp_path: Path, kind: str, table: pa.Schema) -> None:
    source = _jsonl(tmp_path / "d.jsonl", [{"messages": [user("q"), asst("a")]}])
    rows, _ = convert(source, kind)  # type: ignore[arg-type]
    assert set(rows[0]) == set(table.names) and rows[0]["meta"] is None
    pa.Table.from_pylist(rows, schema=table)


def test_ids_are_stable_under_reordering_and_duplicates_are_dropped(tmp_path: Path) -> None:
    records = [{"prompt": f"q{i}", "completion": "a"} for i in range(4)]
    first, _ = convert(_jsonl(tmp_path / "a.jsonl", records), "sft")
    second, dropped = convert(_jsonl(tmp_path / "b.jsonl", [*records[::-1], records[1]]), "sft")
    assert {r["id"]: r for r in first} == {r["id"]: r for r in second}
    assert dropped == {"duplicate": 1}
    assert first[0]["id"] == row_id("sft", {"prompt": [user("q0")], "completion": [asst("a")]})


def test_drop_mode_counts_invalid_rows_by_reason(tmp_path: Path) -> None:
    records = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "a"},
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "chosen": "", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"chosen": [user("q"), asst("a")], "rejected": [user("p"), asst("b")]},
        {"text": "hello"},
    ]
    rows, dropped = convert(_jsonl(tmp_path / "p.jsonl", records), "preferences", on_invalid="drop")
    assert len(rows) == 1
    assert dropped == {
        "identical": 1,
        "missing_field": 1,
        "empty_completion": 1,
        "duplicate": 1,
        "no_shared_prefix": 1,
        "unknown_format": 1,
    }


def test_error_mode_raises_on_the_first_invalid_row(tmp_path: Path) -> None:
    source = _jsonl(
        tmp_path / "p.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": 1}]
    )
    with pytest.raises(DataError, match=r"p\.jsonl: line 2: field 'completion': expected a string"):
        convert(source, "sft", on_invalid="error")


def test_no_valid_rows_is_an_error(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "p.jsonl", [{"prompt": ""}])
    with pytest.raises(DataError, match=r"no valid prompts rows \(dropped: \{'empty_prompt': 1\}\)"):
        convert(source, "prompts", on_invalid="drop")


def test_convert_csv_reports_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected\nq,a,b\nq2,,b\n")
    rows, _ = convert(str(path), "preferences", on_invalid="drop")
    assert len(rows) == 1
    with pytest.raises(DataError, match=r"p\.csv: line 3: field 'chosen': empty completion"):
        convert(str(path), "preferences")


def test_convert_parquet_conversational(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    records = [{"prompt": [user("q")], "chosen": [asst("a")], "rejected": [asst("b")], "score": 1.0}]
    pq.write_table(pa.Table.from_pylist(records), path)
    rows, _ = convert(str(path), "preferences", base_dir=None)
    assert rows[0]["chosen"] == [asst("a")] and set(rows[0]) == set(schema.PREFERENCES.names)
