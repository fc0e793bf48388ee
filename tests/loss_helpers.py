"""Helpers of tests/test_losses.py and tests/test_kto_loss.py: the sigmoid, random per-token log-probs,
and a stub trainer that runs TRL's own ``_compute_loss`` (TRL 1.16) on them, for parity tests."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

COLUMNS = 13  # column 0 is the prompt; completions of up to 12 tokens


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def completion_log_probs(lengths: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, per_token), (len(lengths), COLUMNS) each: row i covers tokens 1..lengths[i], where its
    log-probs are uniform in [-3, -1] (float64); zero elsewhere."""
    positions = torch.arange(COLUMNS)
    mask = (positions >= 1) & (positions <= lengths[:, None])
    noise = torch.rand(len(lengths), COLUMNS, generator=g, dtype=torch.float64)
    return mask, torch.where(mask, -1 - 2 * noise, 0.0)


def trl_trainer(module: str, name: str) -> Any:
    """TRL's trainer class ``name`` from ``module``; skipped (failed under CI=true) without TRL or
    where the class has no ``_compute_loss``."""
    cls = getattr(pytest.importorskip(module), name)
    if not hasattr(cls, "_compute_loss"):
        pytest.skip(f"this TRL has no {name}._compute_loss (the harness follows TRL 1.16)")
    return cls


def trl_compute_loss(
    trainer: Any,
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    outputs: dict[str, Any] | None = None,
    inputs: dict[str, Any],
    **fields: Any,
) -> tuple[torch.Tensor, Any]:
    """(loss, the train metrics TRL logged) of ``trainer._compute_loss`` on a stub trainer and model.

    The stub model returns ``per_token`` (zero outside the completion ``mask``) as its log-probs, so
    TRL's sums and token counts are ours; ``outputs`` adds to the model's outputs, ``inputs`` to the
    batch (references as precomputed, as in our ref_logps stage), ``fields`` to the trainer."""
    out = SimpleNamespace(
        log_probs=per_token[:, 1:],
        entropy=torch.zeros_like(per_token[:, 1:]),
        mean_logits=torch.zeros_like(per_token[:, 1:]),
        **(outputs or {}),
    )
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t),
        precompute_ref_logps=True, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        **fields,
    )  # fmt: skip
    batch = {
        "input_ids": torch.zeros_like(mask, dtype=torch.long),
        "attention_mask": torch.ones_like(mask, dtype=torch.long),
        "completion_mask": mask.long(),
        **inputs,
    }
    loss = trainer._compute_loss(stub, lambda **_: out, batch, False)
    return loss, stub._metrics["train"]
