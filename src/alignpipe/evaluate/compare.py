"""Comparisons of two models' answers and log-probs in the ``evaluate`` stage: win rate, the
Monte-Carlo KL and the implicit-reward accuracy on pairs (pure functions of their inputs; the text and
the vision-language paths of :mod:`alignpipe.evaluate.stage` share them)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

from alignpipe.evaluate.results import Answer, Estimate, PairsResult, WinRate

MARGIN_TIE = 1e-5  # |implicit-reward margin| below this is fp32 noise: a tie (see pairs_metrics)


def win_rate(challenger: Sequence[Answer], incumbent: Sequence[Answer]) -> WinRate:
    """Challenger's answers against the incumbent's with the same (prompt_id, sample_idx); ties count 1/2."""
    theirs = {a.key: a.reward for a in incumbent}
    if set(theirs) != {a.key for a in challenger}:
        raise ValueError("win_rate: the two models answered different (prompt_id, sample_idx) sets")
    wins = sum(a.reward > theirs[a.key] for a in challenger)
    ties = sum(a.reward == theirs[a.key] for a in challenger)
    return WinRate(wins, ties, len(challenger) - wins - ties)


def kl_estimate(
    policy_logps: Sequence[float], other_logps: Sequence[float], groups: Sequence[str]
) -> Estimate:
    """Mean of ``policy - other`` over samples drawn from the policy, and its standard error.

    Samples of one prompt are not independent of each other, so the standard error is taken over
    the per-prompt means (``groups``: the prompt id of each sample; with one sample per prompt this
    is the usual ``stdev / sqrt(n)``).
    """
    by_group: dict[str, list[float]] = {}
    for p, q, g in zip(policy_logps, other_logps, groups, strict=True):
        by_group.setdefault(g, []).append(p - q)
    if not by_group:
        return Estimate(None, None, 0)
    means = [statistics.fmean(v) for v in by_group.values()]
    stderr = statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else None
    return Estimate(statistics.fmean(means), stderr, len(policy_logps))


def pairs_metrics(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> PairsResult:
    """Implicit-reward accuracy (margin > 0) and mean margin of the policy on pairs.

    Margins within ``MARGIN_TIE`` of 0 count as ties, which are misses: the same model scored in
    other batches (ref_logps packs, batch sizes differ) moves fp32 summed log-probs by ~1e-6, and a
    policy equal to its reference should score 0, not a coin flip.
    """
    from alignpipe.core.losses import implicit_rewards

    if chosen.numel() == 0:
        return PairsResult(None, None, 0)
    reward_c, reward_r = implicit_rewards(chosen, rejected, ref_chosen, ref_rejected, beta)
    margins = (reward_c - reward_r).double()
    accuracy = (margins > MARGIN_TIE).double().mean().item()
    return PairsResult(accuracy, margins.mean().item(), int(margins.numel()))
