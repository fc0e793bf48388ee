"""The ``pairs`` stage: preference pairs (:mod:`.build`) and unpaired KTO examples (:mod:`.unpaired`)
from the same scored samples, with one report and the plots.

Both outputs are always written (``data/pairs`` and ``data/unpaired``; ``dpo.loss_type`` chooses
what trains), and nothing is written unless both could be built.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import atomic_path, read_parquet, write_json, write_parquet
from alignpipe.pairs.build import build_pairs, user_pair_rows
from alignpipe.pairs.unpaired import build_unpaired
from alignpipe.params import PairsParams

HISTOGRAM_BINS = 20


def _bins(values: list[float], bins: int) -> tuple[list[float], Callable[[float], int]]:
    """Bin centres and the bin of a value: one bin per value when there are at most ``bins`` distinct
    values, else ``bins`` equal-width bins over [min, max]."""
    distinct = sorted(set(values))
    if len(distinct) <= bins:
        index = {v: i for i, v in enumerate(distinct)}
        return distinct, index.__getitem__
    lo, hi = distinct[0], distinct[-1]
    width = (hi - lo) / bins
    centres = [round(lo + (i + 0.5) * width, 6) for i in range(bins)]
    return centres, lambda v: min(int((v - lo) / width), bins - 1)


def histogram(values: list[float], bins: int = HISTOGRAM_BINS) -> list[dict[str, float | int]]:
    """Histogram rows ``{"bin": x, "count": n}``, ``x`` ascending.

    At most ``bins`` distinct values (the builtin reward: 0, 1/2, 1): one row per value.
    Otherwise ``bins`` equal-width bins over [min, max], ``x`` the bin centre, empty bins included.
    """
    centres, bin_of = _bins(values, bins)
    counts = Counter(bin_of(v) for v in values)
    return [{"bin": x, "count": counts[i]} for i, x in enumerate(centres)]


def label_histogram(
    values: list[float], labels: list[bool], bins: int = HISTOGRAM_BINS
) -> list[dict[str, Any]]:
    """Rows ``{"bin", "label", "count"}``: the rewards of desirable and of undesirable examples, in the
    same bins as :func:`histogram` of all of them (both labels listed for every bin)."""
    centres, bin_of = _bins(values, bins)
    counts = Counter((bin_of(v), label) for v, label in zip(values, labels, strict=True))
    return [
        {"bin": x, "label": name, "count": counts[(i, label)]}
        for i, x in enumerate(centres)
        for label, name in ((True, "desirable"), (False, "undesirable"))
    ]


def write_histogram(
    rows: list[dict[str, Any]], path: str | os.PathLike, columns: tuple[str, ...] = ("bin", "count")
) -> None:
    with atomic_path(path) as tmp:
        lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]
        tmp.write_text("\n".join(lines) + "\n")


def _read_optional(path: Path, table_schema: Any) -> list[dict[str, Any]]:
    return read_parquet(path, table_schema) if path.exists() else []


def _images_by(path: Path, table_schema: Any, key: str) -> dict[str, list[dict[str, Any]]]:
    """``key`` -> images (``{"bytes", "path"}``) of a prepared table with an ``images`` column (VLM data),
    read without decoding; {} when the table has none (text data) or is absent."""
    import pyarrow.parquet as pq

    if not path.exists() or "images" not in pq.read_schema(path).names:
        return {}
    return {r[key]: r["images"] or [] for r in read_parquet(path, schema.with_images(table_schema))}


def with_pair_images(
    rows: list[dict[str, Any]], by_prompt: dict[str, list[Any]], by_pair: dict[str, list[Any]]
) -> list[dict[str, Any]]:
    """Pairs rows with their prompt's images: a generated pair's by prompt_id (prompts.parquet), a user
    pair's by pair_id (preferences.parquet); [] for a row with none."""
    return [{**r, "images": by_prompt.get(r["prompt_id"], by_pair.get(r["pair_id"], []))} for r in rows]


def with_example_images(
    rows: list[dict[str, Any]], by_prompt: dict[str, list[Any]], by_example: dict[str, list[Any]]
) -> list[dict[str, Any]]:
    """Unpaired rows with images: a user row's own (by example_id, unpaired.parquet), a generated one's
    its prompt's (by prompt_id); [] for a row with none."""

    def images(r: dict[str, Any]) -> list[Any]:
        own = by_example.get(r["example_id"]) if r["source"] == "user" else None
        return own if own is not None else by_prompt.get(r["prompt_id"], [])

    return [{**r, "images": images(r)} for r in rows]


def pairs(
    scored_path: str | os.PathLike,
    prompts_path: str | os.PathLike,
    prepared_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    report_path: str | os.PathLike,
    plots_dir: str | os.PathLike,
    params: PairsParams,
    reward: dict[str, Any] | None = None,
    unpaired_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the stage: read, build pairs and unpaired examples, write ``out_dir/{train,eval}.parquet``,
    ``unpaired_dir/{train,eval}.parquet`` (None: not written), the report and the plots.

    ``reward``: which reward scored the samples (``reward_name``, ``reward_hash``), kept in the report."""
    scored = read_parquet(scored_path, schema.SCORED)
    prompts = read_parquet(prompts_path, schema.PROMPTS)
    preferences = _read_optional(Path(prepared_dir) / "preferences.parquet", schema.PREFERENCES)
    user_unpaired = _read_optional(Path(prepared_dir) / "unpaired.parquet", schema.UNPAIRED_PREPARED)
    train, evals, report = build_pairs(scored, prompts, preferences, params)
    pair_prompts = {r["prompt_id"] for r in train + evals}
    u_train, u_evals, u_report = build_unpaired(
        scored, prompts, user_unpaired, params, pair_prompts, {r["prompt_id"] for r in evals}
    )
    report |= reward or {}
    report["unpaired"] = u_report
    # evaluate.preferences: a held-out split, never trained on (no rows without it)
    test = user_pair_rows(
        _read_optional(Path(prepared_dir) / "eval_preferences.parquet", schema.PREFERENCES), {}
    )
    report["pairs_test"] = len(test)
    by_prompt = _images_by(Path(prompts_path), schema.PROMPTS, "prompt_id")
    by_pair = _images_by(Path(prepared_dir) / "preferences.parquet", schema.PREFERENCES, "pair_id")
    by_test = _images_by(Path(prepared_dir) / "eval_preferences.parquet", schema.PREFERENCES, "pair_id")
    pairs_schema = schema.PAIRS
    if by_prompt or by_pair or by_test:  # VLM data: each pair keeps its prompt's images (bytes as stored)
        train = with_pair_images(train, by_prompt, by_pair)
        evals = with_pair_images(evals, by_prompt, by_pair)
        test = with_pair_images(test, {}, by_test)
        pairs_schema = schema.with_images(schema.PAIRS)
    by_example = _images_by(Path(prepared_dir) / "unpaired.parquet", schema.UNPAIRED_PREPARED, "example_id")
    unpaired_schema = schema.UNPAIRED
    if by_prompt or by_example:  # KTO on VLM data: an example keeps its prompt's images (a user row its own)
        u_train, u_evals = (with_example_images(rows, by_prompt, by_example) for rows in (u_train, u_evals))
        unpaired_schema = schema.with_images(schema.UNPAIRED)
    with atomic_path(out_dir) as tmp:
        write_parquet(train, tmp / "train.parquet", pairs_schema)
        write_parquet(evals, tmp / "eval.parquet", pairs_schema)
        write_parquet(test, tmp / "test.parquet", pairs_schema)
    if unpaired_dir is not None:
        with atomic_path(unpaired_dir) as tmp:
            write_parquet(u_train, tmp / "train.parquet", unpaired_schema)
            write_parquet(u_evals, tmp / "eval.parquet", unpaired_schema)
    write_json(report, report_path)
    plots = Path(plots_dir)
    write_histogram(histogram([float(r["reward"]) for r in scored]), plots / "rewards.csv")
    margins = [r["margin"] for r in train + evals if r["margin"] is not None]
    write_histogram(histogram(margins), plots / "margins.csv")
    labelled = [r for r in u_train + u_evals if r["reward"] is not None]
    rows = label_histogram([r["reward"] for r in labelled], [r["label"] for r in labelled])
    write_histogram(rows, plots / "unpaired_labels.csv", ("bin", "label", "count"))
    _print_summary(report)
    return report


def _print_summary(report: dict[str, Any]) -> None:
    removed = ", ".join(f"{k}={v}" for k, v in report["removed"].items() if v) or "none"
    print(
        f"pairs: {report['pairs_train']} train + {report['pairs_eval']} eval pairs "
        f"({report['pairs_generated']} generated, {report['pairs_user']} user) from "
        f"{report['prompts_in']} prompts; removed: {removed}",
        flush=True,
    )
    u = report["unpaired"]
    removed = ", ".join(f"{k}={v}" for k, v in u["removed"].items() if v) or "none"
    fraction = u["desirable_fraction"]
    print(
        f"pairs: unpaired ({u['label']}): {u['train']['examples']} train + {u['eval']['examples']} eval "
        f"examples ({u['examples_generated']} generated, {u['examples_user']} user), {u['desirable']} desirable"
        f" / {u['undesirable']} undesirable"
        + (f" ({fraction:.0%} desirable)" if fraction is not None else "")
        + f"; removed: {removed}",
        flush=True,
    )


@dataclass(frozen=True)
class PairsPaths:
    """Where the stage reads and writes (``dvc.yaml`` passes them on the command line)."""

    scored: Path
    prompts: Path
    prepared: Path
    out_dir: Path
    report: Path
    plots_dir: Path
    score_report: Path | None = None  # reports/score.json: the reward's name and version hash
    unpaired_dir: Path | None = None  # data/unpaired: the KTO examples (None: not written)


def run(params: PairsParams, paths: PairsPaths) -> dict[str, Any]:
    """The stage: preference pairs and unpaired examples from the scored samples; returns the report."""
    reward = None
    if paths.score_report is not None:
        scored_with = json.loads(paths.score_report.read_text())
        reward = {"reward_name": scored_with.get("reward"), "reward_hash": scored_with.get("reward_hash")}
    return pairs(
        paths.scored,
        paths.prompts,
        paths.prepared,
        paths.out_dir,
        paths.report,
        paths.plots_dir,
        params,
        reward,
        paths.unpaired_dir,
    )
