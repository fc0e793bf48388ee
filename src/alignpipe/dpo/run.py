"""What one dpo training run holds, and the pieces of a step on pairs: the per-pair loss of
``dpo.loss_type``, the summed metrics, the policy and reference log-probs of a batch.
(:mod:`alignpipe.dpo.stage` runs the loop; :mod:`alignpipe.dpo.kto` the step on unpaired examples.)"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from alignpipe.core import losses
from alignpipe.core.kto import unpaired_losses
from alignpipe.core.logprobs import CompletionScorer, PairLogps, collate_pairs, pair_logps
from alignpipe.core.objective import combined_loss, preference_loss
from alignpipe.dpo.data import DpoPairs
from alignpipe.params import DpoParams
from alignpipe.training.loop import NonFiniteError
from alignpipe.vision.logprobs import collate_vision_pairs, vision_pair_logps

# Per-pair quantities summed over a step (then divided by its pairs): the names DVCLive logs.
SUMMED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
          "logps/chosen", "logps/rejected")  # fmt: skip


@dataclass(frozen=True)
class LoopOptions:
    """Switches of the loop that are not params: ``bench/dpo_throughput.py`` turns them for its
    parity run (``data_order="file"``: TRL's sequential order) and its ablations."""

    data_order: Literal["length_grouped", "file"] = "length_grouped"
    shared_prompt: bool = True  # pairs run their prompt once where the model allows it
    fused_adamw: bool = True
    completion_head: bool = True  # the LM head only on positions that predict a completion token


@dataclass
class DpoRun:
    """Everything one training run holds."""

    params: DpoParams
    accelerator: Any
    scorer: nn.Module  # the prepared CompletionScorer of the policy
    ref_scorer: CompletionScorer | None  # live reference only
    optimizer: Any
    scheduler: Any
    train: DpoPairs
    eval: DpoPairs | None
    pad_token_id: int
    total_steps: int
    row_tokens: int | None  # padding-free row capacity (logprobs.pack_row_tokens)
    share_prompt: bool = False  # padding-free pairs run their prompt once (alignpipe.core.attention)
    options: LoopOptions = LoopOptions()
    router_coef: float = 0.0  # MoE: weight of the router's load-balancing loss (alignpipe.core.router)
    image_token: int | None = None  # a VLM: its image placeholder id (pairs carry pixel inputs)

    @property
    def global_size(self) -> int:
        return self.params.batch_size * self.params.grad_accum * self.accelerator.num_processes


def pair_losses(policy: PairLogps, ref_chosen: Tensor, ref_rejected: Tensor, p: DpoParams) -> Tensor:
    """Per-pair loss (B,) of ``dpo.loss_type`` (a list: weighted by ``dpo.loss_weights``)."""
    wpo = None
    if p.wpo:
        assert policy.chosen_aligned_logps is not None and policy.rejected_aligned_logps is not None
        wpo = losses.wpo_weights(
            policy.chosen_aligned_logps / policy.chosen_tokens.clamp(min=1),
            policy.rejected_aligned_logps / policy.rejected_tokens.clamp(min=1),
        )
    common = dict(
        beta=p.beta,
        label_smoothing=p.label_smoothing,
        chosen_lengths=policy.chosen_tokens,
        rejected_lengths=policy.rejected_tokens,
        rpo_alpha=p.rpo_alpha or 0.0,
        wpo_weights=wpo,
        **p.loss_options,
    )
    logps = (policy.chosen_logps, policy.rejected_logps, ref_chosen, ref_rejected)
    if isinstance(p.loss_type, str):
        return preference_loss(p.loss_type, *logps, **common)
    weights = p.loss_weights or [1.0] * len(p.loss_type)
    return combined_loss(p.loss_type, weights, *logps, **common)


def check_loss(p: DpoParams) -> None:
    """Fail before any model loads if the loss settings are invalid (unknown name or option)."""
    one = torch.ones(1)
    if p.unpaired:
        loss_type = p.loss_type if isinstance(p.loss_type, str) else p.loss_type[0]
        weights = {"desirable_weight": p.desirable_weight, "undesirable_weight": p.undesirable_weight}
        unpaired_losses(loss_type, -one, -one, one.bool(), beta=p.beta, **weights)
        return
    dummy = PairLogps(-one, -one, one.long(), one.long(), -one, -one)
    pair_losses(dummy, -one, -one, p)


def metric_sums(policy: PairLogps, ref_c: Tensor, ref_r: Tensor, per_pair: Tensor, beta: float) -> Tensor:
    """Sums over the batch of the :data:`SUMMED` quantities, then pairs and non-finite losses."""
    chosen, rejected = losses.implicit_rewards(policy.chosen_logps, policy.rejected_logps, ref_c, ref_r, beta)
    values = [per_pair.detach(), chosen, rejected, chosen - rejected, (chosen > rejected).float(),
              policy.chosen_logps.detach(), policy.rejected_logps.detach()]  # fmt: skip
    sums = [v.float().sum() for v in values]
    sums += [torch.tensor(float(per_pair.numel())), (~torch.isfinite(per_pair)).sum().float()]
    return torch.stack([s.to(per_pair.device) for s in sums])


def batch_logps(run: DpoRun, data: DpoPairs, index: list[int]) -> tuple[Any, PairLogps, Tensor, Tensor]:
    """Collate ``index``; policy log-probs (with grad when enabled) and reference log-probs."""
    device = run.accelerator.device
    pairs = [data.pairs[i] for i in index]
    if run.image_token is None:
        batch = collate_pairs(
            pairs, run.params.padding_free, run.pad_token_id, run.row_tokens, run.share_prompt
        )
        batch = batch.to(device)
        policy = pair_logps(run.scorer, batch, aligned=run.params.wpo)
    else:  # a VLM: each pair's images through the tower once, both sides share the features
        images = collate_vision_pairs(pairs, run.params.padding_free, run.pad_token_id, run.image_token,
                                      run.row_tokens, run.share_prompt).to(device)  # fmt: skip
        batch, policy = images.batch, vision_pair_logps(run.scorer, images, aligned=run.params.wpo)
    if run.params.reference_free:  # TRL's reference_free: log pi_ref = 0
        ref_c, ref_r = torch.zeros_like(policy.chosen_logps), torch.zeros_like(policy.rejected_logps)
    elif run.ref_scorer is None:
        ref_c, ref_r = (t.to(device) for t in data.ref(index))
    else:
        with torch.no_grad(), run.accelerator.autocast():  # the policy's mixed precision
            if run.image_token is None:
                live = pair_logps(run.ref_scorer, batch)
            else:  # a VLM: the pairs' images through the reference's own tower
                live = vision_pair_logps(run.ref_scorer, images)
        ref_c, ref_r = live.chosen_logps, live.rejected_logps
    return batch, policy, ref_c, ref_r


@dataclass(frozen=True)
class StepStats:
    """One optimizer step, summed over processes: per-pair sums of :data:`SUMMED`, pairs, tokens."""

    sums: dict[str, float]
    pairs: int
    tokens: int
    grad_norm: float
    learning_rate: float
    margins: dict[str, float]  # implicit-reward margin of each pair of this process's micro-batches


def optimizer_step(
    run: DpoRun, step: int, n_bad: float, bad: list[str], micros: list[list[int]]
) -> tuple[float, float]:
    """Clip, refuse a non-finite loss (``n_bad`` rows, ``bad`` their ids here) or gradient naming the
    step and its rows, step the optimizer and scheduler; (pre-clip grad norm, learning rate used)."""
    norm = run.accelerator.clip_grad_norm_(run.scorer.parameters(), run.params.max_grad_norm)
    grad_norm = float(norm) if norm is not None else 0.0  # None: DeepSpeed before its first step
    if n_bad > 0 or not math.isfinite(grad_norm):
        run.optimizer.zero_grad()
        what = "loss" if n_bad > 0 else f"gradient (norm {grad_norm})"
        ids = bad or [run.train.pairs[i].pair_id for index in micros for i in index]
        rows = "examples" if run.params.unpaired else "pairs"
        raise NonFiniteError(f"dpo: non-finite {what} at step {step}; batch {rows}: {', '.join(ids)}")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()
    return grad_norm, lr
