"""The statistics and overfitting signals in the ``evaluate`` reports: ``eval.json`` keys, ``eval.md`` tables
and ``eval/models.csv`` (one row per metric and model, for ``dvc plots``).

Every model's entry in ``eval.json`` gets, against SFT (SFT against itself: 0.5, 0.5, 0, the identity):
``win_rate``, ``win_rate_ci``, ``lc_win_rate``, ``lc_win_rate_ci``, ``lc_length_coef``, ``pass_rate_diff``,
``pass_rate_diff_ci`` (:mod:`alignpipe.evaluate.stats`), and of its own answers ``distinct_2``,
``repeated_3gram_rate``, ``demo_nll``, ``demo_nll_delta`` (:mod:`alignpipe.evaluate.signals`). The top level
repeats DPO's intervals next to the ``win_rate`` it already had, and says how they were made
(``bootstrap``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from alignpipe.evaluate.results import EvalResult, title
from alignpipe.evaluate.signals import REPEAT_N, distinct_n, repeated_ngram_rate
from alignpipe.evaluate.stats import LEVEL, compare

INCUMBENT = "sft"
POLICY = "dpo"
REPEAT_KEY = f"repeated_{REPEAT_N}gram_rate"
TOP_LEVEL = ("win_rate_ci", "lc_win_rate", "lc_win_rate_ci", "pass_rate_diff", "pass_rate_diff_ci")
PLOTTED = ("win_rate", "lc_win_rate", "pass_rate", "distinct_2", REPEAT_KEY)  # all in [0, 1]: one axis


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def _interval(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [_round(ci[0]), _round(ci[1])]


def model_statistics(result: EvalResult) -> dict[str, dict[str, Any]]:
    """Per model: the paired statistics against SFT and the overfitting signals (see the module doc)."""
    p = result.params
    incumbent = result.answers[INCUMBENT]
    base_nll = result.demo_nll.get(INCUMBENT)
    out: dict[str, dict[str, Any]] = {}
    for model, answers in result.answers.items():
        c = compare(answers, incumbent, p.bootstrap_resamples, p.seed)
        texts = [a.completion for a in answers]
        nll = result.demo_nll.get(model)
        out[model] = {
            "win_rate": _round(c.win_rate),
            "win_rate_ci": _interval(c.win_rate_ci),
            "lc_win_rate": _round(c.lc_win_rate),
            "lc_win_rate_ci": _interval(c.lc_win_rate_ci),
            "lc_length_coef": _round(c.lc_length_coef),
            "pass_rate_diff": _round(c.pass_rate_diff),
            "pass_rate_diff_ci": _interval(c.pass_rate_diff_ci),
            "distinct_2": _round(distinct_n(texts, 2)),
            REPEAT_KEY: _round(repeated_ngram_rate(texts, REPEAT_N)),
            "demo_nll": None if nll is None else _round(nll.nll),
            "demo_nll_delta": None if nll is None or base_nll is None else _round(nll.nll - base_nll.nll),
        }
    return out


def add_statistics(metrics: dict[str, Any], result: EvalResult) -> None:
    """Merge the statistics into ``eval.json``'s content (model entries and DPO's at the top level)."""
    for model, stats in model_statistics(result).items():
        metrics[model].update(stats)
    for key in TOP_LEVEL:
        metrics[key] = metrics[POLICY][key]
    metrics["bootstrap"] = {
        "resamples": result.params.bootstrap_resamples,
        "seed": result.params.seed,
        "level": LEVEL,
        "unit": "prompt",
    }
    nll = next(iter(result.demo_nll.values()), None)
    metrics["demo_rows"] = 0 if nll is None else nll.rows


def plot_rows(metrics: Mapping[str, Any], models: Sequence[str]) -> list[dict[str, Any]]:
    """``eval/models.csv``: (metric, model, value, low, high); low/high empty where there is no interval."""
    rows = []
    for metric in PLOTTED:
        for m in models:
            value = metrics[m].get(metric)
            if value is None:
                continue
            ci = metrics[m].get(f"{metric}_ci") or ("", "")
            rows.append({"metric": metric, "model": m, "value": value, "low": ci[0], "high": ci[1]})
    return rows


def _num(value: float | None, digits: int = 3, sign: bool = False) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _with_ci(entry: Mapping[str, Any], key: str, sign: bool = False) -> str:
    ci = entry.get(f"{key}_ci")
    text = _num(entry.get(key), sign=sign)
    return text if ci is None else f"{text} [{_num(ci[0], sign=sign)}, {_num(ci[1], sign=sign)}]"


def _table(header: str, models: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    lines = [f"| {header} | " + " | ".join(title(m) for m in models) + " |", "|---|" + "---:|" * len(models)]
    return lines + [f"| {name} | " + " | ".join(values) + " |" for name, values in rows]


def markdown_lines(metrics: Mapping[str, Any], models: Sequence[str]) -> list[str]:
    """``eval.md``'s sections on the intervals, the overfitting signals and the gate."""
    boot = metrics["bootstrap"]
    others = [m for m in models if m != INCUMBENT]
    lines = ["## Against SFT, with 95% intervals", ""]
    lines += _table("vs SFT", others, [
        ("win rate (ties 1/2)", [_with_ci(metrics[m], "win_rate") for m in others]),
        ("length-controlled win rate", [_with_ci(metrics[m], "lc_win_rate") for m in others]),
        ("length coefficient (log-odds per SD)", [_num(metrics[m]["lc_length_coef"]) for m in others]),
        ("pass-rate difference", [_with_ci(metrics[m], "pass_rate_diff", sign=True) for m in others]),
    ])  # fmt: skip
    lines += [
        "",
        f"Intervals: paired percentile bootstrap over the {metrics['prompts']} prompts ({boot['resamples']} "
        f"resamples, seed {boot['seed']}; a resampled prompt brings all {metrics['n']} sample(s) of both models). "
        "Length-controlled win rate: sigmoid(a) of a logistic fit P(win) = sigmoid(a + b dlen/sd(dlen)) on "
        "the length difference in tokens of each answer pair (ties 1/2): the win probability at equal length.",
        "",
        "## Overfitting signals",
        "",
    ]
    lines += _table("signal", models, [
        ("distinct-2 (answers pooled)", [_num(metrics[m]["distinct_2"]) for m in models]),
        (f"repeated {REPEAT_N}-gram rate (within answers)", [_num(metrics[m][REPEAT_KEY]) for m in models]),
        (f"NLL per token, SFT demonstrations (n={metrics['demo_rows']})",
         [_num(metrics[m]["demo_nll"], 4) for m in models]),
        ("NLL change vs SFT (forgetting)", [_num(metrics[m]["demo_nll_delta"], 4, sign=True) for m in models]),
    ])  # fmt: skip
    lines += [
        "",
        "Distinct-2: distinct word bigrams / all bigrams of a model's answers (lower: more repetitive). "
        f"Repeated {REPEAT_N}-gram rate: word {REPEAT_N}-grams repeating an earlier one in the same answer. "
        "NLL: nats per token of the first rows of data/prepared/sft.parquet (SFT's own training rows: it "
        "has no eval split); a rise over SFT's is what the policy forgot.",
        "",
    ]
    return lines + gate_lines(metrics.get("gate"))


def gate_lines(gate: Mapping[str, Any] | None) -> list[str]:
    if not gate or not gate["checks"]:
        return ["Gate: report only (every `evaluate.gate` threshold is null).", ""]
    verdict = "passed" if gate["passed"] else "**FAILED**"
    lines = [f"## Gate: {verdict}", "", "| check | threshold | value | result |", "|---|---:|---:|---|"]
    for c in gate["checks"]:
        value = "n/a" if c["value"] is None else f"{c['value']:.4g}"
        lines.append(f"| {c['check']} | {c['threshold']} | {value} | {'pass' if c['passed'] else 'FAIL'}: "
                     f"{c['text']} |")  # fmt: skip
    return lines + [""]
