"""The ``round_prompts`` stage: the train prompts round k >= 2 samples on (``rounds.prompts``).

- ``same``: every train prompt of ``data/prepared/prompts.parquet``, in its order (round 1's prompts).
- ``fresh``: a deterministic subset of ``rounds.fresh_fraction`` of them (at least one): the prompts
  whose ``sha256("<round>:<prompt_id>")`` ranks first, so each round draws a different subset, the same
  on every rerun, and adding round 3 leaves round 2's alone. Round 1 (the default DAG's ``generate``)
  samples every prompt, so a fresh round's prompts are a new mix of the pool, not prompts no earlier
  round saw; for unseen prompts per round, give the pool more prompts than one round needs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import ArtifactError, read_parquet, write_parquet
from alignpipe.params import RoundsParams


def fresh_subset(rows: list[dict[str, Any]], round_key: str, fraction: float) -> list[dict[str, Any]]:
    """``fraction`` of ``rows`` (at least one), ranked by a hash of the round and the prompt id; pool order kept."""

    def rank(row: dict[str, Any]) -> str:
        return hashlib.sha256(f"{round_key}:{row['prompt_id']}".encode()).hexdigest()

    keep = {id(r) for r in sorted(rows, key=rank)[: max(1, math.ceil(fraction * len(rows)))]}
    return [r for r in rows if id(r) in keep]


@dataclass(frozen=True)
class RoundPromptsPaths:
    """Where the stage reads and writes (``dvc.yaml`` passes them on the command line)."""

    round_key: str  # round-k, the rounds.extra key
    prompts: Path  # data/prepared/prompts.parquet
    out: Path  # data/round-k/prompts.parquet


def run(params: RoundsParams, paths: RoundPromptsPaths) -> dict[str, Any]:
    """The stage: write the round's prompts; returns a summary (prompts of the pool and of the round)."""
    rows = read_parquet(paths.prompts, schema.PROMPTS)
    if not rows:
        raise ArtifactError(f"{paths.prompts}: no train prompts")
    chosen = rows if params.prompts == "same" else fresh_subset(rows, paths.round_key, params.fresh_fraction)
    write_parquet(chosen, paths.out, schema.PROMPTS)
    summary = {"round": paths.round_key, "prompts": params.prompts, "pool": len(rows), "kept": len(chosen)}
    print(f"round_prompts {paths.round_key}: {len(chosen)} of {len(rows)} prompts ({params.prompts})")
    return summary
