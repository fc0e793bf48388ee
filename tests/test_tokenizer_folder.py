"""A model folder without a loadable tokenizer fails in one line naming the folder (issue 16).

Before, transformers answered "You need to have sentencepiece or tiktoken installed to convert a
slow tokenizer to a fast one", which names no folder and suggests the wrong fix.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from alignpipe.cli import _is_ours
from alignpipe.core.models import ModelFolderError, load_tokenizer
from alignpipe.params import RefLogpsParams
from alignpipe.ref_logps import run_ref_logps

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def without_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> Path:
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "models" / "sft"))
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    return folder


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and _is_ours(exc)
    return message


def test_folder_without_tokenizer_files_names_the_folder(tiny_model_dir, tmp_path):
    folder = without_tokenizer(tiny_model_dir, tmp_path)
    with pytest.raises(ModelFolderError) as info:
        load_tokenizer(folder)
    message = one_line(info.value)
    assert message.startswith(f"{folder}: no tokenizer files") and "tokenizer.json" in message
    assert "sentencepiece or tiktoken" not in message


def test_a_stage_given_such_a_folder_names_it(tiny_model_dir, tmp_path):
    folder = without_tokenizer(tiny_model_dir, tmp_path)
    with pytest.raises(ModelFolderError) as info:
        run_ref_logps(folder, tmp_path / "pairs", tmp_path / "ref.parquet", RefLogpsParams(), 64, 32)
    assert one_line(info.value).startswith(f"{folder}: no tokenizer files")
    assert not (tmp_path / "ref.parquet").exists()


def test_an_unreadable_tokenizer_file_names_the_folder(tiny_model_dir, tmp_path):
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    (folder / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(ModelFolderError) as info:
        load_tokenizer(folder)
    assert one_line(info.value).startswith(f"{folder}: cannot load the tokenizer")
