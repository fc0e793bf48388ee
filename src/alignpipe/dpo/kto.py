"""KTO in the dpo loop (``dpo.loss_type: kto`` or ``apo_zero_unpaired``): unpaired examples, the step
and the evaluation, with TRL's KTO metric names.

An example runs as a pair of the pair path (:mod:`alignpipe.artifacts.unpaired`): ``chosen`` is its
prompt and completion, ``rejected`` the same prompt with its fixed mismatched completion, in one
shared-prompt row. The mismatched log-probs only feed the KL point, detached (TRL computes them
under no_grad); here they come from the same forward, so the backward also runs over their tokens.

KL point (:func:`alignpipe.core.kto.kl_point`): per micro-batch, over the micro-batches of every
process at that micro-step (TRL: per forward, gathered over processes), so 2 processes of b examples
train as 1 process of 2b. Evaluation takes one KL point over the whole eval set.

Metrics, as TRL's KTOTrainer logs them: ``loss``, ``kl``, ``rewards/chosen`` and ``logps/chosen``
(means over desirable examples), ``rewards/rejected`` and ``logps/rejected`` (undesirable),
``rewards/margins`` (their difference, when both occur); ``eval/`` the same on data/unpaired/eval.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignpipe.artifacts.unpaired import UnpairedScores, read_unpaired
from alignpipe.core.kto import UNPAIRED_LOSSES, kl_point, unpaired_losses, unpaired_rewards
from alignpipe.dpo.data import DpoPairs
from alignpipe.dpo.run import DpoRun, StepStats, batch_logps, optimizer_step

# Sums over a step's examples (over all processes); ``kl`` is summed as kl point x examples.
SUMS = ("loss", "kl", "examples", "chosen", "rejected", "rewards/chosen", "rewards/rejected",
        "logps/chosen", "logps/rejected", "non_finite")  # fmt: skip


@dataclass(frozen=True)
class KtoData(DpoPairs):
    """Examples of one split as pairs (completion, KL mismatch) with ``ref_chosen`` their reference
    log-probs, ``ref_rejected`` those of the mismatches, and ``labels`` (N,) bool (True: desirable)."""

    labels: Tensor


def load_unpaired_split(
    folder: Path, split: str, ref_logps: Path, tokenizer: Any, max_length: int, max_prompt_length: int
) -> KtoData:
    """``folder/<split>.parquet`` encoded, joined with ``data/ref_logps_unpaired.parquet``."""
    data = read_unpaired(folder / f"{split}.parquet", tokenizer, max_length, max_prompt_length)
    ref = UnpairedScores.read(ref_logps).aligned(data, where=str(ref_logps))
    return KtoData(
        data.pairs, ref.logps.float(), ref.kl_logps.float(), torch.tensor(data.labels, dtype=torch.bool)
    )


def _loss_type(run: DpoRun) -> str:
    t = run.params.loss_type
    return t if isinstance(t, str) else t[0]


def _losses(run: DpoRun, logps: Tensor, ref: Tensor, labels: Tensor, kl: Tensor) -> Tensor:
    p = run.params
    return unpaired_losses(
        _loss_type(run), logps, ref, labels, beta=p.beta, kl=kl,
        desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight,
    )  # fmt: skip


def _kl(run: DpoRun, policy_kl: Tensor, ref_kl: Tensor) -> Tensor:
    """The KL point over every process's mismatched pairs (0 for a loss that reads none)."""
    if not UNPAIRED_LOSSES[_loss_type(run)].needs_kl:
        return torch.zeros((), device=policy_kl.device)
    return kl_point(policy_kl, ref_kl, lambda t: run.accelerator.reduce(t, reduction="sum"))


def _sums(logps: Tensor, ref: Tensor, labels: Tensor, per_example: Tensor, kl: Tensor, beta: float) -> Tensor:
    """The :data:`SUMS` of one batch, (len(SUMS),) float32."""
    rewards, logps = unpaired_rewards(logps, ref, beta).float(), logps.detach().float()
    chosen, n = labels.float(), float(labels.numel())
    values = [per_example.detach().float().sum(), kl.float() * n, torch.tensor(n), chosen.sum(), (1 - chosen).sum(),
              (rewards * chosen).sum(), (rewards * (1 - chosen)).sum(), (logps * chosen).sum(),
              (logps * (1 - chosen)).sum(), (~torch.isfinite(per_example)).sum().float()]  # fmt: skip
    return torch.stack([v.to(per_example.device).float() for v in values])


def train_step(run: DpoRun, step: int, micros: list[list[int]], n_global: int) -> StepStats:
    """One optimizer step over this process's micro-batches (``n_global`` examples over all processes)."""
    acc, p, data = run.accelerator, run.params, run.train
    assert isinstance(data, KtoData)
    scale = acc.num_processes * p.grad_accum / n_global  # the mean over the global batch (as pairs)
    sums, tokens, bad = None, 0, []
    for i, index in enumerate(micros):
        with contextlib.nullcontext() if i == len(micros) - 1 else acc.no_sync(run.scorer):
            batch, policy, ref, ref_kl = batch_logps(run, data, index)
            labels = data.labels[index].to(acc.device)
            kl = _kl(run, policy.rejected_logps, ref_kl)
            per_example = _losses(run, policy.chosen_logps, ref, labels, kl)
            aux = acc.unwrap_model(run.scorer).aux_loss if run.router_coef else None
            router = run.router_coef * len(index) * aux if aux is not None else 0.0
            acc.backward((per_example.sum() + router) * scale)
        finite = torch.isfinite(per_example).tolist()
        bad += [eid for eid, ok in zip(batch.pair_ids, finite, strict=True) if not ok]
        part = _sums(policy.chosen_logps, ref, labels, per_example, kl, p.beta)
        sums = part if sums is None else sums + part
        tokens += batch.n_tokens
    assert sums is not None
    total = acc.reduce(torch.cat([sums, sums.new_tensor([tokens])]), reduction="sum").tolist()
    grad_norm, lr = optimizer_step(run, step, total[SUMS.index("non_finite")], bad, micros)
    named = dict(zip(SUMS, total, strict=False))
    return StepStats(named, int(named["examples"]), int(total[-1]), grad_norm, lr, {})


def means(sums: Mapping[str, float]) -> dict[str, float]:
    """TRL's KTO metrics from :data:`SUMS` (over a logging window or the eval set)."""
    n, n_chosen, n_rejected = max(sums["examples"], 1.0), sums["chosen"], sums["rejected"]
    out = {"loss": sums["loss"] / n, "kl": sums["kl"] / n}
    for side, count in (("chosen", n_chosen), ("rejected", n_rejected)):
        if count > 0:
            out[f"rewards/{side}"] = sums[f"rewards/{side}"] / count
            out[f"logps/{side}"] = sums[f"logps/{side}"] / count
    if n_chosen > 0 and n_rejected > 0:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


@torch.no_grad()
def evaluate(run: DpoRun) -> dict[str, float]:
    """Loss, KL point, rewards and log-probs on the eval examples (one KL point over all of them)."""
    acc, data = run.accelerator, run.eval
    assert isinstance(data, KtoData)
    order = sorted(range(len(data)), key=lambda i: -data.pairs[i].n_tokens)
    size = run.params.batch_size
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    mine = batches[acc.process_index :: acc.num_processes]
    rounds = -(-len(batches) // acc.num_processes)
    run.scorer.eval()
    got: list[Sequence[Tensor]] = []
    for r in range(rounds):  # a process without a batch left repeats one (collectives match), unused
        index = mine[r] if r < len(mine) else batches[0]
        _, policy, ref, ref_kl = batch_logps(run, data, index)
        if r < len(mine):
            got.append(
                (policy.chosen_logps, ref, policy.rejected_logps, ref_kl, data.labels[index].to(acc.device))
            )
    run.scorer.train()
    logps, ref, policy_kl, ref_kl, labels = (
        torch.cat([g[k] for g in got]) if got else torch.zeros(0, device=acc.device) for k in range(5)
    )
    labels = labels.bool()
    kl = _kl(run, policy_kl, ref_kl)
    totals = acc.reduce(
        _sums(logps, ref, labels, _losses(run, logps, ref, labels, kl), kl, run.params.beta), "sum"
    )
    return {f"eval/{k}": v for k, v in means(dict(zip(SUMS, totals.tolist(), strict=True))).items()}
