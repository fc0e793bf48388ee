"""Two runs in one workspace: the second is refused with a clear message and nothing is corrupted.

DVC 3 locks per path while a stage runs (``.dvc/tmp/rwlock``: read locks on its deps, write locks
on its outs) and holds the repository lock only between stages. A second ``dvc repro`` that
reaches a stage touching those paths stops at once with

    ERROR: failed to reproduce 'base_model': '.../models/base' is busy, it is being blocked by:
        (PID 1505): .../dvc/__main__.py repro sft

or, during the short repository-lock windows, "Unable to acquire lock. Most likely another DVC
process is running" after ~3 s of retries. Both say "busy" clearly enough: no wrapper. The
Prefect deployment runs one flow run at a time (serve limit=1 plus a deployment concurrency
limit of 1); a flow task that meets a lock fails with DVC's message, blocker included.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from faults import TINY, cache_problems, log_contains, run_process
from workspace import ROOT, dvc, env, make_workspace

from alignpipe.orchestration.dag import error_message

REPO_LOCKED = "Unable to acquire lock. Most likely another DVC process is running"
PATH_LOCKED = re.compile(
    r"ERROR: failed to reproduce '\w+': '[^']+' is busy, it is being blocked by: \(PID \d+\): .*repro .*"
)


def test_a_flow_task_that_meets_a_lock_reports_dvcs_message_with_the_blocker():
    stderr = [
        "Running stage 'sft':",
        f"ERROR: {REPO_LOCKED} or was terminated abruptly. Check the page <...>",
    ]
    assert REPO_LOCKED in error_message(stderr, 255)
    stderr = [
        "ERROR: failed to reproduce 'base_model': '/ws/models/base' is busy, it is being blocked by:",
        "    (PID 1505): /venv/dvc/__main__.py repro sft",
        "",
        "If there are no processes with such PIDs, you can manually remove '/ws/.dvc/tmp/rwlock' and try again.",
    ]
    assert PATH_LOCKED.fullmatch(error_message(stderr, 255))


def test_every_prefect_deployment_runs_one_flow_run_at_a_time():
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert deployments and all(d.get("concurrency_limit") == 1 for d in deployments), deployments
    flow = (ROOT / "flows/pipeline.py").read_text()
    assert "limit=1" in flow and "global_limit=1" in flow


@pytest.mark.slow
def test_a_second_dvc_repro_is_refused_while_one_runs_and_nothing_is_corrupted(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", {**TINY, "base_model": {"source": str(tiny_model_dir)}})
    first_log = tmp_path / "first.log"
    with first_log.open("w") as log:
        first = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "sft"], cwd=ws, env=env(), stdout=log,
                                 stderr=subprocess.STDOUT)  # fmt: skip
    try:
        running = log_contains(first_log, "Running stage 'sft'")
        deadline = time.monotonic() + 300
        while not running() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, f"the first repro ended early:\n{first_log.read_text()[-3000:]}"
        second = run_process([sys.executable, "-m", "dvc", "repro"], ws, env(), tmp_path / "second.log")
        assert first.poll() is None, "the first repro must still hold the lock for this test to mean anything"
    finally:
        assert first.wait(timeout=300) == 0, first_log.read_text()[-3000:]
    busy = error_message(second.log.splitlines(), second.returncode)
    assert second.returncode != 0 and (REPO_LOCKED in busy or PATH_LOCKED.fullmatch(busy)), second.log[-2000:]
    assert "Running stage" not in second.log  # it ran nothing
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert {"base_model", "prepare", "sft"} <= set(lock["stages"])
    assert "up to date" in dvc(ws, "status", "sft").stdout  # every out matches its dvc.lock hash
    assert cache_problems(ws) == []
    assert not Path(ws / ".dvc/tmp/rwlock").exists() or "sft" not in (ws / ".dvc/tmp/rwlock").read_text()
