"""Format detection, ambiguity, the ``hh`` format, content parts in TRL messages, and prepare's params."""

from __future__ import annotations

import json

import pytest
from formats_helpers import asst, first_error, fixture, jsonl, read, user

from alignpipe.data.convert import detect
from alignpipe.data.errors import DataError, Where
from alignpipe.params import DataParams
from alignpipe.prepare import prepare

WHERE = Where("d.jsonl", 1, "line")
TURNS = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"messages": [user("q"), asst("a")]}, "trl"),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "trl"),
        ({"prompt": "q", "completion": "a", "conversations": None}, "trl"),  # a null column is absent
        ({"text": "\n\nHuman: q\n\nAssistant: a"}, "hh"),
        ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "hh"),
        ({"conversations": TURNS}, "sharegpt"),
        ({"conversations": TURNS[:1], "chosen": {"from": "gpt", "value": "a"}, "rejected": "b"}, "sharegpt"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "value": "q"}]}]}, "llamafactory"),
        ({"messages": [{"role": "user", "content": "q", "loss_weight": 0.0}]}, "llamafactory"),
        ({"chosen_messages": [], "rejected_messages": []}, "llamafactory"),
        ({"message_id": "m", "parent_id": None, "role": "prompter", "text": "q"}, "oasst"),
        ({"message_tree_id": "m", "prompt": {"message_id": "m"}}, "oasst"),
        ({"instruction": "q", "completions": []}, "ultrafeedback"),
        ({"prompt": "q", "response": "a", "helpfulness": 3}, "helpsteer"),
        ({"foo": 1}, "trl"),  # nothing fits: the trl reader names the fields
    ],
)
def test_detect(record: dict, fmt: str) -> None:
    assert detect(record, WHERE) == fmt


def test_an_ambiguous_file_asks_for_the_format(tmp_path) -> None:
    source = jsonl(tmp_path / "both.jsonl", [{"conversations": TURNS, "messages": [user("q"), asst("a")]}])
    assert first_error(source, "sft") == (
        f"{source}: line 1: ambiguous format: the record has the fields of sharegpt and trl; name the format "
        "with data.<part>.format (one of trl, hh, sharegpt, llamafactory, oasst, ultrafeedback, helpsteer)"
    )
    rows, _, fmt = read(source, "sft", format="sharegpt")  # named: read as asked
    assert (fmt, rows) == ("sharegpt", [{"prompt": [user("q")], "completion": [asst("a")]}])


def test_prepare_names_the_part_in_the_ambiguity_and_reports_the_format(tmp_path) -> None:
    both = jsonl(tmp_path / "both.jsonl", [{"conversations": TURNS, "messages": [user("q"), asst("a")]}])
    params = {"builtin": {"n_sft": 4, "n_prompts": 4, "n_eval": 4}, "sft": {"source": both}}
    with pytest.raises(DataError, match=r"name the format with data\.sft\.format"):
        prepare(DataParams.model_validate(params), tmp_path / "out", tmp_path / "m.json")
    params["sft"] = {"source": fixture("oasst_trees.jsonl"), "lang": "en"}
    params["preferences"] = {"source": fixture("oasst_trees.jsonl"), "pairs": "all_pairs"}
    metrics = prepare(DataParams.model_validate(params), tmp_path / "out", tmp_path / "m.json")
    assert metrics["sft"]["format"] == "oasst" and metrics["sft"]["rows"] == 3
    assert metrics["sft"]["dropped"] == {
        "deleted": 1,
        "review_rejected": 1,
        "reply_to_dropped": 3,
        "empty_text": 1,
        "lang": 1,
    }
    assert metrics["preferences"]["rows"] == 3 and metrics["preferences"]["dropped"]["tie"] == 2
    assert json.loads((tmp_path / "m.json").read_text())["prompts"]["format"] == "builtin"


def test_hh_format_requires_hh_text(tmp_path) -> None:
    source = jsonl(tmp_path / "hh.jsonl", [{"chosen": "a", "rejected": "b", "prompt": "q"}])
    assert first_error(source, "preferences", format="hh") == (
        f"{source}: line 1: field 'chosen': not Anthropic HH text (format 'hh' needs a string starting with 'Human:')"
    )
    good = jsonl(
        tmp_path / "ok.jsonl",
        [{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}],
    )
    assert read(good, "preferences", format="hh")[0] == [
        {"prompt": [user("q")], "chosen": [asst("a")], "rejected": [asst("b")]}
    ]


def test_trl_messages_with_text_parts_are_flattened_and_other_parts_refused(tmp_path) -> None:
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    source = jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": parts}, asst("4")]}])
    assert read(source, "sft")[0] == [{"prompt": [user("What is 2+2?")], "completion": [asst("4")]}]
    image = [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    source = jsonl(tmp_path / "i.jsonl", [{"messages": [{"role": "user", "content": image}, asst("A cat.")]}])
    assert first_error(source, "sft") == (
        f"{source}: line 1: field 'messages': message 0: content part 0 has type 'image'; only text parts are supported"
    )


def test_params_refuse_an_unknown_format_and_empty_languages() -> None:
    with pytest.raises(ValueError, match="format"):
        DataParams.model_validate({"sft": {"format": "alpacca"}})
    with pytest.raises(ValueError, match="language codes"):
        DataParams.model_validate({"sft": {"lang": []}})
