"""Shared fixtures: a tiny tokenizer and model built in-process (no download)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402, F401 - CI=true: skips fail

from alignpipe.testing import save_tiny_model, tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture()
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny causal LM saved in HF format (read-only: copy it before changing it)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
