"""The one fingerprint of a training run: what decides the trained weights.

Both training stages reuse a checkpoint only when the fingerprint it was saved with equals the
current run's: the stage's params (less the keys that only change how a run is observed), the
contents of its inputs, and the number of processes (the data order and each step's batch split
depend on it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alignpipe.params import TrainParams

# Keys that change how a run is observed, not where it goes: checkpoints stay valid when they change.
NOT_FINGERPRINTED = frozenset(
    {"enabled", "launcher", "logging_steps", "eval_steps", "save_steps", "save_minutes"}
)


def fingerprint(params: TrainParams, inputs: Mapping[str, Path], world_size: int) -> dict[str, Any]:
    """``{"params", "inputs": {name: sha256}, "world_size"}``; ``inputs`` are files or folders."""
    return {
        "params": params.model_dump(mode="json", exclude=set(NOT_FINGERPRINTED)),
        "inputs": {name: sha256_tree(path) for name, path in inputs.items()},
        "world_size": world_size,
    }


def sha256_tree(path: Path) -> str:
    """SHA-256 of a file, or of every file under a folder with its relative name (sorted)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    root = path if path.is_dir() else path.parent
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def describe_change(stored: dict[str, Any] | None, current: dict[str, Any], section: str) -> str:
    """Why stored checkpoints cannot be resumed, e.g. ``sft.learning_rate changed (0.0001 -> 0.0002)``."""
    if stored is None:
        return "no fingerprint next to the checkpoints"
    reasons = []
    old, new = stored.get("params", {}), current["params"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            reasons.append(f"{section}.{key} changed ({old.get(key)!r} -> {new.get(key)!r})")
    old_inputs = stored.get("inputs", {})
    reasons += [
        f"{name} changed" for name, digest in current["inputs"].items() if old_inputs.get(name) != digest
    ]
    if stored.get("world_size") != current["world_size"]:
        reasons.append(f"process count changed ({stored.get('world_size')} -> {current['world_size']})")
    return "; ".join(reasons) or "no complete checkpoint"
