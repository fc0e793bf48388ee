"""The PNGs of ``eval.md`` (matplotlib, Agg): reward histogram, pass rate per family, training curves."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from alignpipe.artifacts.io import atomic_path
from alignpipe.evaluate.results import TITLES

MAX_EXACT_BINS = 12  # rewards with at most this many distinct values get one bin per value
COLORS = {"base": "#9e9e9e", "sft": "#4c78a8", "dpo": "#f58518"}  # the vega-lite palette of dvc plots
# DVCLive files of the training stages (reports/<stage>/plots/metrics/<name>.tsv): (label, file).
CURVES = {
    "sft": [("train", "train/loss.tsv"), ("eval", "eval/loss.tsv")],
    "dpo": [("train", "loss.tsv"), ("eval pairs", "eval/loss.tsv")],
    "dpo_accuracy": [("train", "rewards/accuracies.tsv"), ("eval pairs", "eval/rewards/accuracies.tsv")],
}


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), dpi=110, layout="constrained", squeeze=False)


def save_png(fig: Any, path: Path) -> None:
    from matplotlib import pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _grouped_bars(ax: Any, categories: Sequence[str], values: Mapping[str, Sequence[float]]) -> None:
    width = 0.8 / max(len(values), 1)
    for k, (model, vals) in enumerate(values.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(categories))]
        ax.bar(xs, vals, width, label=TITLES.get(model, model), color=COLORS.get(model))
    ax.set_xticks(range(len(categories)), categories)
    ax.legend(title="model", frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)


def plot_reward_hist(rows: Sequence[Mapping[str, Any]], models: Sequence[str], reward_name: str) -> Any:
    fig, axes = _figure(7, 3.8)
    ax = axes[0][0]
    bins = list(dict.fromkeys(r["bin"] for r in rows))
    _grouped_bars(ax, bins, {m: [r["count"] for r in rows if r["model"] == m] for m in models})
    binned = len(bins) > MAX_EXACT_BINS
    ax.set(title=f"Reward on eval prompts ({reward_name})", xlabel="reward (bin centre)" if binned else "reward",
           ylabel="answers")  # fmt: skip
    if binned:
        ax.tick_params(axis="x", labelrotation=45)
    return fig


def plot_pass_rate(rows: Sequence[Mapping[str, Any]], models: Sequence[str]) -> Any:
    fig, axes = _figure(8, 4)
    ax = axes[0][0]
    if not rows:
        ax.text(0.5, 0.5, "pass rates need reward.kind: builtin", ha="center", va="center")
        ax.set_axis_off()
        return fig
    families = list(dict.fromkeys(r["family"] for r in rows))
    _grouped_bars(ax, families, {m: [r["pass_rate"] for r in rows if r["model"] == m] for m in models})
    ax.set(title="Pass rate per primary family (verifier score = 1)", ylabel="pass rate", ylim=(0, 1.05))
    ax.tick_params(axis="x", labelrotation=30)
    return fig


def read_curve(path: Path) -> tuple[list[float], list[float]]:
    """(steps, values) of a DVCLive ``.tsv`` (columns step, <name>[, timestamp]); empty if missing."""
    if not path.exists():
        return [], []
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        return [], []
    name = next(c for c in rows[0] if c not in ("step", "timestamp"))
    return [float(r["step"]) for r in rows], [float(r[name]) for r in rows]


def plot_training_curves(dirs: Mapping[str, Path]) -> Any:
    """Three panels: SFT loss, DPO loss, DPO implicit-reward accuracy (train and eval where logged)."""
    fig, axes = _figure(13, 3.6, ncols=3)
    panels = [
        ("sft", "sft", "SFT loss", "loss"),
        ("dpo", "dpo", "DPO loss", "loss"),
        ("dpo", "dpo_accuracy", "DPO implicit-reward accuracy", "accuracy"),
    ]
    for ax, (stage, key, title, ylabel) in zip(axes[0], panels, strict=True):
        folder = dirs.get(stage)
        drawn = 0
        for label, name in CURVES[key] if folder else []:
            steps, values = read_curve(folder / name)
            if steps:
                style = "-" if label == "train" else "--"
                ax.plot(
                    steps,
                    values,
                    style,
                    color=COLORS.get(stage),
                    marker="o" if len(steps) < 4 else None,
                    label=label,
                )
                drawn += 1
        if drawn:
            ax.legend(frameon=False)
            ax.grid(alpha=0.3)
        else:
            ax.text(
                0.5,
                0.5,
                f"no curve logged\n({folder or 'not given'})",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=8,
            )
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    return fig
