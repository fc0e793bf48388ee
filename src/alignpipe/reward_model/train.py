"""Training the reward model: the Bradley-Terry loss and a resumable loop on accelerate.

The model is ``AutoModelForSequenceClassification`` with one output, started from the SFT or the
base model (its score head is new). A step scores the chosen and the rejected conversations of
``batch_size`` pairs in one forward pass (chosen rows first, as TRL's ``RewardTrainer``) and
minimises ``-logsigmoid(r_c - r_r - m)`` (``m``: Llama 2's margin, when ``reward_model.margin``),
plus TRL's ``center_rewards_coefficient * mean((r_c + r_r)^2)`` when set.

Resume: ``checkpoints/reward/step-<k>`` (``alignpipe.training.checkpoints``) under the run's
fingerprint; the batch order is a function of the seed and the epoch, so a resumed run skips the
steps done and ends where an uninterrupted one ends.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignpipe.core.models import check_model_folder, enable_activation_checkpointing
from alignpipe.params import RewardModelParams
from alignpipe.rewards.hf import pad_for_pooling
from alignpipe.training.checkpoints import save_checkpoint
from alignpipe.training.loop import NonFiniteError, Window
from alignpipe.training.metrics import MetricsLog
from alignpipe.training.peft import lora_config
from alignpipe.training.precision import compute_dtype, weights_dtype
from alignpipe.training.timed_save import SaveTimer

Encoded = tuple[list[int], list[int], float]  # chosen ids, rejected ids, margin


def bradley_terry_loss(
    chosen: Tensor, rejected: Tensor, margin: Tensor | None = None, center: float | None = None
) -> Tensor:
    """Mean of ``-logsigmoid(r_c - r_r - margin)`` over the pairs, plus ``center * mean((r_c + r_r)^2)``."""
    diff = chosen - rejected if margin is None else chosen - rejected - margin
    loss = -F.logsigmoid(diff).mean()
    if center is not None:
        loss = loss + center * torch.mean((chosen + rejected) ** 2)
    return loss


def load_model(params: RewardModelParams, model_dir: Path, pad_id: int) -> nn.Module:
    """One-output sequence classifier on ``model_dir`` (new score head); LoRA with the head trained fully."""
    from transformers import AutoModelForSequenceClassification

    check_model_folder(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=1, dtype=getattr(torch, weights_dtype(params)), use_safetensors=True
    )
    model.config.pad_token_id = pad_id
    if params.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if params.peft.enabled:
        from peft import get_peft_model

        if params.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, lora_config(params.peft, task_type="SEQ_CLS"))
    return model


def step_batches(n_pairs: int, params: RewardModelParams) -> list[list[list[int]]]:
    """Every optimizer step's micro-batches of pair indices: epoch ``e`` shuffles with ``seed + e``;
    ``max_steps`` cuts the list or repeats epochs until it is reached."""
    per_step = params.batch_size * params.grad_accum
    steps: list[list[list[int]]] = []
    epoch = 0
    while True:
        order = list(range(n_pairs))
        random.Random(params.seed + epoch).shuffle(order)
        for start in range(0, n_pairs, per_step):
            chunk = order[start : start + per_step]
            steps.append([chunk[i : i + params.batch_size] for i in range(0, len(chunk), params.batch_size)])
        epoch += 1
        done = epoch >= params.epochs if params.max_steps < 0 else len(steps) >= params.max_steps
        if done:
            return steps if params.max_steps < 0 else steps[: params.max_steps]


@dataclass
class RewardRun:
    acc: Any  # accelerate.Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    pairs: list[Encoded]
    pad_id: int
    params: RewardModelParams


def mixed_precision(params: RewardModelParams) -> str:
    dtype = compute_dtype(params)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def scores(run: RewardRun, rows: list[list[int]]) -> Tensor:
    """The model's reward of each row (pooled at its last token, as ``reward.kind: hf`` reads it)."""
    input_ids, attention_mask = pad_for_pooling(run.acc.unwrap_model(run.model), rows, run.pad_id)
    device = run.acc.device
    out = run.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    return out.logits[:, 0].float()


def train_step(run: RewardRun, step: int, micros: list[list[int]]) -> dict[str, float]:
    """One optimizer step over ``micros``; returns the sums of loss, correct pairs and margins."""
    p = run.params
    total = sum(len(m) for m in micros)
    sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
    for micro in micros:
        chosen = [run.pairs[i][0] for i in micro]
        rejected = [run.pairs[i][1] for i in micro]
        r_c, r_r = torch.chunk(scores(run, chosen + rejected), 2)
        margin = torch.tensor([run.pairs[i][2] for i in micro], device=r_c.device) if p.margin else None
        loss = bradley_terry_loss(r_c, r_r, margin, p.center_rewards_coefficient)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"reward_model: non-finite loss at step {step + 1}")
        run.acc.backward(loss * len(micro) / total)
        sums["loss"] += loss.item() * len(micro)
        sums["accuracy"] += (r_c > r_r).float().sum().item()
        sums["margin"] += (r_c - r_r).sum().item()
    run.acc.clip_grad_norm_(run.model.parameters(), p.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return sums


def train(run: RewardRun, start: int, log: MetricsLog, checkpoints: Path, fp: dict[str, Any]) -> int:
    """Steps ``start..`` of the schedule, logging every ``logging_steps``, saving every ``save_steps``
    and once ``save_minutes`` have passed since the last save."""
    from tqdm.auto import tqdm

    p = run.params
    steps = step_batches(len(run.pairs), p)
    window, saver = Window.empty(), SaveTimer(p.save_minutes)
    run.model.train()
    for step in tqdm(
        range(start, len(steps)), desc="reward_model", unit="step", initial=start, total=len(steps)
    ):
        micros = steps[step]
        window.add(train_step(run, step, micros), sum(len(m) for m in micros), 0, 0.0)
        done = step + 1
        if done % p.logging_steps == 0 or done == len(steps) or done == 1:
            metrics = {f"train/{k}": v / max(window.pairs, 1) for k, v in window.sums.items()}
            metrics["train/learning_rate"] = run.scheduler.get_last_lr()[0]
            log.log(done, {k: v for k, v in metrics.items() if math.isfinite(v)})
            window = Window.empty()
        if (done % p.save_steps == 0 or saver.due()) and done < len(steps):
            save_checkpoint(run.acc, checkpoints, done, fp, run.scheduler, history=log.history)
            saver.restart()
    return len(steps)
