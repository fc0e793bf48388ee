"""Checkpoints of the two training stages, reused only under an unchanged fingerprint.

The accelerate loop (dpo) writes ``<checkpoints>/step-<k>/``: ``state/`` (accelerate's ``save_state``:
model, optimizer; sharded under FSDP/DeepSpeed), ``rng_<process>.safetensors`` (torch RNG of each
process) and ``trainer_state.json`` (step, scheduler, fingerprint, the logged points). Each is
written to a temporary folder and renamed, and only the newest is kept; one whose fingerprint
differs from the run's is stale and deleted before training starts.

transformers' Trainer (sft) writes its own ``checkpoint-<k>/`` folders; the run's fingerprint sits
next to them in ``fingerprint.json``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignpipe.artifacts.io import write_json
from alignpipe.training.fingerprint import describe_change
from alignpipe.training.metrics import Point

STATE_FILE = "trainer_state.json"
FINGERPRINT_FILE = "fingerprint.json"
_TRAINER_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    for path in root.glob("step-*"):
        if path.is_dir() and path.name[5:].isdigit() and (path / STATE_FILE).exists():
            found.append((int(path.name[5:]), path))
    return sorted(found)


def find_checkpoint(root: Path, fp: dict[str, Any], section: str) -> Path | None:
    """The newest checkpoint with fingerprint ``fp``; stale ones (other fingerprints) are deleted."""
    latest = None
    for _, path in _checkpoints(root):
        stored = json.loads((path / STATE_FILE).read_text()).get("fingerprint")
        stored = stored if isinstance(stored, dict) else None  # None: written before fingerprints were dicts
        if stored == fp:
            latest = path
        else:
            print(f"{path}: stale checkpoint ({describe_change(stored, fp, section)}), deleted", flush=True)
            shutil.rmtree(path, ignore_errors=True)
    return latest


def save_checkpoint(
    accelerator: Any,
    root: Path,
    step: int,
    fp: dict[str, Any],
    scheduler: Any,
    reference: nn.Module | None = None,
    history: list[Point] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/step-<step>`` atomically (every process saves its shard and RNG), keep only it.

    ``reference``: a live reference that training changes (TR-DPO), saved with the policy;
    ``history``: the points logged so far (replayed into the curves on resume); ``extra``: more state
    of the loop (JSON; :func:`checkpoint_extra` reads it back).
    """
    from safetensors.torch import save_file, save_model

    target = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"), safe_serialization=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / f"rng_{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if reference is not None:
            save_model(reference, str(tmp / "reference.safetensors"))
        state = {
            "step": step,
            "fingerprint": fp,
            "scheduler": scheduler.state_dict(),
            "log_history": history or [],
            "extra": extra or {},
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for _, old in _checkpoints(root):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(accelerator: Any, path: Path, scheduler: Any, reference: nn.Module | None = None) -> int:
    """Restore model, optimizer, scheduler, RNG (and a TR-DPO reference) from ``path``; return its step."""
    from safetensors.torch import load_file, load_model

    accelerator.load_state(str(path / "state"))
    state = json.loads((path / STATE_FILE).read_text())
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / f"rng_{accelerator.process_index}.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if reference is not None and (path / "reference.safetensors").exists():
        load_model(
            reference, str(path / "reference.safetensors"), device=str(next(reference.parameters()).device)
        )
    return int(state["step"])


def checkpoint_history(path: Path) -> list[Point]:
    """The points logged up to the checkpoint at ``path`` (see alignpipe.training.metrics)."""
    state = json.loads((path / STATE_FILE).read_text())
    return [(int(step), metrics) for step, metrics in state.get("log_history", [])]


def checkpoint_extra(path: Path) -> dict[str, Any]:
    """The ``extra`` state saved with the checkpoint at ``path`` (empty for older checkpoints)."""
    return json.loads((path / STATE_FILE).read_text()).get("extra") or {}


# --- transformers' Trainer checkpoints (sft) -------------------------------------------------------


def complete_checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-N`` folders whose trainer state was written (the Trainer writes it last), oldest first."""
    found = []
    for path in folder.iterdir() if folder.is_dir() else []:
        match = _TRAINER_CHECKPOINT.match(path.name)
        if match and path.is_dir():
            try:
                json.loads((path / STATE_FILE).read_text())
            except (OSError, ValueError):
                continue
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resume_point(folder: Path, current: dict[str, Any], section: str, writer: bool = True) -> str | None:
    """The checkpoint to resume from, or None after clearing stale ones (``writer``: this process may delete)."""
    try:
        stored = json.loads((folder / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        stored = None
    complete = complete_checkpoints(folder)
    if stored == current and complete:
        print(
            f"{section}: resuming from {complete[-1]} (params, inputs and process count unchanged)",
            flush=True,
        )
        return str(complete[-1])
    if writer:
        stale = [p for p in folder.iterdir() if _TRAINER_CHECKPOINT.match(p.name)] if folder.is_dir() else []
        if stale:
            print(
                f"{section}: {describe_change(stored, current, section)}: "
                f"deleting {len(stale)} stale checkpoint(s) in {folder}"
            )
        shutil.rmtree(folder, ignore_errors=True)
        write_json(current, folder / FINGERPRINT_FILE)
    return None


def checkpoint_step(path: str | Path) -> int:
    match = _TRAINER_CHECKPOINT.match(Path(path).name)
    assert match, path
    return int(match.group(1))
