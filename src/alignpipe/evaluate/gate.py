"""The ``evaluate.gate``: thresholds the final policy (``dpo``) must meet against SFT.

Every check is off (null) by default: the stage then only reports. A check whose figure is missing (pass
rates without the built-in reward, a KL that could not be estimated) fails: a gate that was asked for never
passes silently. The figures are those of ``eval.json``; points are percentage points (0-100).

The stage writes all its reports first (``eval.json`` has the verdicts under ``gate``), then
:func:`enforce` raises :class:`GateFailed`, whose one-line message names every failed check and its
figures, and the stage exits 1 (so ``dvc repro`` and the Prefect flow fail).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alignpipe.params import GateParams

POLICY, INCUMBENT = "dpo", "sft"


class GateFailed(RuntimeError):
    """The final policy missed a threshold of ``evaluate.gate``."""


def _points(value: float) -> float:
    return round(100 * value, 6)  # rounded: 0.57 - 0.44 is 13.000000000000002 points


def _check(name: str, threshold: float, value: float | None, passed: bool, text: str) -> dict[str, Any]:
    return {"check": name, "threshold": threshold, "value": value, "passed": passed, "text": text}


def _missing(name: str, threshold: float, what: str) -> dict[str, Any]:
    return _check(name, threshold, None, False, f"{name} {threshold}: {what} n/a")


def _win_rate_lower(metrics: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    name, ci = "min_win_rate_lower", metrics.get("win_rate_ci")
    if not ci:
        return _missing(name, threshold, "win_rate_ci")
    low, high = ci
    text = f"win_rate_ci low {low:.3f} {'>=' if low >= threshold else '<'} {name} {threshold} " \
           f"(win_rate {metrics['win_rate']:.3f} [{low:.3f}, {high:.3f}])"  # fmt: skip
    return _check(name, threshold, low, low >= threshold, text)


def _kl(metrics: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    name, kl = "max_kl", metrics.get("kl")
    if kl is None:
        return _missing(name, threshold, "kl")
    text = f"kl {kl:.3f} nats {'<=' if kl <= threshold else '>'} {name} {threshold}"
    return _check(name, threshold, kl, kl <= threshold, text)


def _family_regression(metrics: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    name = "max_family_regression"
    ours, theirs = metrics[POLICY].get("pass_rate_by_family"), metrics[INCUMBENT].get("pass_rate_by_family")
    if not ours or not theirs:
        return _missing(name, threshold, "pass_rate_by_family (needs reward.kind: builtin)")
    drops = {f: _points(theirs[f] - ours[f]) for f in ours if f in theirs}
    family = max(drops, key=lambda f: drops[f])
    worst = drops[family]
    text = f"family {family} {worst:.1f} points below SFT ({theirs[family]:.3f} -> {ours[family]:.3f}) " \
           f"{'<=' if worst <= threshold else '>'} {name} {threshold}"  # fmt: skip
    return _check(name, threshold, worst, worst <= threshold, text) | {"family": family}


def _pass_rate_gain(metrics: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    name = "min_pass_rate_gain"
    ours, theirs = metrics[POLICY].get("pass_rate"), metrics[INCUMBENT].get("pass_rate")
    if ours is None or theirs is None:
        return _missing(name, threshold, "pass_rate (needs reward.kind: builtin)")
    gain = _points(ours - theirs)
    text = f"pass rate gain {gain:.1f} points ({theirs:.3f} -> {ours:.3f}) " \
           f"{'>=' if gain >= threshold else '<'} {name} {threshold}"  # fmt: skip
    return _check(name, threshold, gain, gain >= threshold, text)


CHECKS = {
    "min_win_rate_lower": _win_rate_lower,
    "max_kl": _kl,
    "max_family_regression": _family_regression,
    "min_pass_rate_gain": _pass_rate_gain,
}


def gate_report(metrics: Mapping[str, Any], gate: GateParams) -> dict[str, Any]:
    """``eval.json``'s ``gate``: each check that is on, with its figure, and whether all passed."""
    checks = [
        CHECKS[name](metrics, threshold)
        for name, threshold in gate.model_dump().items()
        if threshold is not None
    ]
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def enforce(metrics: Mapping[str, Any]) -> None:
    """Raise :class:`GateFailed` with one line naming every failed check, if any failed."""
    report = metrics.get("gate") or {}
    failed = [c["text"] for c in report.get("checks", []) if not c["passed"]]
    if failed:
        raise GateFailed("evaluate.gate failed: " + "; ".join(failed))
