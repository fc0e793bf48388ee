"""Helpers of tests/test_pairs.py and tests/test_unpaired.py: hand-built scored rows and the pairs
stage's input folder, run in-process or as the stage script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import write_parquet
from alignpipe.pairs.stage import pairs
from alignpipe.params import PairsParams

ROOT = Path(__file__).resolve().parents[1]
# Distinct enough that no pair is near-identical (difflib ratio well under 0.95).
TEXTS = ["alpha one", "bravo two two", "charlie three", "delta four four four", "echo", "foxtrot six"]


def prompt(pid: str) -> dict:
    return {"prompt_id": pid, "prompt": [{"role": "user", "content": f"question {pid}"}], "meta": None}


def row(pid: str, idx: int, reward: float, text: str | None = None, n_tokens: int = 5, finish: str = "stop"):
    return {
        "prompt_id": pid,
        "sample_idx": idx,
        "completion": TEXTS[idx] if text is None else text,
        "n_tokens": n_tokens,
        "finish_reason": finish,
        "logprob": None,
        "backend": "hf",
        "seed": 0,
        "reward": reward,
        "reward_details": "{}",
    }


def table(rewards: list[float], pid: str = "p1", **kw) -> list[dict]:
    return [row(pid, i, r, **kw) for i, r in enumerate(rewards)]


def user_pair(pair_id: str, question: str, chosen: str = "a", rejected: str = "b") -> dict:
    """A row of prepared/preferences.parquet (a user's pair) with one user turn."""
    return {
        "pair_id": pair_id,
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def write_inputs(
    root: Path,
    scored: list[dict],
    *,
    prefs: list[dict] | None = None,
    user: list[dict] | None = None,
    meta: dict[str, Any] | None = None,
) -> None:
    """``root/scored.parquet`` and ``root/prepared/prompts.parquet`` (one prompt per prompt_id of
    ``scored``, with ``meta``), plus the user files ``prepared/preferences.parquet`` (``prefs``) and
    ``prepared/unpaired.parquet`` (``user``) when given."""
    (root / "prepared").mkdir(parents=True, exist_ok=True)
    write_parquet(scored, root / "scored.parquet", schema.SCORED)
    prompts = [{**prompt(p), "meta": meta} for p in sorted({r["prompt_id"] for r in scored})]
    write_parquet(prompts, root / "prepared/prompts.parquet", schema.PROMPTS)
    if prefs is not None:
        write_parquet(prefs, root / "prepared/preferences.parquet", schema.PREFERENCES)
    if user is not None:
        write_parquet(user, root / "prepared/unpaired.parquet", schema.UNPAIRED_PREPARED)


def run_pairs(root: Path, params: PairsParams, **kw: Any) -> dict[str, Any]:
    """The pairs stage in-process on :func:`write_inputs`'s folder: pairs to ``root/pairs``, the report
    to ``root/reports/pairs.json``, plots to ``root/reports/pairs`` (``kw``: plots_dir, unpaired_dir)."""
    kw.setdefault("plots_dir", root / "reports/pairs")
    return pairs(root / "scored.parquet", root / "prepared/prompts.parquet", root / "prepared",
                 root / "pairs", root / "reports/pairs.json", params=params, **kw)  # fmt: skip


def run_stage_script(root: Path) -> subprocess.CompletedProcess:
    """``stages/pairs.py`` in ``root`` (its params.yaml, :func:`write_inputs`'s files), as dvc runs it."""
    cmd = [sys.executable, str(ROOT / "stages/pairs.py"), "--scored", "scored.parquet", "--prompts",
           "prepared/prompts.parquet", "--prepared", "prepared", "--out-dir", "pairs", "--unpaired-dir",
           "unpaired", "--report", "pairs.json", "--plots-dir", "plots"]  # fmt: skip
    return subprocess.run(
        cmd, cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src")}
    )
