"""The sft stage's Trainer plumbing, shared by its text and VLM paths: training arguments, the
length-grouped Trainer that NonFiniteStop watches, the DVCLive curves and the metrics summary."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from alignpipe.core.models import cpu_only, deepspeed_launch
from alignpipe.params import SftParams
from alignpipe.sft.data import LengthGroupedSampler, SftData
from alignpipe.sft.nonfinite import NonFiniteStop
from alignpipe.training.checkpoints import checkpoint_step
from alignpipe.training.metrics import MetricsLog
from alignpipe.training.precision import compute_dtype

# DVCLive names of the Trainer's log keys (reports/sft/plots/metrics/train/*.tsv).
LIVE_METRICS = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_second": "train/tokens_per_second",
}


def checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """transformers 5.20 renamed ``gradient_checkpointing`` to ``activation_checkpointing``; vLLM's
    environment (.venv-vllm) pins transformers < 5.20, so both names are served."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def training_arguments(params: SftParams, checkpoints: Path) -> TrainingArguments:
    dtype = compute_dtype(params)
    return TrainingArguments(
        output_dir=str(checkpoints),
        use_cpu=cpu_only() and not deepspeed_launch(),  # as core.models.accelerator_kwargs
        ddp_backend="gloo" if cpu_only() and deepspeed_launch() else None,
        per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum,
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=min(params.warmup_ratio, 0.999999),  # a float < 1 is a ratio of the total steps
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,  # fp32 weights, fp16 autocast with a grad scaler
        **checkpointing_arguments(params.gradient_checkpointing),
        logging_steps=params.logging_steps,
        logging_first_step=True,  # a curve point even when the run is shorter than logging_steps
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=1,  # the resume point; older ones are deleted once a newer one is complete
        seed=params.seed,
        data_seed=params.seed,
        report_to="none",
        logging_nan_inf_filter=False,  # a NaN loss stays NaN in the log (NonFiniteStop stops the run anyway)
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Tokens trained through: a packed batch has no padding, a padded one counts its attention mask.
        include_num_input_tokens_seen="all" if params.packing else "non_padding",
    )


class SftTrainer(Trainer):
    """The Trainer with a length-grouped, resumable batch order, whose losses NonFiniteStop sees."""

    def __init__(
        self, *args: Any, sampler: LengthGroupedSampler, non_finite: NonFiniteStop, **kwargs: Any
    ) -> None:
        self._length_sampler = sampler
        self._non_finite = non_finite
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset: Any = None) -> LengthGroupedSampler:
        return self._length_sampler

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        row_ids = inputs.pop("row_ids", [])
        out = super().compute_loss(model, inputs, *args, **kwargs)
        if model.training:
            self._non_finite.record(out[0] if isinstance(out, tuple) else out, row_ids)
        return out


class LiveCallback(TrainerCallback):
    """Training curves into DVCLive at ``x = optimizer step``, plus tokens/s in the log history.

    On resume, the curves logged before the checkpoint are replayed from its
    trainer state, so the plots cover the whole run.
    """

    def __init__(self, metrics_dir: Path) -> None:
        self.metrics_dir = metrics_dir
        self.live: Any = None
        self.begin_tokens = 0
        self._last = (0.0, 0)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begin_tokens = state.num_input_tokens_seen
        self._last = (time.perf_counter(), state.num_input_tokens_seen)
        if state.is_world_process_zero:
            self.live = MetricsLog(self.metrics_dir, True, [p for e in state.log_history if (p := _point(e))])

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        entry = state.log_history[-1] if state.log_history else {}
        if "loss" in entry and now > self._last[0]:
            entry["tokens_per_second"] = round((tokens - self._last[1]) / (now - self._last[0]), 1)
        self._last = (now, tokens)
        if self.live is not None and (point := _point(entry)):
            self.live.log(*point)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.live is not None:
            self.live.close()


def _point(entry: dict[str, Any]) -> tuple[int, dict[str, float]] | None:
    """A Trainer log entry as a curve point under the DVCLive names (None: not a training log)."""
    if "loss" not in entry:
        return None
    metrics = {
        name: entry[key] for key, name in LIVE_METRICS.items() if key in entry and math.isfinite(entry[key])
    }
    return entry["step"], metrics


def summarize(
    state: Any,
    data: SftData,
    wall_seconds: float,
    train_seconds: float,
    begin_tokens: int,
    resumed_from: str | None,
) -> dict[str, Any]:
    """``reports/sft/metrics.json``: loss, steps, tokens, what max_length cost, time, throughput.

    A non-finite logged loss stays visible: the losses then read ``"nan"``/``"inf"`` (JSON has no NaN).
    """
    losses = [float(e["loss"]) for e in state.log_history if "loss" in e]
    return {
        "enabled": True,
        "train_loss": _number(sum(losses) / len(losses)) if losses else None,  # mean of the logged losses
        "final_loss": _number(losses[-1]) if losses else None,
        "non_finite_losses": sum(not math.isfinite(x) for x in losses),
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 3),
        "rows": data.rows,
        "sequences": len(data.examples),
        "tokens": state.num_input_tokens_seen,  # prompt + completion tokens trained through, whole run
        "completion_tokens_per_epoch": data.completion_tokens,
        "truncated": data.truncated,
        "truncation": data.truncation.as_dict(),  # rows cut, by what was cut (prompt, completion, both)
        "dropped": data.dropped,
        "wall_seconds": round(wall_seconds, 1),
        "tokens_per_second": round(
            (state.num_input_tokens_seen - begin_tokens) / max(train_seconds, 1e-9), 1
        ),
        "resumed_from_step": checkpoint_step(resumed_from) if resumed_from else None,
    }


def _number(value: float) -> float | str:
    """``value`` rounded, or its name (``"nan"``, ``"inf"``) when not finite, so it stays visible."""
    return round(value, 4) if math.isfinite(value) else str(value)
