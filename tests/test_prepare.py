"""The prepare stage: built-in task, user files, overlap check, metrics, atomicity."""

from __future__ import annotations

import json

import pytest

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet
from alignpipe.data.errors import DataError
from alignpipe.params import DataParams
from alignpipe.prepare import prepare


def small_params(**overrides) -> DataParams:
    base = {"builtin": {"n_sft": 12, "n_prompts": 9, "n_eval": 9}}
    base.update(overrides)
    return DataParams.model_validate(base)


def test_builtin_default_writes_three_files_with_schema(tmp_path):
    metrics = prepare(small_params(), tmp_path / "prepared", tmp_path / "m.json")
    assert metrics["sft"]["rows"] == 12 and metrics["eval_prompts"]["rows"] == 9
    sft = read_parquet(tmp_path / "prepared/sft.parquet", schema.SFT)
    assert sft[0]["prompt"][0]["role"] == "user"
    assert sft[0]["completion"][0]["role"] == "assistant" and sft[0]["completion"][0]["content"]
    prompts = read_parquet(tmp_path / "prepared/prompts.parquet", schema.PROMPTS)
    assert json.loads(prompts[0]["meta"])["constraints"]
    assert not (tmp_path / "prepared/preferences.parquet").exists()
    assert json.loads((tmp_path / "m.json").read_text()) == metrics


def test_user_files_and_preferences(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "Say hi.", "completion": "Hi!"}) + "\n")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "Pick one.", "chosen": "A", "rejected": "B"}) + "\n")
    params = small_params(sft={"source": str(sft)}, preferences={"source": str(prefs)})
    metrics = prepare(params, tmp_path / "out", tmp_path / "m.json")
    assert metrics["sft"]["rows"] == 1 and metrics["preferences"]["rows"] == 1
    pairs = read_parquet(tmp_path / "out/preferences.parquet", schema.PREFERENCES)
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "A"}]


def test_eval_overlapping_train_prompts_is_an_error(tmp_path):
    same = tmp_path / "p.jsonl"
    same.write_text(json.dumps({"prompt": "Describe tea."}) + "\n")
    params = small_params(prompts={"source": str(same)}, eval_prompts={"source": str(same)})
    with pytest.raises(DataError, match="1 eval prompt.*also appear in data.prompts"):
        prepare(params, tmp_path / "out", tmp_path / "m.json")


def test_failure_keeps_earlier_artifacts(tmp_path):
    out = tmp_path / "prepared"
    prepare(small_params(), out, tmp_path / "m.json")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "completion": "fine"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2"):
        prepare(small_params(sft={"source": str(bad)}), out, tmp_path / "m.json")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_drop_mode_counts_in_metrics(tmp_path):
    src = tmp_path / "sft.jsonl"
    src.write_text(
        json.dumps({"prompt": "a", "completion": "b"})
        + "\n"
        + json.dumps({"prompt": "a", "completion": ""})
        + "\n"
    )
    metrics = prepare(
        small_params(on_invalid="drop", sft={"source": str(src)}), tmp_path / "o", tmp_path / "m.json"
    )
    assert metrics["sft"] == {
        "source": str(src),
        "format": "trl",
        "rows": 1,
        "dropped": {"empty_completion": 1},
    }


def test_max_rows_and_unknown_builtin(tmp_path):
    metrics = prepare(small_params(sft={"max_rows": 5}), tmp_path / "o", tmp_path / "m.json")
    assert metrics["sft"]["rows"] == 5
    with pytest.raises(DataError, match="unknown built-in"):
        prepare(small_params(sft={"source": "builtin:nope"}), tmp_path / "o2", tmp_path / "m.json")
