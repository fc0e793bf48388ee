"""Training diagnostics of a DPO run, in the words of the DPO derivation.

The implicit reward of an answer is ``beta (log pi(y|x) - log pi_ref(y|x))``; it starts at 0 (the
policy is the reference) and the loss pushes the chosen one above the rejected one. How it gets
there tells what to change:

- chosen up, rejected down: healthy;
- both falling (the margin grows because the rejected answer falls faster): the policy is moving
  probability off both answers, away from the data; beta is likely too low (too little KL pull);
- a flat margin (under :data:`FLAT_LOGRATIO` nats of log-ratio): nothing is learned; the learning
  rate is likely too low, or the pairs are bad (chosen and rejected alike, or mislabelled).

The curves are the logged training windows (first vs last). A pair is *never learned* when its
margin was <= 0 every time the loop saw it, to the end (the margins of the train steps themselves,
no extra forward pass).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from alignpipe.core.logprobs import PairLogps
from alignpipe.training.checkpoints import checkpoint_extra
from alignpipe.training.metrics import Point

FLAT_LOGRATIO = 0.1  # nats: a margin change below beta x this is "flat"
SHOWN_IDS = 50  # never-learned pair ids printed (all are in metrics.json)


def pair_margins(
    pair_ids: Sequence[str], policy: PairLogps, ref_c: Tensor, ref_r: Tensor
) -> dict[str, float]:
    """Each pair's log-ratio margin ``(chosen - ref_c) - (rejected - ref_r)`` (the implicit reward's, / beta)."""
    margin = (policy.chosen_logps - ref_c) - (policy.rejected_logps - ref_r)
    return dict(zip(pair_ids, margin.detach().tolist(), strict=True))


class PairTracker:
    """Per train pair: whether its implicit-reward margin was ever > 0 when the loop saw it."""

    def __init__(self, learned: Mapping[str, bool] | None = None) -> None:
        self.learned: dict[str, bool] = dict(learned or {})

    @classmethod
    def resume(cls, checkpoint: Path | None) -> PairTracker:
        """The state saved with ``checkpoint`` (empty without one)."""
        return cls(checkpoint_extra(checkpoint).get("learned") if checkpoint else None)

    def see(self, margins: Mapping[str, float]) -> None:
        for pair_id, margin in margins.items():
            self.learned[pair_id] = self.learned.get(pair_id, False) or margin > 0

    def merge(self, others: Iterable[Mapping[str, bool]]) -> None:
        """Fold in the trackers of the other processes (each saw its own micro-batches)."""
        for other in others:
            for pair_id, learned in other.items():
                self.learned[pair_id] = self.learned.get(pair_id, False) or learned

    def sync(self) -> None:
        """Every process gets the union of all processes' trackers (a collective under several)."""
        from accelerate.utils import gather_object

        self.merge(gather_object([self.learned]))

    def synced_state(self) -> dict[str, Any]:
        """The state to checkpoint, after :meth:`sync` (a collective: every process calls it)."""
        self.sync()
        return {"learned": self.learned}

    def never_learned(self) -> list[str]:
        return sorted(pid for pid, learned in self.learned.items() if not learned)


def _train_points(history: Iterable[Point]) -> list[dict[str, float]]:
    return [m for _, m in history if "rewards/margins" in m and "rewards/chosen" in m]


def verdict(
    chosen: float, rejected: float, margin: float, beta: float, unpaired: bool = False
) -> tuple[str, str]:
    """(name, advice) from the changes of the mean implicit rewards over the run.

    ``unpaired`` (kto, apo_zero_unpaired): "chosen" and "rejected" are the desirable and the
    undesirable examples of each batch, different examples, not a pair's two sides; both falling
    is then read before a falling margin (a small negative margin between two falling means of
    different examples says little about the labels)."""
    if abs(margin) < beta * FLAT_LOGRATIO:
        what = (
            "the labels are bad (alike or mislabelled)"
            if unpaired
            else "the pairs are bad (alike or mislabelled)"
        )
        return "flat margin", f"the learning rate is likely too low, or {what}"
    if unpaired and chosen < 0 and rejected < 0:
        return (
            "both falling",
            "the policy moves probability off desirable and undesirable examples alike: beta is likely too low",
        )
    if margin < 0:
        if unpaired:
            return (
                "margin falling",
                "the desirable examples fall below the undesirable ones: check the labels",
            )
        return "margin falling", "the policy prefers the rejected answers more and more: check the labels"
    if chosen >= 0 and rejected <= 0:
        return "chosen up, rejected down", "healthy"
    if chosen < 0 and rejected < 0:
        return "both falling", "beta is likely too low: the policy moves probability off both answers"
    return "both rising", "the chosen answers rise faster; watch the KL to the reference"


def diagnose(
    history: Iterable[Point], beta: float, never_learned: list[str], unpaired: bool = False
) -> dict[str, Any]:
    """The diagnostics of ``reports/dpo/metrics.json``: changes of the train curves, verdict, pair ids."""
    points = _train_points(history)
    if not points:
        return {"verdict": "no training steps logged", "never_learned": never_learned}
    first, last = points[0], points[-1]
    change = {k: last[f"rewards/{k}"] - first[f"rewards/{k}"] for k in ("chosen", "rejected", "margins")}
    name, advice = verdict(change["chosen"], change["rejected"], change["margins"], beta, unpaired)
    return {
        "verdict": name,
        "advice": advice,
        "chosen_reward_change": round(change["chosen"], 6),
        "rejected_reward_change": round(change["rejected"], 6),
        "margin_change": round(change["margins"], 6),
        "final_reward_accuracy": last.get("rewards/accuracies"),
        "never_learned": never_learned,
        "never_learned_count": len(never_learned),
    }


def describe(diagnostics: Mapping[str, Any]) -> str:
    """Lines for the log."""
    lines = [f"dpo: diagnostics: {diagnostics['verdict']}" + (f" ({diagnostics['advice']})"
             if "advice" in diagnostics else "")]  # fmt: skip
    ids = diagnostics["never_learned"]
    if ids:
        shown = ", ".join(ids[:SHOWN_IDS]) + (f", ... ({len(ids)} in all)" if len(ids) > SHOWN_IDS else "")
        lines.append(f"dpo: {len(ids)} pair(s) never learned (margin <= 0 each time seen): {shown}")
    return "\n".join(lines)


def report(
    tracker: PairTracker, history: Iterable[Point], beta: float, main: bool, unpaired: bool = False
) -> dict[str, Any]:
    """The diagnostics of the finished run (a collective: every process calls it); printed on the main.
    ``unpaired``: the run trained on unpaired examples (see :func:`verdict`)."""
    tracker.sync()
    diagnostics = diagnose(history, beta, tracker.never_learned(), unpaired)
    if main:
        print(describe(diagnostics), flush=True)
    return diagnostics
