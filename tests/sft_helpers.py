"""Scaffolding of the sft stage's tests (tests/test_sft.py, tests/test_vlm_sft_stage.py,
tests/test_nonfinite.py): the stage's paths over rows of one's own, a short run, a folder's
weights, and a simulated kill."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from alignpipe.artifacts.io import write_parquet
from alignpipe.artifacts.schema import SFT
from alignpipe.params import SftParams
from alignpipe.sft.stage import SftPaths


def sft_paths(tmp_path: Path, model_dir: Path, rows: list[dict], row_schema: pa.Schema = SFT) -> SftPaths:
    """The stage's paths under ``tmp_path``, its data ``rows`` written as ``sft.parquet``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_parquet(rows, tmp_path / "sft.parquet", row_schema)
    return SftPaths(
        model_dir, tmp_path / "sft.parquet", tmp_path / "out", tmp_path / "ckpt", tmp_path / "reports"
    )


def quick(**overrides) -> SftParams:
    """A few steps on a tiny model: 6 steps of batch 4, a log and a checkpoint every 2."""
    fields = dict(
        max_steps=6, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, logging_steps=2, save_steps=2
    )
    return SftParams(**(fields | overrides))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


class StopAt(TrainerCallback):
    """Simulates a crash: raises at the end of optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {state.global_step}")
