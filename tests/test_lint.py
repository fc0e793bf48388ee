"""The tree passes the project's linter and formatter (what `make lint` runs), so drift fails CI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ["src", "stages", "tests", "bench", "flows"]


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return subprocess.run([exe, *args, *TREES], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_check_passes():
    proc = ruff("check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_leaves_every_file_unchanged():
    proc = ruff("format", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
