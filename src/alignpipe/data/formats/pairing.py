"""Preference pairs from ranked or scored answers to one prompt (OpenAssistant ranks, rated sets)."""

from __future__ import annotations

from typing import Literal, TypeVar

T = TypeVar("T")
PairStrategy = Literal["best_vs_worst", "all_pairs"]


def pick_pairs(scored: list[tuple[float, T]], strategy: PairStrategy) -> tuple[list[tuple[T, T]], int]:
    """``(pairs of (better, worse), ties)`` from ``(score, item)`` in source order; higher is better.

    ``best_vs_worst``: one pair, the first best against the last worst; none (one tie) when
    every score is equal. ``all_pairs``: every two items with different scores, best first;
    each equal-score pair counts as a tie. Fewer than two items give no pair and no tie.
    """
    if len(scored) < 2:
        return [], 0
    if strategy == "best_vs_worst":
        top, bottom = max(s for s, _ in scored), min(s for s, _ in scored)
        if top == bottom:
            return [], 1
        best = next(item for s, item in scored if s == top)
        worst = next(item for s, item in reversed(scored) if s == bottom)
        return [(best, worst)], 0
    ranked = sorted(scored, key=lambda pair: -pair[0])  # stable: ties keep source order
    pairs, ties = [], 0
    for i, (high, better) in enumerate(ranked):
        for low, worse in ranked[i + 1 :]:
            if high == low:
                ties += 1
            else:
                pairs.append((better, worse))
    return pairs, ties
