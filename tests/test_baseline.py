"""The committed pipeline baseline: ``dvc.lock`` and the metrics of one ``make run`` on the embedded
default, so that a user's ``dvc metrics diff`` (after ``make run`` or an edit) compares against it.

Code hashes in ``dvc.lock`` go stale with any change to ``src/`` (DVC then reruns those stages, as it
should); the params must not: a changed default in ``params.yaml`` without a new baseline would make
``dvc metrics diff`` compare two different settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]


def _metrics_paths(stage: dict) -> list[str]:
    return [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", [])]


def _load(name: str) -> dict:
    """YAML 1.2 as DVC reads and writes it (ruamel): PyYAML's 1.1 reads DVC's ``5e-05`` as a string
    and its unquoted ``off`` as false."""
    return YAML(typ="safe").load((ROOT / name).read_text())


def _param(params: dict, dotted: str):
    value = params
    for part in dotted.split("."):
        value = value[part]
    return value


def test_the_lock_covers_every_stage_with_the_committed_params():
    dag = _load("dvc.yaml")["stages"]
    lock = _load("dvc.lock")["stages"]
    # the *_round stages (matrix over rounds.extra) render to no stage with the default one round
    assert set(lock) == {name for name, stage in dag.items() if "matrix" not in stage}
    params = _load("params.yaml")
    stale = [
        f"{stage}: {key} = {value!r} in dvc.lock, {_param(params, key)!r} in params.yaml"
        for stage, entry in lock.items()
        for key, value in entry.get("params", {}).get("params.yaml", {}).items()
        if _param(params, key) != value
    ]
    assert not stale, (
        "params.yaml changed since the baseline: rerun `make run` and commit dvc.lock + metrics\n"
        + ("\n".join(stale))
    )


def test_every_metrics_file_of_the_dag_is_committed_and_matches_the_lock():
    dag = _load("dvc.yaml")["stages"]
    lock = _load("dvc.lock")["stages"]
    for name, stage in dag.items():
        if "matrix" in stage:  # a *_round template: no stage with the default one round
            continue
        for path in _metrics_paths(stage):
            assert (ROOT / path).is_file(), f"{path} (metrics of {name}) is not committed"
            json.loads((ROOT / path).read_text())
            locked = {o["path"]: o for o in lock[name]["outs"]}
            assert path in locked, f"{path} not in dvc.lock's {name} outs"


def test_dvc_metrics_show_reads_the_baseline():
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    eval_json = next(d for w in shown.values() for p, d in w["data"].items() if p.endswith("eval.json"))
    assert 0 <= eval_json["data"]["win_rate"] <= 1 and "kl" in eval_json["data"]


def _rendered_outs(tmp_path: Path, extra_rounds: int) -> dict[str, bool]:
    """Every out of the DAG as DVC renders it (``matrix`` over ``rounds.extra`` resolved) -> whether
    DVC caches it (False: ``cache: false``, it goes to git)."""
    from dvc.repo import Repo

    params = _load("params.yaml")
    params["rounds"]["extra"] = [
        {"name": f"round-{k}", "previous": "models/dpo" if k == 2 else f"models/round-{k - 1}/dpo"}
        for k in range(2, extra_rounds + 2)
    ]
    params["rounds"]["final"] = f"models/round-{extra_rounds + 1}/dpo" if extra_rounds else "models/dpo"
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    YAML().dump(params, tmp_path / "params.yaml")
    with Repo(str(tmp_path), uninitialized=True) as repo:
        return {o.def_path: o.use_cache for s in repo.index.stages for o in s.outs}


def _git_ignored(paths: list[str]) -> set[str]:
    """The paths git ignores, as a file or as a folder (an out not written yet is neither to git, and
    a pattern like /data/pairs/ matches folders only)."""
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT,
        input="\n".join(q for p in paths for q in (p, f"{p}/")), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr  # 1: none ignored
    return {p.rstrip("/") for p in proc.stdout.split()}


def test_git_ignores_the_cached_outs_and_keeps_the_cache_false_ones(tmp_path):
    """After a run `git status` lists no DVC-cached out (their contents live in DVC's cache; for data/round-k/
    DVC would write a data/round-k/.gitignore of its own), and git ignores no `cache: false` out (reports/:
    metrics, plots, eval.md; they are committed with dvc.lock, or a fresh clone plus `dvc pull` finds
    their stages changed: DVC can restore them from nowhere else)."""
    outs = _rendered_outs(tmp_path, extra_rounds=2)
    assert "data/round-3/generations" in outs and "reports/round-3/dpo/plots/metrics" in outs
    ignored = _git_ignored(list(outs))
    assert sorted(p for p, cached in outs.items() if cached and p not in ignored) == []
    assert sorted(p for p, cached in outs.items() if not cached and p in ignored) == []


def test_every_cache_false_out_of_the_default_dag_is_committed(tmp_path):
    """The baseline holds all of one run's `cache: false` outs, not only its metrics: the plots (DVCLive
    curves, histograms, eval/*.csv), eval.md and its PNGs. Else `git status` after `make run` on a fresh
    clone lists them untracked, `dvc plots diff` has no baseline, and a clone plus `dvc pull` finds
    sft, reward_model, pairs, dpo and evaluate changed (DVC can restore these outs from nowhere)."""
    outs = _rendered_outs(tmp_path, extra_rounds=0)
    tracked = subprocess.run(["git", "ls-files", "reports"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()  # fmt: skip
    missing = [
        p
        for p, cached in outs.items()
        if not cached and not any(t == p or t.startswith(f"{p}/") for t in tracked)
    ]
    assert missing == [], "commit these outs of the baseline run with dvc.lock:\n" + "\n".join(missing)
