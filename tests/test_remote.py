"""Scale-out on the project's own dvc.yaml: generation shards through the Prefect flow, a DVC remote.

One tiny run of the whole DAG (unsharded, committed) is shared: the remote test pushes it and pulls
it into a fresh clone; the shard test copies it and regenerates with two parallel shard tasks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from workspace import ROOT, dvc, env, make_workspace, ran_stages

from alignpipe.artifacts.generations import read_generations

pytestmark = pytest.mark.slow

REWARD_MODULE = '''
def score(prompts, completions):
    """A deterministic toy reward with spread: distinct characters of the answer."""
    return [float(len(set(c)) % 5) for c in completions]
'''

# 16 prompts in chunks of 4: 4 chunks, so each of 2 shards samples 2 of them.
TINY = {
    "data": {"builtin": {"n_sft": 16, "n_prompts": 16, "n_eval": 6}},
    "sft": {"batch_size": 4, "max_steps": 2, "save_steps": 2},
    "generate": {"n": 4, "max_new_tokens": 8, "chunk_prompts": 4},
    "reward": {"kind": "python", "function": "toy_reward:score"},
    "pairs": {"allow_truncated": True, "eval_fraction": 0.25},
    "dpo": {"batch_size": 4, "max_steps": 2, "eval_steps": 2, "save_steps": 2, "max_length": 64,
            "max_prompt_length": 48},
    "evaluate": {"max_new_tokens": 8, "n_examples": 2},
}  # fmt: skip
STAGES = [
    "base_model",
    "prepare",
    "sft",
    "reward_model",
    "generate",
    "score",
    "pairs",
    "ref_logps",
    "dpo",
    "evaluate",
]


def git(repo: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout


def digests(root: Path, rel: str) -> dict[str, str]:
    """sha256 of every file under ``root/rel`` (a file or a folder), by path."""
    base = root / rel
    files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def lock_outs(ws: Path) -> list[str]:
    """Every out of every stage in dvc.lock (cached or not)."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    return [out["path"] for stage in lock.values() for out in stage.get("outs", [])]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir) -> Path:
    """The whole DAG run once by `dvc repro` (generate unsharded), then committed as a user would."""
    ws = make_workspace(tmp_path_factory.mktemp("remote") / "ws",
                        {"base_model": {"source": str(tiny_model_dir)}, **TINY})  # fmt: skip
    (ws / "toy_reward.py").write_text(REWARD_MODULE)
    assert sorted(ran_stages(dvc(ws, "repro").stdout)) == sorted(STAGES)
    git(ws, "add", "-A")  # dvc.lock, the .gitignore files DVC wrote, and the cache: false outs (reports/)
    git(ws, "commit", "-qm", "run")
    return ws


def test_push_then_a_fresh_clone_pulls_every_artifact_and_finds_nothing_to_run(built, tmp_path):
    remote = tmp_path / "remote"
    dvc(built, "remote", "add", "-d", "storage", str(remote))  # as the README: then commit .dvc/config
    git(built, "commit", "-qam", "DVC remote")
    assert "pushed" in dvc(built, "push").stdout
    assert dvc(built, "status", "--cloud").stdout.strip() == "Cache and remote 'storage' are in sync."
    assert list((built / "checkpoints").iterdir()), "the stages still write their resume state"

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(built), str(clone)], check=True)
    assert not (clone / "models").exists()
    dvc(clone, "pull")
    outs = lock_outs(clone)
    assert {
        "models/sft",
        "data/generations",
        "models/dpo",
        "reports/eval.md",
        "reports/sft/metrics.json",
    } <= set(outs)
    for out in outs:  # cached ones from the remote, `cache: false` ones from git
        assert digests(clone, out) == digests(built, out), out
    assert not (clone / "checkpoints").exists()  # resume state does not travel
    assert dvc(clone, "status").stdout.strip() == "Data and pipelines are up to date."
    assert ran_stages(dvc(clone, "repro").stdout) == []


# ------------------------------------------------------------------ generate shards in the flow


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def _flow():
    spec = importlib.util.spec_from_file_location("alignpipe_flow_remote", ROOT / "flows" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pipeline


def _task_runs(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.type.value for run in runs}


def test_flow_with_parallel_generate_shards_equals_the_unsharded_run(
    built, tmp_path, prefect_api, monkeypatch
):
    ws = Path(shutil.copytree(built, tmp_path / "ws", symlinks=True))
    shutil.rmtree(ws / "data/generations")  # a persist out: without this, the shards would reuse its chunks
    monkeypatch.setenv("PYTHONPATH", str(ws / "src"))  # the flow's stages run the workspace's library
    monkeypatch.setenv("OMP_NUM_THREADS", env()["OMP_NUM_THREADS"])  # the threads of the unsharded run
    state = _flow()(workspace=str(ws), stages=["generate"], generate={"num_shards": 2},
                    generate_shards_parallel=True, return_state=True)  # fmt: skip
    assert state.is_completed(), state
    results = {r["stage"]: r["status"] for r in state.result()}
    assert results == {"base_model": "up to date", "prepare": "up to date", "sft": "up to date",
                       "generate": "ran"}  # fmt: skip
    tasks = _task_runs(state.state_details.flow_run_id)
    assert tasks["generate-shard-0"] == tasks["generate-shard-1"] == "COMPLETED", tasks
    metrics = yaml.safe_load((ws / "reports/generate.json").read_text())
    assert (metrics["chunks"], metrics["chunks_generated"], metrics["complete"]) == (
        4,
        0,
        True,
    )  # merged only

    key = lambda r: (r["prompt_id"], r["sample_idx"])  # noqa: E731
    sharded = sorted(read_generations(ws / "data/generations"), key=key)
    unsharded = sorted(read_generations(built / "data/generations"), key=key)
    assert len(sharded) == 16 * 4
    assert sharded == unsharded  # same rows, completions, token counts, log-probs and seeds
    assert yaml.safe_load((ws / "params.yaml").read_text())["generate"]["num_shards"] == 2
