"""The ``evaluate`` stage's reports: per-model summaries (mean reward, pass rates, length) and the
files ``eval.json`` (DVC metrics), ``eval.md``, plot data and PNGs.

Layout under the stage's ``--out-dir`` (``reports/``)::

    eval.json              metrics (``dvc metrics show``)
    eval.md                metrics table, plots, examples side by side
    eval/rewards.csv       reward histogram: model, bin, count (``dvc plots show``)
    eval/pass_rate.csv     family, model, pass_rate, samples (built-in reward only; else header only)
    eval/models.csv        metric, model, value, low, high: win rates, pass rate, signals (stats_report)
    eval/rounds.csv        round, model, pass_rate, win_rate (+ interval), kl: SFT, then each round's policy
    eval/reward_hist.png, eval/pass_rate.png, eval/training_curves.png   (matplotlib, for eval.md)

The CSVs are long tables, one row per (model, category); ``configs/plots/grouped_bars.json`` is
the DVC template that draws them as bars grouped by model.
"""

from __future__ import annotations

import csv
import html
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from alignpipe.artifacts.io import atomic_path, write_json
from alignpipe.evaluate.gate import gate_report
from alignpipe.evaluate.plots import (
    MAX_EXACT_BINS,
    plot_pass_rate,
    plot_reward_hist,
    plot_training_curves,
    save_png,
)
from alignpipe.evaluate.preferences import markdown as preference_markdown
from alignpipe.evaluate.results import Answer, EvalResult, title
from alignpipe.evaluate.rounds import COLUMNS, round_rows, rounds_markdown
from alignpipe.evaluate.stats_report import add_statistics, markdown_lines, plot_rows

HIST_BINS = 20


def pass_rates(
    families: Sequence[str | None], passed: Sequence[bool], order: Sequence[str] = ()
) -> tuple[float | None, dict[str, float], dict[str, int]]:
    """Overall pass rate, pass rate per family and samples per family (``order`` first, then the others)."""
    counts: dict[str, int] = {}
    hits: dict[str, int] = {}
    for family, ok in zip(families, passed, strict=True):
        name = family or "other"
        counts[name] = counts.get(name, 0) + 1
        hits[name] = hits.get(name, 0) + bool(ok)
    order = [f for f in order if f in counts] + sorted(set(counts) - set(order))
    overall = sum(map(bool, passed)) / len(passed) if passed else None
    return overall, {f: hits[f] / counts[f] for f in order}, {f: counts[f] for f in order}


def model_summary(
    answers: Sequence[Answer], families: Mapping[str, str | None], builtin: bool, order: Sequence[str] = ()
) -> dict[str, Any]:
    """``eval.json`` entry of one model; pass rates are None unless the reward is built-in."""
    rewards = [a.reward for a in answers]
    summary: dict[str, Any] = {
        "reward_mean": _round(statistics.fmean(rewards)),
        "reward_std": _round(statistics.pstdev(rewards)),
        "pass_rate": None,
        "length_mean": _round(statistics.fmean(a.n_tokens for a in answers)),
        "finish_length_rate": _round(sum(a.finish_reason == "length" for a in answers) / len(answers)),
        "samples": len(answers),
        "pass_rate_by_family": None,
    }
    if builtin:
        overall, by_family, _ = pass_rates(
            [families[a.prompt_id] for a in answers], [bool(a.passed) for a in answers], order
        )
        summary["pass_rate"] = _round(overall)
        summary["pass_rate_by_family"] = {f: _round(r) for f, r in by_family.items()}
    return summary


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def eval_metrics(result: EvalResult) -> dict[str, Any]:
    """The content of ``eval.json``."""
    families = {p.prompt_id: p.family for p in result.prompts}
    metrics: dict[str, Any] = {
        "reward": result.reward_name,
        "prompts": len(result.prompts),
        "n": result.params.n,
    }
    for model, answers in result.answers.items():
        metrics[model] = model_summary(answers, families, result.builtin, result.family_order)
    win = result.win
    metrics.update(
        win_rate=_round(win.rate), wins=win.wins, ties=win.ties, losses=win.losses,
        kl=_round(result.kl.mean), kl_stderr=_round(result.kl.stderr), kl_samples=result.kl.n,
        pairs_accuracy=_round(result.pairs.accuracy), pairs_margin_mean=_round(result.pairs.margin_mean),
        pairs=result.pairs.n,
    )  # fmt: skip
    if result.builtin:
        dpo = result.answers["dpo"]
        dpo_families = [families[a.prompt_id] for a in dpo]
        metrics["family_counts"] = pass_rates(dpo_families, [False] * len(dpo), result.family_order)[2]
    if result.truncation:
        metrics["truncation"] = (
            result.truncation
        )  # eval answers and pairs cut by dpo.max_length / max_prompt_length
    for model, kl in result.round_kl.items():  # earlier rounds' policies (the last one's: the top level)
        metrics[model].update(kl=_round(kl.mean), kl_stderr=_round(kl.stderr))
    add_statistics(metrics, result)  # intervals, length control, overfitting signals
    metrics["gate"] = gate_report(metrics, result.params.gate)
    metrics["seconds"] = result.seconds.get("total")
    return metrics


def write_reports(
    result: EvalResult, metrics: dict[str, Any], out_dir: Path, curves: Mapping[str, Any], pngs: bool = True
) -> None:
    """Write every report file; ``pngs=False`` skips the matplotlib figures (fast tests)."""
    plots = out_dir / "eval"
    rewards = {m: [a.reward for a in answers] for m, answers in result.answers.items()}
    hist = reward_histogram(rewards)
    _write_csv(plots / "rewards.csv", ["model", "bin", "count"], hist)
    rates = pass_rate_rows(metrics, list(result.answers))
    _write_csv(plots / "pass_rate.csv", ["family", "model", "pass_rate", "samples"], rates)
    by_model = plot_rows(metrics, list(result.answers))
    _write_csv(plots / "models.csv", ["metric", "model", "value", "low", "high"], by_model)
    _write_csv(plots / "rounds.csv", COLUMNS, round_rows(metrics, list(result.answers)))
    if pngs:
        save_png(plot_reward_hist(hist, list(result.answers), result.reward_name), plots / "reward_hist.png")
        save_png(plot_pass_rate(rates, list(result.answers)), plots / "pass_rate.png")
        save_png(plot_training_curves({k: Path(v) for k, v in curves.items()}), plots / "training_curves.png")
    with atomic_path(out_dir / "eval.md") as tmp:
        tmp.write_text(render_markdown(result, metrics))
    write_json(metrics, out_dir / "eval.json")


def reward_histogram(rewards: Mapping[str, Sequence[float]]) -> list[dict[str, Any]]:
    """Rows (model, bin, count) on bins shared by every model, every bin listed for every model.

    Few distinct values (the built-in reward: 0, 1/2, 1): one bin per value, labelled by it;
    otherwise ``HIST_BINS`` equal bins over the range, labelled by their centre.
    """
    values = sorted({v for vs in rewards.values() for v in vs})
    if not values:
        return []
    if len(values) <= MAX_EXACT_BINS:
        labels, index = [_fmt(v) for v in values], {v: i for i, v in enumerate(values)}
        counts = {m: _count([index[v] for v in vs], len(values)) for m, vs in rewards.items()}
    else:
        lo, hi = values[0], values[-1]
        width = (hi - lo) / HIST_BINS
        labels = [_fmt(lo + (i + 0.5) * width) for i in range(HIST_BINS)]
        counts = {
            m: _count([min(int((v - lo) / width), HIST_BINS - 1) for v in vs], HIST_BINS)
            for m, vs in rewards.items()
        }
    return [
        {"model": m, "bin": label, "count": c[i]} for m, c in counts.items() for i, label in enumerate(labels)
    ]


def pass_rate_rows(metrics: Mapping[str, Any], models: Sequence[str]) -> list[dict[str, Any]]:
    """Rows (family, model, pass_rate, samples); none when pass rates are null (reward not built-in)."""
    counts = metrics.get("family_counts") or {}
    return [
        {"family": family, "model": m, "pass_rate": metrics[m]["pass_rate_by_family"][family], "samples": n}
        for family, n in counts.items()
        for m in models
        if metrics[m]["pass_rate_by_family"] is not None
    ]


def _count(indices: Sequence[int], n: int) -> list[int]:
    out = [0] * n
    for i in indices:
        out[i] += 1
    return out


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value != 0 else "0"


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def md_cell(text: str) -> str:
    """Text safe inside a markdown table cell: HTML escaped, pipes escaped, newlines as <br>, indents kept."""
    escaped = html.escape(text.strip(), quote=False).replace("|", "\\|").replace("`", "\\`")
    lines = [line.lstrip(" ") for line in escaped.splitlines()]
    indents = [len(raw) - len(line) for raw, line in zip(escaped.splitlines(), lines, strict=True)]
    return "<br>".join("&nbsp;" * n + line for n, line in zip(indents, lines, strict=True)) or "*(empty)*"


def _num(value: float | None, digits: int = 3) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def _metrics_table(metrics: Mapping[str, Any], models: Sequence[str]) -> list[str]:
    lines = [
        "| metric | " + " | ".join(title(m) for m in models) + " |",
        "|---|" + "---:|" * len(models),
    ]

    def row(name: str, values: Sequence[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(values) + " |")

    row("mean reward", [_num(metrics[m]["reward_mean"]) for m in models])
    row("pass rate (all families)", [_num(metrics[m]["pass_rate"]) for m in models])
    for family, n in (metrics.get("family_counts") or {}).items():
        row(f"pass rate: {family} (n={n})", [_num(metrics[m]["pass_rate_by_family"][family]) for m in models])
    row("mean length (tokens)", [_num(metrics[m]["length_mean"], 1) for m in models])
    row("cut at max_new_tokens", [_num(metrics[m]["finish_length_rate"]) for m in models])
    return lines


def _comparison_table(metrics: Mapping[str, Any], beta: float | None = None) -> list[str]:
    win = metrics["win_rate"]
    kl, se = metrics["kl"], metrics["kl_stderr"]
    kl_text = "n/a" if kl is None else f"{kl:.4g}" + ("" if se is None else f" ± {se:.2g}")
    return [
        "| DPO vs SFT | value |",
        "|---|---|",
        f"| win rate (ties count 1/2) | {_num(win)} ({metrics['wins']} wins, {metrics['ties']} ties, "
        f"{metrics['losses']} losses) |",
        f"| KL(DPO ‖ SFT), nats per answer | {kl_text} (n={metrics['kl_samples']}) |",
        f"| implicit-reward accuracy on eval pairs | {_num(metrics['pairs_accuracy'])} (n={metrics['pairs']}) |",
        f"| mean implicit-reward margin | {_num(metrics['pairs_margin_mean'], 4)} |",
    ]


def _examples(result: EvalResult, models: Sequence[str]) -> list[str]:
    by_key = {m: {a.key: a for a in answers} for m, answers in result.answers.items()}
    lines: list[str] = []
    for prompt in result.prompts[: result.params.n_examples]:
        key = (prompt.prompt_id, 0)
        family = f" ({prompt.family})" if prompt.family else ""
        lines += [f"### {prompt.prompt_id}{family}", ""]
        lines += [f"> **{m['role']}:** {md_cell(m['content'])}" for m in prompt.prompt] + [""]
        answers: list[Answer] = [by_key[m][key] for m in models]
        lines.append(
            "| "
            + " | ".join(
                f"{title(m)} (reward {_num(a.reward)})" for m, a in zip(models, answers, strict=True)
            )
            + " |"
        )
        lines.append("|" + "---|" * len(models))
        lines.append(
            "| "
            + " | ".join(
                md_cell(a.completion) + (" …" if a.finish_reason == "length" else "") for a in answers
            )
            + " |"
        )
        lines.append("")
    return lines


def render_markdown(result: EvalResult, metrics: Mapping[str, Any]) -> str:
    models = list(result.answers)
    p = result.params
    sampler = f"temperature {p.temperature}, top_p {p.top_p}, top_k {p.top_k}"
    lines = [
        "# Evaluation: DPO vs SFT",
        "",
        f"{len(result.prompts)} held-out prompts x {p.n} answer(s) per model; backend {result.backend}, "
        f"{sampler}, max_new_tokens {p.max_new_tokens}, seed {p.seed} (the same for every model); "
        f"reward `{result.reward_name}`.",
        "",
        *_metrics_table(metrics, models),
        "",
        "Pass rate: share of answers whose built-in verifier score is 1, per primary family "
        "(the prompt's first constraint)."
        if result.builtin
        else "Pass rates need `reward.kind: builtin`.",
        "",
        *_comparison_table(metrics),
        "",
        "KL is a Monte-Carlo estimate of KL(DPO ‖ SFT): the mean over the DPO model's own answers y of "
        "log p_DPO(y|x) − log p_SFT(y|x), ± one standard error over prompts"
        + (
            "."
            if p.temperature == 1 and p.top_p == 1 and p.top_k == 0
            else f". The answers come from the sampler ({sampler}), not from p_DPO itself, so this is that "
            "expectation under the sampler, not the exact KL."
        ),
        "",
        f"Implicit-reward margin of a held-out pair: beta [(log p_DPO(c) − log p_ref(c)) − (log p_DPO(r) − "
        f"log p_ref(r))] with beta = {result.beta} and the cached reference (SFT) log-probs; accurate when > 0 "
        "(a margin under 1e-5 is fp32 noise: a tie, counted as a miss).",
        "",
        *rounds_markdown(metrics, models),
        *markdown_lines(metrics, models),
        *preference_markdown(metrics.get("preferences")),
        "## Plots",
        "",
        "![Reward distribution](eval/reward_hist.png)",
        "",
        "![Pass rate per family](eval/pass_rate.png)" if result.builtin else "",
        "",
        "![Training curves](eval/training_curves.png)",
        "",
        f"## Examples (first {min(p.n_examples, len(result.prompts))} eval prompts, sample 0)",
        "",
        *_examples(result, models),
    ]
    return "\n".join(lines).rstrip() + "\n"
