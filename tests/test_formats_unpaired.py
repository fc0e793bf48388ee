"""Unpaired user feedback (KTO): TRL's unpaired preference rows (standard and conversational), messages +
label, bad rows with their exact one-line messages, and what prepare writes (data/prepared/unpaired.parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from formats_helpers import asst, first_error, fixture, read, system, user

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet
from alignpipe.data.convert import FormatOptions, convert_source
from alignpipe.data.errors import DataError
from alignpipe.params import DataParams, ParamsError, validate
from alignpipe.prepare import prepare


def strip(rows):
    return [{k: v for k, v in r.items() if k != "example_id"} for r in rows]


def test_standard_rows_strings_and_hh_prompt():
    rows, dropped, fmt = read(fixture("unpaired_standard.jsonl"), "unpaired")
    assert fmt == "trl" and dropped == {}
    assert strip(rows) == [
        {"prompt": [user("Name a primary colour.")], "completion": [asst("Red.")], "label": True},
        {"prompt": [user("Name a primary colour.")], "completion": [asst("Purple.")], "label": False},
        {"prompt": [user("What is 2+2?")], "completion": [asst("4")], "label": True},
    ]


def test_conversational_rows_keep_system_and_join_text_parts():
    rows, _, _ = read(fixture("unpaired_conversational.jsonl"), "unpaired")
    assert strip(rows) == [
        {"prompt": [system("Be brief."), user("Capital of France?")], "completion": [asst("Paris.")],
         "label": True},
        {"prompt": [user("Capital of France?")], "completion": [asst("Lyon, I think.")], "label": False},
    ]  # fmt: skip


def test_messages_plus_label_the_last_assistant_turn_is_the_completion():
    rows, _, _ = read(fixture("unpaired_messages.jsonl"), "unpaired")
    assert strip(rows) == [
        {"prompt": [user("Hi"), asst("Hello!"), user("Tell me a joke.")],
         "completion": [asst("Why did the chicken cross the road?")], "label": True},
        {"prompt": [user("Tell me a joke.")], "completion": [asst("No.")], "label": False},
    ]  # fmt: skip


def test_csv_labels_are_the_strings_true_and_false():
    rows, _, _ = read(fixture("unpaired_standard.csv"), "unpaired")
    assert [(r["completion"][0]["content"], r["label"]) for r in rows] == [("Hi!", True), ("Go away.", False)]


def test_ids_are_content_hashes_and_the_label_is_part_of_the_content():
    rows = convert_source(fixture("unpaired_standard.jsonl"), "unpaired").rows
    assert all(r["example_id"].startswith("unpaired-") and len(r["example_id"]) == 21 for r in rows)
    flipped = convert_source(fixture("unpaired_standard.csv"), "unpaired").rows
    assert len({r["example_id"] for r in rows + flipped}) == 5


BAD = fixture("unpaired_bad.jsonl")
BAD_LINES = {  # line -> its one-line error (every other bad line blanked, so this one is the first)
    2: "field 'label': missing (the record has fields 'prompt', 'completion')",
    3: "field 'label': expected a boolean (true: desirable, false: undesirable), got int 1",
    4: "field 'label': expected a boolean (true: desirable, false: undesirable), got string 'yes'",
    5: "field 'messages': the conversation does not end with a non-empty assistant message",
    6: "field 'completion': empty completion",
    7: "field 'chosen': a preference pair (chosen/rejected) is not unpaired feedback; give it in "
    "data.preferences.source, or give 'completion' + 'label'",
    8: "field 'completion': missing (an unpaired row needs a completion and its label)",
    9: "field 'completion': message 0: a completion holds assistant messages only, got role 'user'",
    10: "field 'completion': give either 'messages' or 'prompt' + 'completion', not both",
}


@pytest.mark.parametrize("line", sorted(BAD_LINES))
def test_bad_row_names_file_line_and_field(tmp_path, line):
    lines = Path(BAD).read_text().splitlines()
    kept = [text if n == line or n not in BAD_LINES else "" for n, text in enumerate(lines, start=1)]
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n".join(kept) + "\n")
    assert first_error(str(path), "unpaired") == f"{path}: line {line}: {BAD_LINES[line]}"


def test_drop_mode_counts_bad_rows_by_reason():
    rows, dropped, _ = read(BAD, "unpaired", on_invalid="drop")
    assert strip(rows) == [{"prompt": [user("Fine row.")], "completion": [asst("Fine.")], "label": True}]
    assert dropped == {"missing_field": 2, "bad_label": 2, "empty_completion": 2, "unknown_format": 1,
                       "bad_role": 1, "ambiguous": 1, "duplicate": 1}  # fmt: skip


def test_formats_without_labels_are_refused():
    with pytest.raises(DataError) as info:
        convert_source(BAD, "unpaired", options=FormatOptions(format="sharegpt"))
    assert str(info.value) == (
        f"{BAD}: format 'sharegpt' has no unpaired (labelled) rows; unpaired feedback is read as trl "
        "(prompt + completion + label, or messages + label) or hh"
    )
    with pytest.raises(ParamsError) as info:
        validate(DataParams, {"unpaired": {"source": BAD, "format": "oasst"}}, prefix="data")
    assert str(info.value) == (
        "params.yaml: data.unpaired.format: 'oasst' has no unpaired (labelled) rows; use one of auto, trl, hh"
    )


def _params(**overrides) -> DataParams:
    return DataParams.model_validate({"builtin": {"n_sft": 4, "n_prompts": 4, "n_eval": 2}, **overrides})


def test_prepare_writes_unpaired_parquet_and_counts_labels(tmp_path):
    source = fixture("unpaired_standard.jsonl")
    metrics = prepare(_params(unpaired={"source": source}), tmp_path / "prepared", tmp_path / "m.json")
    assert metrics["unpaired"] == {"source": source, "format": "trl", "rows": 3, "dropped": {}, "desirable": 2,
                                   "undesirable": 1}  # fmt: skip
    rows = read_parquet(tmp_path / "prepared/unpaired.parquet", schema.UNPAIRED_PREPARED)
    assert strip(rows) == strip(convert_source(source, "unpaired").rows)
    assert json.loads((tmp_path / "m.json").read_text()) == metrics


def test_prepare_without_a_source_writes_no_unpaired_file_as_for_preferences(tmp_path):
    metrics = prepare(_params(), tmp_path / "prepared", tmp_path / "m.json")
    assert "unpaired" not in metrics and not (tmp_path / "prepared/unpaired.parquet").exists()
    with pytest.raises(DataError) as info:
        prepare(
            _params(unpaired={"source": "builtin:verifiable-instructions"}), tmp_path / "p2", tmp_path / "m"
        )
    assert str(info.value) == ("data.unpaired.source: the built-in task has no unpaired (labelled) examples")


def test_hh_format_reads_an_hh_prompt_and_the_params_list_matches_the_readers():
    from alignpipe.data.convert import UNPAIRED_FORMATS
    from alignpipe.params import UNPAIRED_FORMATS as PARAM_FORMATS

    rows, _, fmt = read(fixture("unpaired_standard.jsonl"), "unpaired", format="hh")
    assert fmt == "hh" and rows[2] == {
        "prompt": [user("What is 2+2?")],
        "completion": [asst("4")],
        "label": True,
    }
    assert ("auto", *UNPAIRED_FORMATS) == PARAM_FORMATS
