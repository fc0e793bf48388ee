"""Under ``CI=true`` a skipped test fails the run, unless its reason is allowed below (with why).

A skip hides a test that CI is meant to run: a missing optional dependency (TRL for the parity
tests, ruff for the lint tests) or a TRL whose private API moved turned 16 parity tests into
quiet skips. ``tests/conftest.py`` installs these hooks; locally (no ``CI``) skips stay skips.
"""

from __future__ import annotations

import os

import pytest

# Skip reasons (substrings) CI accepts, and why each is not a gap.
ALLOWED_SKIPS = {
    "root writes into read-only folders": "CI containers run as root; the output_folder_not_writable case "
    "(tests/test_bad_inputs.py) checks the same error there",
    "checks the CPU defaults": "a GPU machine: the test is about CPU-only machines",
    "checks the CPU-only error": "a GPU machine: the test is about CPU-only machines",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_if_not_allowed(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _reason(report.longrepr)
    if any(allowed in reason for allowed in ALLOWED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true, where every test must run: {reason} "
        "(install what it needs, or allow the reason in tests/ci_skips.py with why)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    _fail_if_not_allowed(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    """Module-level skips (``pytest.importorskip`` at import) skip a whole file at collection."""
    outcome = yield
    _fail_if_not_allowed(outcome.get_result())
