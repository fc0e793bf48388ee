"""The flow run's report: params changed, eval metrics (every round's policy), the rounds, the plots.

The plots come from DVC's own reading of ``dvc.yaml`` (templating and ``matrix`` resolved), so the
stages of the extra rounds (``dpo_round@extra0``: ``reports/round-2/dpo/plots/metrics``) and the
top-level plots (``rounds``) are listed as ``dvc plots show`` draws them.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.orchestration.flow_support import Change, StageResult

MODELS = ("base", "sft", "dpo")  # columns of the eval table, when reports/eval.json has them
EARLIER_ROUND = re.compile(r"dpo_round_(\d+)")  # eval.json's earlier rounds' policies, before the last (dpo)
ROUNDS_CSV = "reports/eval/rounds.csv"  # evaluate's one row per round (round 0: SFT)


@dataclass(frozen=True)
class Plots:
    """``dvc.yaml``'s plots as DVC resolves them: each stage's plot outs in stage order, and the
    top-level plots by name with the files they draw."""

    stage_paths: tuple[str, ...]
    named: tuple[tuple[str, tuple[str, ...]], ...]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """Markdown for reports/eval.json: a metric x model table for the models (base, sft, the earlier
    rounds' dpo_round_k, dpo), then the rest."""
    rounds = sorted((int(found[1]), found[0]) for m in metrics if (found := EARLIER_ROUND.fullmatch(m)))
    columns = (*MODELS[:-1], *(name for _, name in rounds), MODELS[-1])
    models = [m for m in columns if isinstance(metrics.get(m), Mapping)]
    lines: list[str] = []
    if models:
        per_model = {m: _flatten(metrics[m]) for m in models}
        names = list(dict.fromkeys(k for m in models for k in per_model[m]))
        lines += ["| metric | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(_cell(per_model[m].get(n)) for m in models) + " |" for n in names]
    rest = _flatten({k: v for k, v in metrics.items() if k not in models})
    if rest:
        lines += ["", "| metric | value |", "|---|---|"] if lines else ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in rest.items()]
    return "\n".join(lines)


def _plot_files(name: str, spec: Any) -> tuple[str, ...]:
    """The files a top-level plot draws: its ``y`` (and ``x``) files, else its name is the file."""
    spec = spec if isinstance(spec, Mapping) else {}
    files = [f for axis in ("y", "x") if isinstance(spec.get(axis), Mapping) for f in spec[axis]]
    return tuple(dict.fromkeys(files)) or (name,)


def declared_plots(workspace: str | os.PathLike) -> Plots:
    """The plots of ``workspace``'s ``dvc.yaml``, from DVC's index (no ``.dvc`` folder needed)."""
    from dvc.dvcfile import load_file
    from dvc.repo import Repo

    with Repo(str(workspace), uninitialized=True) as repo:
        paths = [o.def_path for s in repo.index.stages for o in s.outs if o.is_plot]
        top = load_file(repo, str(Path(workspace) / "dvc.yaml")).plots
    named = []
    for entry in top:
        items = entry.items() if isinstance(entry, Mapping) else [(str(entry), None)]
        named += [(str(name), _plot_files(str(name), spec)) for name, spec in items]
    return Plots(tuple(dict.fromkeys(paths)), tuple(named))


def plot_lines(workspace: str | os.PathLike) -> list[str]:
    """Markdown list items for the plots whose files exist: stage plots, then the top-level ones."""
    root = Path(workspace)
    plots = declared_plots(root)
    lines = [f"- `{p}`" for p in plots.stage_paths if (root / p).exists()]
    for name, files in plots.named:
        present = [f for f in files if (root / f).exists()]
        if present:
            lines.append(f"- `{name}` (top-level plot: {', '.join(f'`{f}`' for f in present)})")
    return lines


def round_rows(workspace: str | os.PathLike) -> list[dict[str, Any]]:
    """``reports/eval/rounds.csv`` as rows, its columns in order (numbers as numbers, empty cells
    None); [] without it."""
    path = Path(workspace) / ROUNDS_CSV
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))

    def value(text: str | None) -> Any:
        if text in (None, ""):
            return None
        try:
            return int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            return text

    return [{k: value(v) for k, v in r.items()} for r in rows]


def rounds_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The report's rounds section: one row per round (none with one round, rounds 0 and 1 only)."""
    if len(rows) <= 2:
        return []
    columns = list(rows[0])
    out = ["## Rounds", "", f"From `{ROUNDS_CSV}` (round 0: SFT; KL to SFT in nats):", "",
           "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]  # fmt: skip
    out += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return [*out, ""]


def run_report(
    workspace: str | os.PathLike, results: Sequence[StageResult], changes: Sequence[Change] = ()
) -> str:
    """The flow run's markdown artifact: params changed, eval metrics, rounds, where the plots are."""
    root = Path(workspace)
    ran = [r.stage for r in results if r.status == "ran"]
    out = ["# alignpipe run", "", f"Stages run: {', '.join(ran) or 'none (all up to date)'}.", ""]
    if changes:
        out += ["## Params changed in params.yaml", "", "| key | old | new |", "|---|---|---|"]
        out += [f"| {c.key} | {_cell(json.dumps(c.old))} | {_cell(json.dumps(c.new))} |" for c in changes]
        out += [""]
    eval_json = root / "reports" / "eval.json"
    out += ["## Evaluation", ""]
    if eval_json.exists():
        out += ["From `reports/eval.json`:", "", metrics_table(json.loads(eval_json.read_text())), ""]
        if (root / "reports" / "eval.md").exists():
            out += ["Side-by-side examples: `reports/eval.md`.", ""]
    else:
        out += ["No `reports/eval.json` yet (the evaluate stage has not run).", ""]
    out += rounds_markdown(round_rows(root))
    plots = plot_lines(root) if (root / "dvc.yaml").exists() else []
    out += ["## Plots", ""]
    out += plots or ["- none yet"]
    out += ["", f"Render them with `dvc plots show` (writes `dvc_plots/index.html`) in `{root}`."]
    return "\n".join(out)
