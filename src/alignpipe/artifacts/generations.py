"""The generations format (``data/generations/``), written by ``generate`` and read by ``score``.

    chunk-00000.parquet ...  the samples of prompts [k*C, (k+1)*C) (C = generate.chunk_prompts),
                             schema GENERATIONS, each tagged with the run fingerprint
    manifest.json            written once every chunk is there; readers require it

A reader gets every sample of a finished run, or an error that says what is missing: an
unfinished run has no manifest, a chunk from other settings carries another fingerprint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from alignpipe.artifacts.io import ArtifactError, atomic_path, read_json, read_parquet, write_json
from alignpipe.artifacts.schema import GENERATIONS

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FINGERPRINT_KEY = b"alignpipe.fingerprint"


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int
    stop: int

    @property
    def path_name(self) -> str:
        return f"chunk-{self.index:05d}.parquet"


def plan_chunks(n_prompts: int, chunk_prompts: int) -> list[Chunk]:
    """Consecutive chunks of ``chunk_prompts`` prompts (the last one may be shorter)."""
    return [
        Chunk(k, s, min(s + chunk_prompts, n_prompts))
        for k, s in enumerate(range(0, n_prompts, chunk_prompts))
    ]


def chunk_fingerprint(path: Path) -> str | None:
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError):
        return None
    value = metadata.get(FINGERPRINT_KEY)
    return value.decode() if value else None


def prune_stale(out_dir: Path, fp: str) -> set[str]:
    """Delete chunk files (and a manifest) from other settings; return the names of valid chunks."""
    manifest = out_dir / MANIFEST
    if manifest.exists() and _manifest_fingerprint(manifest) != fp:
        manifest.unlink()
    valid = set()
    for path in sorted(out_dir.glob("chunk-*.parquet")):
        if chunk_fingerprint(path) == fp:
            valid.add(path.name)
        else:
            path.unlink()
    return valid


def _manifest_fingerprint(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def write_chunk(path: Path, rows: list[dict[str, Any]], fp: str) -> None:
    table = pa.Table.from_pylist(rows, schema=GENERATIONS.with_metadata({FINGERPRINT_KEY: fp.encode()}))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_manifest(out_dir: Path, chunks: Sequence[Chunk], fp: str, **facts: Any) -> None:
    """Mark the run finished: ``facts`` must hold ``prompts`` and ``n`` (what readers check)."""
    manifest = {"fingerprint": fp, "format": FORMAT_VERSION, **facts, "files": [c.path_name for c in chunks]}
    write_json(manifest, out_dir / MANIFEST)


def read_generations(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All samples of a finished generate run (every shard), checked for completeness.

    Rows come in prompt order, then sample_idx; each prompt has exactly ``n`` samples.
    """
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).exists():
        present = len(list(out_dir.glob("chunk-*.parquet"))) if out_dir.is_dir() else 0
        raise ArtifactError(
            f"{out_dir}: incomplete, no {MANIFEST} ({present} chunk file(s) present); finish every shard "
            "(stages/generate.py --shard i) or run `dvc repro generate`"
        )
    manifest = read_json(out_dir / MANIFEST)
    rows: list[dict[str, Any]] = []
    for name in manifest["files"]:
        path = out_dir / name
        if not path.exists():
            raise ArtifactError(f"{path}: missing (listed in {MANIFEST}); run `dvc repro generate`")
        if chunk_fingerprint(path) != manifest["fingerprint"]:
            raise ArtifactError(f"{path}: from another run (fingerprint differs from {MANIFEST})")
        rows += read_parquet(path, GENERATIONS)
    _check_complete(rows, manifest, out_dir)
    return rows


def _check_complete(rows: list[dict[str, Any]], manifest: dict[str, Any], out_dir: Path) -> None:
    n, n_prompts = manifest["n"], manifest["prompts"]
    keys = {(r["prompt_id"], r["sample_idx"]) for r in rows}
    prompts = {r["prompt_id"] for r in rows}
    if len(rows) != n * n_prompts or len(keys) != len(rows) or len(prompts) != n_prompts:
        raise ArtifactError(
            f"{out_dir}: expected {n_prompts} prompts x {n} samples, found {len(rows)} rows "
            f"({len(keys)} distinct, {len(prompts)} prompts)"
        )
    if any(not 0 <= r["sample_idx"] < n for r in rows):
        raise ArtifactError(f"{out_dir}: sample_idx outside 0..{n - 1}")
