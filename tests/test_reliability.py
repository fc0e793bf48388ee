"""Interrupted runs lose nothing: every long stage, SIGKILLed at a seeded random moment and rerun,
ends with the artifacts of an uninterrupted run (bitwise: on CPU every stage is deterministic).

A module fixture runs the whole chain once, uninterrupted, on the tiny model (stage scripts as
subprocesses, with the commands of ``dvc.yaml``); it records each stage's artifacts and timing.
Each kill test then reruns one stage in a copy of that workspace, kills its process group at a
moment drawn from ``random.Random(f"{SEED}:{stage}")`` within the measured run (after its first
checkpoint or chunk where it has them), checks that nothing half-written is left in place,
reruns it and compares. The last test kills ``dvc repro`` itself mid-``sft`` and checks that the
DVC cache holds no partial object and that the rerun resumes and ends up to date.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from faults import (
    TINY,
    Run,
    artifact_digests,
    cache_problems,
    file_appears,
    log_contains,
    run_process,
    stage_argv,
    temp_leftovers,
)
from workspace import dvc, env, make_workspace

from alignpipe.base_model import build_base_model
from alignpipe.params import load_section
from alignpipe.prepare import prepare

SEED = 9
SECRET = "hf_reliabilitySecretToken0123456789"  # set as HF_TOKEN for every stage: must never be written


@dataclass(frozen=True)
class Spec:
    outs: tuple[str, ...]  # what the stage writes (removed before a run, compared after)
    persist: tuple[str, ...]  # resume state kept across runs (checkpoints)
    done: str  # the final artifact: the kill falls between the trigger and its appearance (+10%)
    trigger: str | None = None  # the kill clock starts when this glob matches, or "log:<text>" is printed
    resumed: str | None = None  # what the rerun prints when it picks up the interrupted work


STAGES = {
    "sft": Spec(
        ("models/sft", "reports/sft"),
        ("checkpoints/sft",),
        "models/sft/model.safetensors",
        "checkpoints/sft/checkpoint-*/trainer_state.json",
        "sft: resuming from",
    ),
    "generate": Spec(
        ("data/generations", "reports/generate.json"), (), "reports/generate.json", "data/generations/chunk-*"
    ),
    "score": Spec(("data/scored.parquet", "reports/score.json"), (), "reports/score.json"),
    "pairs": Spec(
        ("data/pairs", "data/unpaired", "reports/pairs.json", "reports/pairs"), (), "reports/pairs.json"
    ),
    "ref_logps": Spec(("data/ref_logps.parquet",), (), "data/ref_logps.parquet", "log:ref_logps:"),
    "dpo": Spec(
        ("models/dpo", "reports/dpo"),
        ("checkpoints/dpo",),
        "models/dpo/model.safetensors",
        "checkpoints/dpo/step-*/trainer_state.json",
        "dpo: resuming from",
    ),
    "evaluate": Spec(
        ("reports/eval.json", "reports/eval.md", "reports/eval"), (), "reports/eval.json", "log:generate sft"
    ),
}
KILLED = ["sft", "generate", "score", "ref_logps", "dpo", "evaluate"]


def stage_env(ws: Path) -> dict[str, str]:
    """The workspace's own copy of the library (as under `dvc repro` there), and a token to keep secret."""
    secrets = {"HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": SECRET}
    return {**env(), "PYTHONPATH": str(ws / "src"), "TQDM_MININTERVAL": "1", **secrets}


@dataclass
class Chain:
    ws: Path
    runs: dict[str, Run] = field(default_factory=dict)
    digests: dict[str, dict[str, str]] = field(default_factory=dict)


def trigger(ws: Path, spec: Spec, log: Path) -> Callable[[], bool] | None:
    if spec.trigger is None:
        return None
    if spec.trigger.startswith("log:"):
        return log_contains(log, spec.trigger.removeprefix("log:"))
    return file_appears(ws, spec.trigger)


def setup_workspace(dest: Path, base_model: Path) -> Path:
    """A workspace with models/base and data/prepared built in-process (the stages' own functions)."""
    ws = make_workspace(dest, {**TINY, "base_model": {"source": str(base_model)}})
    build_base_model(load_section("base_model", ws / "params.yaml"), ws / "models/base")
    prepare(load_section("data", ws / "params.yaml"), ws / "data/prepared", ws / "reports/prepare.json")
    return ws


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir) -> Chain:
    """Every stage after prepare, run once without interruption (the reference)."""
    root = tmp_path_factory.mktemp("chain")
    result = Chain(setup_workspace(root / "ws", tiny_model_dir))
    for stage, spec in STAGES.items():
        log = root / f"{stage}.log"
        argv, env_ = stage_argv(result.ws, stage), stage_env(result.ws)
        done = file_appears(result.ws, spec.done)
        run = run_process(argv, result.ws, env_, log, trigger=trigger(result.ws, spec, log), done=done)
        assert run.returncode == 0, f"{stage} failed:\n{run.log[-3000:]}"
        result.runs[stage] = run
        result.digests[stage] = artifact_digests(result.ws, spec.outs)
    return result


def remove(ws: Path, paths: tuple[str, ...]) -> None:
    for rel in paths:
        if (ws / rel).is_dir():
            shutil.rmtree(ws / rel)
        else:
            (ws / rel).unlink(missing_ok=True)


def kill_delay(seed: str, reference: Run) -> float:
    """Seconds after the trigger: uniform over the reference's trigger-to-final-artifact time, +10%."""
    assert reference.done_seconds is not None
    window = reference.done_seconds - (reference.trigger_seconds or 0.0)
    return random.Random(seed).uniform(0.0, 1.1) * window


def kill_at_a_random_moment(ws: Path, stage: str, reference: Run, logs: Path) -> Run:
    """Run the stage from scratch and SIGKILL it at a seeded moment within its measured run.

    The moment is drawn between the trigger (first checkpoint, chunk or progress line; else the
    start) and the end of the reference run; if the run ends first, the delay is halved and it
    starts over.
    """
    spec = STAGES[stage]
    if reference.trigger_seconds is None:  # its progress line changed: count from the start
        spec = Spec(spec.outs, spec.persist, spec.done, None, spec.resumed)
    delay = kill_delay(f"{SEED}:{stage}", reference)
    for attempt in range(4):
        remove(ws, spec.outs + spec.persist)
        log = logs / f"killed{attempt}.log"
        killed = run_process(
            stage_argv(ws, stage), ws, stage_env(ws), log, trigger=trigger(ws, spec, log), kill_after=delay
        )
        if killed.killed:
            assert killed.returncode == -9
            return killed
        delay /= 2
    raise AssertionError(f"{stage} always finished before the kill")


def assert_nothing_half_written(ws: Path, stage: str, expected: dict[str, str]) -> None:
    """After the kill every artifact in place is complete: absent, or equal to the reference file.

    Exception: the DVCLive curves of the training stages grow point by point; the rerun cuts them
    back to its checkpoint (compared after the rerun).
    """
    now = artifact_digests(ws, [o for o in STAGES[stage].outs if (ws / o).exists()])
    partial = {path for path, digest in now.items() if expected.get(path) != digest}
    if stage in ("sft", "dpo"):
        partial = {p for p in partial if not p.startswith("reports/")}
    assert not partial, f"{stage}: half-written or wrong artifacts after the kill: {sorted(partial)}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", KILLED)
def test_a_killed_stage_reruns_to_the_artifacts_of_an_uninterrupted_run(chain, stage, tmp_path):
    ws = Path(shutil.copytree(chain.ws, tmp_path / "ws", symlinks=True))
    kill_at_a_random_moment(ws, stage, chain.runs[stage], tmp_path)
    assert_nothing_half_written(ws, stage, chain.digests[stage])
    rerun = run_process(stage_argv(ws, stage), ws, stage_env(ws), tmp_path / "rerun.log")
    assert rerun.returncode == 0, rerun.log[-3000:]
    assert artifact_digests(ws, STAGES[stage].outs) == chain.digests[stage]
    if STAGES[stage].resumed:
        assert STAGES[stage].resumed in rerun.log
    if stage == "generate":  # the chunks written before the kill were kept, not sampled again
        assert json.loads((ws / "reports/generate.json").read_text())["chunks_reused"] > 0
    for rel in STAGES[stage].outs:
        assert temp_leftovers(ws / rel) == [], f"temporary files left in {rel}"


@pytest.mark.slow
def test_no_secret_from_the_environment_reaches_an_artifact_or_a_log(chain):
    """HF_TOKEN was set for every stage: no output file, report or log line holds it."""
    leaks = [str(p.relative_to(chain.ws)) for p in chain.ws.rglob("*")
             if p.is_file() and ".git" not in p.parts and SECRET.encode() in p.read_bytes()]  # fmt: skip
    leaks += [f"log of {stage}" for stage, run in chain.runs.items() if SECRET in run.log]
    assert leaks == []


@pytest.mark.slow
def test_killing_dvc_repro_mid_stage_caches_nothing_partial_and_the_rerun_resumes(
    chain, tiny_model_dir, tmp_path
):
    """`dvc repro sft` (base_model, prepare, sft) killed after sft's first checkpoint, then run again."""
    repro = [sys.executable, "-m", "dvc", "repro", "sft"]
    delay = kill_delay(f"{SEED}:dvc", chain.runs["sft"])
    for attempt in range(4):  # if sft ends before the kill, start over in a new workspace, sooner
        ws = make_workspace(
            tmp_path / f"ws{attempt}", {**TINY, "base_model": {"source": str(tiny_model_dir)}}
        )
        trigger = file_appears(ws, STAGES["sft"].trigger)
        log = tmp_path / f"killed{attempt}.log"
        killed = run_process(repro, ws, stage_env(ws), log, trigger=trigger, kill_after=delay)
        if killed.killed:
            break
        delay /= 4
    assert killed.killed, killed.log[-3000:]
    assert cache_problems(ws) == []
    sft_model = {k: v for k, v in chain.digests["sft"].items() if k.startswith("models/")}
    assert not (ws / "models/sft").exists() or artifact_digests(ws, ["models/sft"]) == sft_model
    rerun = run_process(repro, ws, stage_env(ws), tmp_path / "rerun.log")
    assert rerun.returncode == 0, rerun.log[-3000:]
    assert "Running stage 'sft'" in rerun.log and "sft: resuming from" in rerun.log
    assert "up to date" in dvc(ws, "status", "sft").stdout
    assert cache_problems(ws) == []
    assert artifact_digests(ws, ["models/sft", "reports/sft"]) == chain.digests["sft"]


# ------------------------------------------------------------------ fast: the pieces the kill tests rely on

KILLED_WRITER = """
import os, signal, sys
from alignpipe.artifacts.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half of the new")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_mid_write_leaves_the_previous_artifact_in_place(tmp_path):
    target = tmp_path / "data/scored.parquet"
    target.parent.mkdir()
    target.write_bytes(b"previous artifact")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], env=env(), capture_output=True)
    assert proc.returncode == -9
    assert target.read_bytes() == b"previous artifact"
    leftovers = temp_leftovers(tmp_path / "data")  # the killed writer's temporary: a hidden sibling
    assert leftovers and all(p.startswith(".scored.parquet.") and p.endswith(".tmp") for p in leftovers)
    # the next writer of the same artifact removes the dead writer's temporary, and only that
    live = target.parent / f".scored.parquet.{os.getpid()}.abcd1234.tmp"  # a writer still running
    live.mkdir()
    other = target.parent / ".other.parquet.1.abcd1234.tmp"
    other.mkdir()
    from alignpipe.artifacts.io import atomic_path

    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new artifact")
    assert target.read_bytes() == b"new artifact"
    assert sorted(temp_leftovers(tmp_path / "data")) == sorted([live.name, other.name])


def test_resuming_metrics_after_a_kill_mid_summary_and_mid_line(tmp_path):
    """A kill can leave DVCLive's metrics.json empty and a curve with points past the checkpoint:
    the resumed run starts the curves afresh and replays the checkpoint's points."""
    from alignpipe.training.metrics import MetricsLog

    (tmp_path / "plots/metrics").mkdir(parents=True)
    (tmp_path / "metrics.json").write_text("")  # killed while DVCLive rewrote it
    curve = tmp_path / "plots/metrics/loss.tsv"
    curve.write_text("step\tloss\n1\t0.7\n2\t0.6\n3\t0.5\n4\t0.")  # killed mid-line, after step 3
    log = MetricsLog(tmp_path, enabled=True, history=[(1, {"loss": 0.7}), (2, {"loss": 0.6})])
    log.log(3, {"loss": 0.25})
    assert curve.read_text() == "step\tloss\n1\t0.7\n2\t0.6\n3\t0.25\n"
    assert json.loads((tmp_path / "metrics.json").read_text())["loss"] == 0.25
    assert log.history == [(1, {"loss": 0.7}), (2, {"loss": 0.6}), (3, {"loss": 0.25})]
