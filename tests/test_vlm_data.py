"""prepare reads TRL's vision formats: images as paths relative to the data file or embedded bytes,
stored in an ``images`` column (datasets' Image layout) that pyarrow and datasets read back."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet
from alignpipe.data.convert import convert, row_id
from alignpipe.data.errors import DataError
from alignpipe.params import DataParams
from alignpipe.prepare import prepare
from alignpipe.testing_vlm import square_png

RED, BLUE = square_png((255, 0, 0)), square_png((0, 0, 255))
QUESTION = "what colour is this square?"


def image_prompt(text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_rows(path, records):
    """A parquet source (images as embedded bytes, which JSON cannot hold)."""
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def test_preferences_with_relative_paths(tmp_path):
    """TRL's vision preference rows: the path is read relative to the data file, not the cwd; the
    placeholder leaves the messages and the image (its bytes, its path) goes to ``images``."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img/red.png").write_bytes(RED)
    record = {"images": ["img/red.png"], "prompt": image_prompt(), "chosen": "red", "rejected": "blue"}
    rows, dropped = convert(str(write_jsonl(tmp_path / "prefs.jsonl", [record])), "preferences")
    assert not dropped and len(rows) == 1
    assert rows[0]["prompt"] == [{"role": "user", "content": QUESTION}]
    assert rows[0]["images"] == [{"bytes": RED, "path": "img/red.png"}]


def test_ids_tell_images_apart_and_text_ids_do_not_move(tmp_path):
    """Two rows with the same text and different images are two rows; a text row's id is the one
    it had before images existed (sha1 of its canonical JSON)."""
    records = [{"images": [{"bytes": png, "path": None}], "prompt": image_prompt(), "completion": "x"}
               for png in (RED, BLUE, RED)]  # fmt: skip
    rows, dropped = convert(str(write_rows(tmp_path / "sft.parquet", records)), "sft")
    assert len(rows) == 2 and dropped == {"duplicate": 1}
    text = {
        "prompt": [{"role": "user", "content": "hi"}],
        "completion": [{"role": "assistant", "content": "x"}],
    }
    canonical = json.dumps(text, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert row_id("sft", text) == "sft-" + hashlib.sha1(canonical.encode()).hexdigest()[:12]


def test_messages_without_placeholders_and_count_mismatch(tmp_path):
    """Plain-string messages + images: TRL puts the images before the first user text (accepted);
    two placeholders for one image is an error naming the line."""
    ok = {"images": [{"bytes": RED}], "messages": [{"role": "user", "content": "colour?"},
                                                    {"role": "assistant", "content": "red"}]}  # fmt: skip
    rows, _ = convert(str(write_rows(tmp_path / "a.parquet", [ok])), "sft")
    assert rows[0]["images"][0]["bytes"] == RED
    prompt = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}
    ]
    bad = {"images": [{"bytes": RED}], "prompt": prompt, "completion": "red"}
    with pytest.raises(
        DataError, match=r"b.parquet: row 0 \(0-based\): field 'images': 2 image part\(s\).*but 1 im"
    ):
        convert(str(write_rows(tmp_path / "b.parquet", [bad])), "sft")


def test_missing_and_corrupt_images_name_the_row_or_are_dropped(tmp_path):
    (tmp_path / "broken.png").write_bytes(RED[: len(RED) // 2])  # a truncated PNG
    records = [
        {"images": ["red.png"], "prompt": image_prompt(), "completion": "red"},
        {"images": ["nowhere.png"], "prompt": image_prompt(), "completion": "red"},
        {"images": ["broken.png"], "prompt": image_prompt(), "completion": "red"},
    ]
    (tmp_path / "red.png").write_bytes(RED)
    source = str(write_jsonl(tmp_path / "sft.jsonl", records))
    with pytest.raises(DataError) as err:
        convert(source, "sft")
    assert str(err.value) == f"{source}: line 2: field 'images': image 0: file not found: nowhere.png"
    rows, dropped = convert(source, "sft", on_invalid="drop")
    assert len(rows) == 1 and dropped == {"missing_image": 1, "bad_image": 1}


def test_image_in_a_later_turn_is_refused(tmp_path):
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, *image_prompt()]
    (tmp_path / "red.png").write_bytes(RED)
    record = {"images": ["red.png"], "prompt": prompt, "completion": "red"}
    with pytest.raises(DataError, match="line 1: field 'prompt': message 2: image parts are supported only"):
        convert(str(write_jsonl(tmp_path / "a.jsonl", [record])), "sft")


def test_prepare_writes_an_images_column_datasets_reads(tmp_path):
    """From a parquet source with embedded bytes (datasets' layout) to prepared parquet files with an
    ``images`` column; ``datasets`` loads it, and the text tables keep their schema."""
    rows = [{"images": [{"bytes": png, "path": None}], "prompt": image_prompt(f"{QUESTION} {i}"),
             "completion": [{"role": "assistant", "content": [{"type": "text", "text": name}]}]}
            for i, (png, name) in enumerate([(RED, "red"), (BLUE, "blue")])]  # fmt: skip
    write_rows(tmp_path / "sft.parquet", rows)
    params = DataParams.model_validate(
        {
            "builtin": {"n_sft": 4, "n_prompts": 3, "n_eval": 3},
            "sft": {"source": str(tmp_path / "sft.parquet")},
        }
    )
    metrics = prepare(params, tmp_path / "out", tmp_path / "m.json")
    assert metrics["sft"]["rows"] == 2
    sft = read_parquet(tmp_path / "out/sft.parquet", schema.with_images(schema.SFT))
    assert [r["images"][0]["bytes"] for r in sft] == [RED, BLUE]
    assert pq.read_schema(tmp_path / "out/prompts.parquet").names == schema.PROMPTS.names
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "out/sft.parquet"), split="train")
    assert loaded[1]["images"][0]["bytes"] == BLUE and loaded[1]["completion"][0]["content"] == "blue"
