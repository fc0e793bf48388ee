"""Non-finite values stop SFT with the step and the rows, and stay visible in its summary (issue 16, item 2).

DPO's stop is tested in tests/test_dpo.py (test_non_finite_loss_names_step_and_pair_...).
Runs use the tiny model of ``alignpipe.testing``: 10 rows in batches of 4 make 3 steps an epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from sft_helpers import sft_paths
from transformers import TrainerCallback

from alignpipe.artifacts.io import write_json
from alignpipe.params import SftParams
from alignpipe.sft.data import LengthGroupedSampler, SftData, encode_rows
from alignpipe.sft.stage import SftPaths, run_sft, summarize, training_arguments
from alignpipe.testing import tiny_tokenizer
from alignpipe.training.checkpoints import complete_checkpoints
from alignpipe.training.loop import NonFiniteError

ROWS = [
    {"id": f"sft-{i}", "prompt": [{"role": "user", "content": "Describe the ocean" + " now" * (i % 3)}],
     "completion": [{"role": "assistant", "content": "The ocean is vast." + " Waves." * i}], "meta": None}
    for i in range(10)
]  # fmt: skip


def paths_for(tmp_path: Path, model_dir: Path) -> SftPaths:
    return sft_paths(tmp_path, model_dir, ROWS)


def params(**overrides) -> SftParams:
    fields = dict(
        max_steps=5, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=2, dtype="float32"
    )
    return SftParams(**(fields | overrides))


def batch_rows(step: int) -> list[str]:
    """The row ids of optimizer step ``step`` (1-based, first epoch), as the stage's sampler orders them."""
    data = encode_rows(tiny_tokenizer(), ROWS, 256)
    sampler = LengthGroupedSampler([len(e.input_ids) for e in data.examples], 4, seed=0)
    return [data.examples[i].row_id for i in sampler.batches()[step - 1]]


class PoisonWeights(TrainerCallback):
    """Sets one weight to NaN as step ``step`` begins (after the checkpoint of the step before)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step - 1:
            with torch.no_grad():
                model.get_input_embeddings().weight[:, 0] = float("nan")


class InfGradient(TrainerCallback):
    """Makes one parameter's gradient infinite during step ``step``; the loss stays finite."""

    def __init__(self, step: int) -> None:
        self.step, self.handle = step, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step - 1:
            weight = model.get_input_embeddings().weight
            self.handle = weight.register_hook(lambda grad: grad * float("inf"))
        elif self.handle is not None:
            self.handle.remove()


def test_nan_loss_stops_sft_naming_step_and_rows_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    """Before: SFT trained on through NaN losses and wrote a NaN model (no stop)."""
    paths = paths_for(tmp_path, tiny_model_dir)
    with pytest.raises(NonFiniteError) as info:
        run_sft(params(), paths, callbacks=[PoisonWeights(3)])
    message = str(info.value)
    assert message.startswith("sft: non-finite loss at step 3; batch rows: ")
    assert set(message.split("batch rows: ")[1].split(" (")[0].split(", ")) == set(batch_rows(3))
    assert not paths.out.exists()
    (checkpoint,) = complete_checkpoints(paths.checkpoints)
    assert checkpoint.name == "checkpoint-2"
    assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model.safetensors")).values())
    summary = run_sft(params(), paths)  # the rerun resumes from the good checkpoint
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 5


def test_inf_gradient_with_a_finite_loss_stops_sft(tmp_path, tiny_model_dir):
    paths = paths_for(tmp_path, tiny_model_dir)
    with pytest.raises(NonFiniteError) as info:
        run_sft(params(save_steps=1), paths, callbacks=[InfGradient(2)])
    message = str(info.value)
    assert message.startswith("sft: non-finite gradient at step 2; batch rows: ")
    assert set(message.split("batch rows: ")[1].split(" (")[0].split(", ")) == set(batch_rows(2))
    assert [p.name for p in complete_checkpoints(paths.checkpoints)] == ["checkpoint-1"]


def test_summary_keeps_a_nan_loss_visible(tmp_path):
    """Before: NaN losses were dropped, so a diverged run reported the last finite loss as final_loss."""
    history = [{"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 2}, {"loss": float("nan"), "step": 3}]
    state = SimpleNamespace(log_history=history, global_step=3, epoch=1.0, num_input_tokens_seen=30)
    summary = summarize(state, SftData(rows=1), 1.0, 1.0, 0, None)
    assert summary["final_loss"] == "nan" and summary["train_loss"] == "nan"
    assert summary["non_finite_losses"] == 1
    write_json(summary, tmp_path / "metrics.json")  # JSON without NaN literals still says it
    assert json.loads((tmp_path / "metrics.json").read_text())["final_loss"] == "nan"
    finite = summarize(
        SimpleNamespace(**{**vars(state), "log_history": history[:2]}), SftData(rows=1), 1, 1, 0, None
    )
    assert finite["final_loss"] == 1.5 and finite["train_loss"] == 1.75 and finite["non_finite_losses"] == 0


def test_the_trainer_does_not_paper_over_nan_losses(tmp_path):
    """transformers' logging_nan_inf_filter replaces a NaN loss by the running mean in the log."""
    args = training_arguments(params(), tmp_path / "ckpt")
    assert args.logging_nan_inf_filter is False
