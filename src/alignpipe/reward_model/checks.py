"""Checks of a trained reward model on held-out prompts (``reports/reward_model.json``).

- held-out pairs: accuracy (``r_c > r_r``; a tie counts half) and mean margin ``r_c - r_r``;
- calibration: pairs binned by ``|r_c - r_r|`` (quantile bins), each bin's fraction ordered right
  next to the Bradley-Terry prediction ``mean(sigmoid(|r_c - r_r|))``;
- verifier agreement (built-in task): over every held-out sample (demonstrations and variants),
  the Spearman correlation of reward and verifier score, and the pairwise accuracy over the
  samples of one prompt whose verifier scores differ.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any


def pair_checks(chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, Any]:
    diffs = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "pairs": len(diffs),
        "accuracy": round(sum(_correct(d) for d in diffs) / len(diffs), 4),
        "mean_margin": round(sum(diffs) / len(diffs), 4),
    }


def _correct(diff: float) -> float:
    return 1.0 if diff > 0 else 0.5 if diff == 0 else 0.0


def calibration(diffs: Sequence[float], bins: int = 5) -> list[dict[str, float]]:
    """Rows ``bin, abs_diff, predicted, fraction_correct, pairs`` (bins of equal counts by ``|diff|``)."""
    ordered = sorted(diffs, key=abs)
    rows = []
    n = len(ordered)
    for b in range(min(bins, n)):
        part = ordered[b * n // min(bins, n) : (b + 1) * n // min(bins, n)]
        rows.append(
            {
                "bin": b,
                "abs_diff": round(sum(abs(d) for d in part) / len(part), 4),
                "predicted": round(sum(1 / (1 + math.exp(-abs(d))) for d in part) / len(part), 4),
                "fraction_correct": round(sum(_correct(d) for d in part) / len(part), 4),
                "pairs": len(part),
            }
        )
    return rows


def ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of the ranks (None when either side is constant)."""
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return None if sx == 0 or sy == 0 else sxy / (sx * sy)


def verifier_agreement(groups: Sequence[str], verifier: Sequence[float], reward: Sequence[float]) -> dict:
    """Spearman over all samples and pairwise accuracy within each group (prompt)."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    right = total = 0.0
    for members in by_group.values():
        for a in members:
            for b in members:
                if verifier[a] > verifier[b]:
                    total += 1
                    right += _correct(reward[a] - reward[b])
    rho = spearman(verifier, reward)
    return {
        "samples": len(groups),
        "spearman": None if rho is None else round(rho, 4),
        "pairwise_pairs": int(total),
        "pairwise_accuracy": round(right / total, 4) if total else None,
    }
