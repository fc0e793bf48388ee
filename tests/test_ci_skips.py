"""Under CI=true a skip fails the run unless its reason is allowed (tests/ci_skips.py; issue 16, item 5).

Each case runs a small pytest session in a subprocess whose conftest installs the same hooks as
tests/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from ci_skips import pytest_make_collect_report, pytest_runtest_makereport
"""

BODIES = {
    "plain_skip": "import pytest\n\ndef test_a():\n    pytest.skip('needs a GPU')\n",
    "skipif": "import pytest\n\n@pytest.mark.skipif(True, reason='trl is not installed')\ndef test_a():\n    pass\n",
    "module_importorskip": "import pytest\n\npytest.importorskip('no_such_module_here')\n\ndef test_a():\n    pass\n",
    "allowed": "import pytest\n\ndef test_a():\n    pytest.skip('root writes into read-only folders')\n",
    "xfail": "import pytest\n\n@pytest.mark.xfail(reason='known')\ndef test_a():\n    assert False\n",
}


def session(tmp_path: Path, body: str, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_inner.py").write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci is not None else {})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("name", ["plain_skip", "skipif", "module_importorskip"])
def test_a_skip_fails_the_session_under_ci(tmp_path, name):
    proc = session(tmp_path, BODIES[name], "true")
    assert proc.returncode != 0, proc.stdout
    assert "skipped under CI=true, where every test must run" in proc.stdout


@pytest.mark.parametrize("name", ["plain_skip", "module_importorskip"])
def test_a_skip_is_a_skip_outside_ci(tmp_path, name):
    proc = session(tmp_path, BODIES[name], None)
    assert proc.returncode in (0, 5) and "skipped" in proc.stdout and "failed" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", ["allowed", "xfail"])
def test_allowed_reasons_and_xfails_pass_under_ci(tmp_path, name):
    proc = session(tmp_path, BODIES[name], "true")
    assert proc.returncode == 0, proc.stdout


def test_the_suite_installs_the_hooks():
    import ci_skips
    import conftest

    assert conftest.pytest_runtest_makereport is ci_skips.pytest_runtest_makereport
    assert conftest.pytest_make_collect_report is ci_skips.pytest_make_collect_report
