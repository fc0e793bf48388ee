"""The ``prepare`` stage: every data source to conversational parquet files.

Writes ``sft.parquet``, ``prompts.parquet``, ``eval_prompts.parquet`` (and
``preferences.parquet`` when the user brings pairs, ``unpaired.parquet`` when they bring
labelled single completions for KTO) into one folder, atomically, plus a metrics file with
row counts and what was dropped.
"""

from __future__ import annotations

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
from alignpipe.data.convert import FormatOptions, convert_source
from alignpipe.data.errors import DataError
from alignpipe.data.readers import is_builtin
from alignpipe.params import DataParams, SourceParams

BUILTIN = "builtin:verifiable-instructions"
Kind = Literal["sft", "prompts", "preferences", "unpaired"]
# output file -> (params field, converter kind, built-in split, schema)
OUTPUTS: dict[str, tuple[str, Kind, str | None, Any]] = {
    "sft": ("sft", "sft", "sft", schema.SFT),
    "prompts": ("prompts", "prompts", "prompts", schema.PROMPTS),
    "eval_prompts": ("eval_prompts", "prompts", "eval", schema.PROMPTS),
    "preferences": ("preferences", "preferences", None, schema.PREFERENCES),
    "unpaired": ("unpaired", "unpaired", None, schema.UNPAIRED_PREPARED),
}
WHAT = {"preferences": "preference pairs", "unpaired": "unpaired (labelled) examples"}


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
    assert source.source is not None
    if is_builtin(source.source):
        if source.source != BUILTIN:
            raise DataError(f"data.{field}.source: unknown built-in '{source.source}' (known: {BUILTIN})")
        if split is None:
            raise DataError(f"data.{field}.source: the built-in task has no {WHAT[field]}")
        sizes = {
            "sft": params.builtin.n_sft,
            "prompts": params.builtin.n_prompts,
            "eval": params.builtin.n_eval,
        }
        rows, dropped, fmt = builtin_rows(split, sizes[split], params.seed), Counter(), "builtin"
    else:
        lang = [source.lang] if isinstance(source.lang, str) else source.lang
        options = FormatOptions(
            format=source.format,
            lang=None if lang is None else tuple(lang),
            pairs=source.pairs,
            rating=source.rating,
        )
        rows, dropped, fmt = convert_source(
            source.source, kind, params.on_invalid, options=options, part=field
        )
    if source.max_rows is not None:
        rows = rows[: source.max_rows]
    return rows, dropped, fmt


def _prompt_key(prompt: list[dict[str, str]]) -> str:
    return json.dumps([[m["role"], m["content"].strip()] for m in prompt])


def check_no_overlap(eval_rows: list[dict[str, Any]], train: dict[str, list[dict[str, Any]]]) -> None:
    """Eval prompts must not appear among the train prompts or SFT prompts."""
    eval_keys = {_prompt_key(r["prompt"]): r for r in eval_rows}
    for name, rows in train.items():
        shared = [r for r in rows if _prompt_key(r["prompt"]) in eval_keys]
        if shared:
            example = shared[0]["prompt"][-1]["content"][:80]
            raise DataError(
                f"{len(shared)} eval prompt(s) also appear in data.{name} (e.g. {example!r}); "
                "held-out evaluation needs disjoint prompts"
            )


def prepare(
    params: DataParams, out_dir: str | os.PathLike, metrics_path: str | os.PathLike
) -> dict[str, Any]:
    """Read, convert and validate every source; write the prepared folder and metrics."""
    timer = Timer("prepare")
    tables: dict[str, list[dict[str, Any]]] = {}
    metrics: dict[str, Any] = {}
    for name, (field, _, _, _) in OUTPUTS.items():
        source = getattr(params, field)
        if source.source is None:
            continue
        rows, dropped, fmt = load_rows(name, source, params)
        tables[name] = rows
        metrics[name] = {"source": source.source, "format": fmt, "rows": len(rows), "dropped": dict(dropped)}
        if name == "unpaired":
            metrics[name]["desirable"] = sum(r["label"] for r in rows)
            metrics[name]["undesirable"] = len(rows) - metrics[name]["desirable"]
    check_no_overlap(tables["eval_prompts"], {"prompts": tables["prompts"], "sft": tables["sft"]})
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, rows in tables.items():
            write_parquet(rows, Path(tmp) / f"{name}.parquet", OUTPUTS[name][3])
    write_json(metrics, metrics_path)
    timer.summary(sum(len(r) for r in tables.values()), "rows", **{k: v["rows"] for k, v in metrics.items()})
    return metrics


@dataclass(frozen=True)
class PreparePaths:
    """Where the stage writes (``dvc.yaml`` passes them on the command line)."""

    out_dir: Path
    metrics: Path


def run(params: DataParams, paths: PreparePaths) -> dict[str, Any]:
    """The stage: every source to ``paths.out_dir``; returns the metrics."""
    return prepare(params, paths.out_dir, paths.metrics)
