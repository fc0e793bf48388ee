"""The ``prepare`` stage: every data source to conversational parquet files.

Writes ``sft.parquet``, ``prompts.parquet``, ``eval_prompts.parquet`` (and
``preferences.parquet`` when the user brings pairs, ``unpaired.parquet`` when they bring
labelled single completions for KTO) into one folder, atomically, plus a metrics file with
row counts and what was dropped. ``rated.parquet`` is always there:
the completions of a rated set (``data.rated``; its prompts are then ``prompts.parquet``) with
their rewards, or no rows, which tells ``generate`` to sample and ``score`` to score as usual.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import atomic_path, write_json, write_parquet
from alignpipe.core.progress import Timer
from alignpipe.data import builtin
from alignpipe.data.convert import FormatOptions, convert_source, row_id, scored_completions
from alignpipe.data.errors import DataError
from alignpipe.data.formats.base import OnInvalid
from alignpipe.data.formats.rated import rating_rule
from alignpipe.data.readers import is_builtin
from alignpipe.params import DataParams, SourceParams

BUILTIN = "builtin:verifiable-instructions"
Kind = Literal["sft", "prompts", "preferences", "unpaired"]
Row = dict[str, Any]
# output file -> (params field, converter kind, built-in split, schema)
OUTPUTS: dict[str, tuple[str, Kind, str | None, Any]] = {
    "sft": ("sft", "sft", "sft", schema.SFT),
    "prompts": ("prompts", "prompts", "prompts", schema.PROMPTS),
    "eval_prompts": ("eval_prompts", "prompts", "eval", schema.PROMPTS),
    "preferences": ("preferences", "preferences", None, schema.PREFERENCES),
    # evaluate.preferences: a held-out preference split (pairs writes it to data/pairs/test.parquet)
    "eval_preferences": ("evaluate.preferences", "preferences", None, schema.PREFERENCES),
    "unpaired": ("unpaired", "unpaired", None, schema.UNPAIRED_PREPARED),
}
WHAT = {
    "preferences": "preference pairs",
    "evaluate.preferences": "preference pairs",
    "unpaired": "unpaired (labelled) examples",
}


def builtin_rows(split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """Rows of the built-in task's ``split`` in the sft or prompts schema."""
    rows = []
    for item in builtin.make_items(split, n, seed):  # type: ignore[arg-type]
        prompt = [{"role": "user", "content": item.instruction}]
        meta = json.dumps(item.spec, sort_keys=True)
        if split == "sft":
            completion = [{"role": "assistant", "content": item.demonstration}]
            rows.append({"id": item.id, "prompt": prompt, "completion": completion, "meta": meta})
        else:
            rows.append({"prompt_id": item.id, "prompt": prompt, "meta": meta})
    return rows


def load_rows(
    name: str, source: SourceParams, params: DataParams
) -> tuple[list[dict[str, Any]], Counter[str], str]:
    """The rows of one output, what was dropped (by reason) and the format read."""
    field, kind, split, _ = OUTPUTS[name]
    key = field if "." in field else f"data.{field}"
    assert source.source is not None
    if is_builtin(source.source):
        if source.source != BUILTIN:
            raise DataError(f"{key}.source: unknown built-in '{source.source}' (known: {BUILTIN})")
        if split is None:
            raise DataError(f"{key}.source: the built-in task has no {WHAT[field]}")
        sizes = {
            "sft": params.builtin.n_sft,
            "prompts": params.builtin.n_prompts,
            "eval": params.builtin.n_eval,
        }
        rows, dropped, fmt = builtin_rows(split, sizes[split], params.seed), Counter(), "builtin"
    else:
        rows, dropped, fmt = convert_source(
            source.source, kind, params.on_invalid, options=format_options(source), part=field
        )
    if source.max_rows is not None:
        rows = rows[: source.max_rows]
    return rows, dropped, fmt


def format_options(source: SourceParams) -> FormatOptions:
    """How to read ``source`` (its format, lang, pairs and rating settings)."""
    lang = [source.lang] if isinstance(source.lang, str) else source.lang
    return FormatOptions(
        format=source.format,
        lang=None if lang is None else tuple(lang),
        pairs=source.pairs,
        rating=source.rating,
    )


def rated_rows(source: SourceParams, on_invalid: OnInvalid) -> tuple[list[Row], list[Row], dict[str, Any]]:
    """(PROMPTS rows, RATED rows, metrics) of a rated set (``data.rated``).

    Each distinct prompt is one prompts row (the id :func:`convert_source` gives it); its completions
    are numbered 0, 1, ... in file order, each with its reward by ``data.rated.rating``."""
    assert source.source is not None
    items, dropped, fmt = scored_completions(source.source, format_options(source), on_invalid)
    items = items[: source.max_rows]
    rule = rating_rule(fmt, source.rating)
    prompts: dict[str, Row] = {}
    rated: list[Row] = []
    seen: Counter[str] = Counter()
    for item in items:
        pid = row_id("prompts", {"prompt": item.prompt})
        prompts.setdefault(pid, {"prompt_id": pid, "prompt": item.prompt, "meta": None})
        details = {"format": fmt, "rule": rule, **item.details}
        seen[pid] += 1
        rated.append({"prompt_id": pid, "sample_idx": seen[pid] - 1,
                      "completion": item.completion, "reward": item.reward,
                      "reward_details": json.dumps(details, sort_keys=True, ensure_ascii=False)})  # fmt: skip
    if not rated:
        raise DataError(
            f"no rated completions (dropped: {dict(dropped)})", file=source.source, reason="empty"
        )
    metrics = {"source": source.source, "format": fmt, "rule": rule, "rows": len(rated),
               "prompts": len(prompts), "dropped": dict(dropped)}  # fmt: skip
    return list(prompts.values()), rated, metrics


def _prompt_key(row: dict[str, Any]) -> str:
    """A prompt's text and, for VLM rows, its images' sha256: the same question on another image differs."""
    images = [hashlib.sha256(image["bytes"]).hexdigest() for image in row.get("images") or []]
    return json.dumps([[m["role"], m["content"].strip()] for m in row["prompt"]] + images)


def check_no_overlap(
    eval_rows: list[dict[str, Any]], train: dict[str, list[dict[str, Any]]], what: str = "eval prompt"
) -> None:
    """Eval prompts (``what``) must not appear among the train prompts or SFT prompts."""
    eval_keys = {_prompt_key(r): r for r in eval_rows}
    for name, rows in train.items():
        shared = [r for r in rows if _prompt_key(r) in eval_keys]
        if shared:
            example = shared[0]["prompt"][-1]["content"][:80]
            raise DataError(
                f"{len(shared)} {what} prompt(s) also appear in data.{name} (e.g. {example!r}); "
                "held-out evaluation needs disjoint prompts"
            )


def prepare(
    params: DataParams,
    out_dir: str | os.PathLike,
    metrics_path: str | os.PathLike,
    eval_preferences: SourceParams | None = None,
) -> dict[str, Any]:
    """Read, convert and validate every source; write the prepared folder and metrics.

    ``eval_preferences`` (``evaluate.preferences``): a held-out preference split, written to
    ``eval_preferences.parquet``; its prompts must not be among the train, SFT or user-pair prompts."""
    timer = Timer("prepare")
    tables: dict[str, list[dict[str, Any]]] = {}
    metrics: dict[str, Any] = {}
    rated: list[Row] = []
    if params.rated.source is not None:  # its prompts are the train prompts (data.prompts.source is null)
        tables["prompts"], rated, metrics["rated"] = rated_rows(params.rated, params.on_invalid)
        metrics["prompts"] = {"source": params.rated.source, "format": metrics["rated"]["format"],
                              "rows": len(tables["prompts"]), "dropped": {}}  # fmt: skip
    for name, (field, _, _, _) in OUTPUTS.items():
        source = eval_preferences if name == "eval_preferences" else getattr(params, field)
        if source is None or source.source is None:
            continue
        rows, dropped, fmt = load_rows(name, source, params)
        tables[name] = rows
        metrics[name] = {"source": source.source, "format": fmt, "rows": len(rows), "dropped": dict(dropped)}
        if name == "unpaired":
            metrics[name]["desirable"] = sum(r["label"] for r in rows)
            metrics[name]["undesirable"] = len(rows) - metrics[name]["desirable"]
    check_no_overlap(tables["eval_prompts"], {"prompts": tables["prompts"], "sft": tables["sft"]})
    train = {name: tables[name] for name in ("prompts", "sft", "preferences") if name in tables}
    check_no_overlap(tables.get("eval_preferences", []), train, "evaluate.preferences")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, rows in tables.items():
            rows, table_schema = table_with_images(rows, OUTPUTS[name][3])
            write_parquet(rows, Path(tmp) / f"{name}.parquet", table_schema)
        write_parquet(rated, Path(tmp) / "rated.parquet", schema.RATED)  # no rows: generate as usual
    write_json(metrics, metrics_path)
    timer.summary(sum(len(r) for r in tables.values()), "rows", **{k: v["rows"] for k, v in metrics.items()})
    return metrics


def table_with_images(rows: list[Row], table_schema: Any) -> tuple[list[Row], Any]:
    """(rows, schema) to write: with an ``images`` column (``[]`` on text rows) when any row has images."""
    if not any("images" in row for row in rows):
        return rows, table_schema
    return [{"images": [], **row} for row in rows], schema.with_images(table_schema)


@dataclass(frozen=True)
class PreparePaths:
    """Where the stage writes (``dvc.yaml`` passes them on the command line)."""

    out_dir: Path
    metrics: Path


def run(
    params: DataParams, paths: PreparePaths, eval_preferences: SourceParams | None = None
) -> dict[str, Any]:
    """The stage: every source (and ``evaluate.preferences``) to ``paths.out_dir``; returns the metrics."""
    return prepare(params, paths.out_dir, paths.metrics, eval_preferences)
