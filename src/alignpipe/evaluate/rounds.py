"""The rounds of iterative DPO in the ``evaluate`` reports: ``eval/rounds.csv`` (``dvc plots``) and a table in
``eval.md``. Round 0 is SFT (win rate 0.5 and KL 0 against itself), round k < K is ``dpo_round_k``, the last
round K is ``dpo``; with one round the table has rounds 0 and 1 only."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from alignpipe.evaluate.results import ROUND_PREFIX, round_number
from alignpipe.params import RoundsParams

COLUMNS = ("round", "model", "pass_rate", "win_rate", "win_rate_low", "win_rate_high", "kl")


def earlier_rounds(rounds: RoundsParams) -> dict[str, Path]:
    """``dpo_round_k`` -> policy folder for every round before the last (none with one round)."""
    policies = rounds.policies()
    return {f"{ROUND_PREFIX}{k}": Path(p) for k, p in policies.items() if k < len(policies)}


def is_round(model: str) -> bool:
    return model.startswith(ROUND_PREFIX)


def with_rounds(labels: Sequence[str], models: Iterable[str]) -> list[str]:
    """``labels`` (base, sft, dpo) with the earlier rounds' policies of ``models`` before ``dpo``, in order."""
    rounds = sorted((m for m in models if is_round(m)), key=round_number)
    out = [m for m in labels if m != "dpo"]
    return [*out, *rounds, "dpo"]


def round_labels(models: Sequence[str]) -> list[tuple[int, str]]:
    """(round, model) for SFT, the earlier rounds' policies and the last one (``dpo``), in round order."""
    earlier = sorted((round_number(m), m) for m in models if m.startswith(ROUND_PREFIX))
    return [(0, "sft"), *earlier, (len(earlier) + 1, "dpo")]


def round_rows(metrics: Mapping[str, Any], models: Sequence[str]) -> list[dict[str, Any]]:
    """``eval/rounds.csv``: one row per round (the interval columns empty where there is none)."""
    rows = []
    for k, model in round_labels(models):
        entry = metrics[model]
        ci = entry.get("win_rate_ci") or ("", "")
        kl = 0.0 if model == "sft" else metrics["kl"] if model == "dpo" else entry.get("kl")
        rows.append({"round": k, "model": model, "pass_rate": entry.get("pass_rate"),
                     "win_rate": entry.get("win_rate"), "win_rate_low": ci[0], "win_rate_high": ci[1],
                     "kl": kl})  # fmt: skip
    return rows


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value in (None, "") else f"{value:.{digits}f}"


def rounds_markdown(metrics: Mapping[str, Any], models: Sequence[str]) -> list[str]:
    """``eval.md``'s table across rounds (none with one round: the tables above already say it all)."""
    rows = round_rows(metrics, models)
    if len(rows) <= 2:
        return []
    lines = ["## Rounds", "", "| round | model | pass rate | win rate vs SFT [95%] | KL to SFT (nats) |",
             "|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        win = f"{_num(r['win_rate'])} [{_num(r['win_rate_low'])}, {_num(r['win_rate_high'])}]"
        lines.append(f"| {r['round']} | {r['model']} | {_num(r['pass_rate'])} | {win} | {_num(r['kl'], 4)} |")
    return [*lines, "", "Each round's policy answers the same eval prompts with the same seeds; the answers "
            "stand side by side in the examples below.", ""]  # fmt: skip
