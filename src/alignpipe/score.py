"""The ``score`` stage: a reward for every generated completion.

Reads ``data/generations/`` (through ``alignpipe.artifacts.generations.read_generations``, which refuses an
unfinished run) and the prompts they answer, scores each completion with the configured
reward (``alignpipe.rewards``) and writes
``data/scored.parquet`` (schema SCORED: every generation column + ``reward`` +
``reward_details`` as JSON) and a small metrics file. A non-finite reward stops the stage
with an error naming the rows (prompt_id, sample_idx).

With a rated set (``data.rated``: rows in ``data/prepared/rated.parquet``; generate then only wrote
its marker) the ratings are the reward: :func:`import_rated` writes them to ``scored.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.artifacts import schema
from alignpipe.artifacts.generations import read_generations
from alignpipe.artifacts.io import ArtifactError, read_parquet, write_json, write_parquet
from alignpipe.core.progress import Timer
from alignpipe.params import RewardParams
from alignpipe.rewards.base import Reward, RewardResult, reward_truncation, score_completions
from alignpipe.rewards.load import get_reward
from alignpipe.training.fingerprint import sha256_tree


def score_rows(
    reward: Reward,
    generations: list[dict[str, Any]],
    prompts: dict[str, dict[str, Any]],
    images: dict[str, list[Any]] | None = None,
) -> list[dict[str, Any]]:
    """Scored rows (SCORED columns) for ``generations``; ``prompts`` maps prompt_id to its PROMPTS row,
    ``images`` (VLM prompts; every reward but builtin) to its opened images, passed per completion (shared)."""
    for row in generations:
        if row["prompt_id"] not in prompts:
            raise ArtifactError(f"generations: prompt_id {row['prompt_id']!r} is not in the prompts file")
    results = score_completions(
        reward,
        [prompts[r["prompt_id"]]["prompt"] for r in generations],
        [r["completion"] for r in generations],
        [prompts[r["prompt_id"]]["meta"] for r in generations],
        labels=[f"(prompt_id={r['prompt_id']}, sample_idx={r['sample_idx']})" for r in generations],
        images=None if images is None else [images[r["prompt_id"]] for r in generations],
    )
    return [
        {**row, "reward": res.reward, "reward_details": json.dumps(res.details, sort_keys=True)}
        for row, res in zip(generations, results, strict=True)
    ]


def score_metrics(
    reward_name: str, rows: list[dict[str, Any]], results: list[RewardResult]
) -> dict[str, Any]:
    """What ``reports/score.json`` holds: counts, the reward distribution, truncations, pass rates."""
    rewards = [r.reward for r in results]
    metrics: dict[str, Any] = {
        "reward": reward_name,
        "samples": len(rows),
        "prompts": len({r["prompt_id"] for r in rows}),
        "reward_mean": statistics.fmean(rewards),
        "reward_std": statistics.pstdev(rewards),
        "reward_min": min(rewards),
        "reward_max": max(rewards),
        "truncated": sum(bool(r.details.get("truncated")) for r in results),
        "truncation": reward_truncation(results).as_dict(),  # by what was cut: prompt, completion, both
    }
    passed: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for res in results:
        for key, value in res.details.items():
            if key not in ("truncated", "truncated_part") and isinstance(value, bool):
                seen[key] += 1
                passed[key] += value
    if seen:
        metrics["pass_rate"] = {key: passed[key] / seen[key] for key in sorted(seen)}
    return metrics


def score(
    generations_dir: str | os.PathLike,
    prompts_path: str | os.PathLike,
    out: str | os.PathLike,
    metrics_path: str | os.PathLike,
    params: RewardParams,
    reward_model: Path | None = None,
) -> dict[str, Any]:
    """Run the stage: read, score, write ``out`` and ``metrics_path``; return the metrics.

    ``reward_model``: the reward_model stage's folder, scored with by ``reward.kind: trained``."""
    prompt_rows = read_parquet(prompts_path, schema.PROMPTS)
    prompts = {r["prompt_id"]: r for r in prompt_rows}
    # VLM prompts: their images go to every reward but the built-in verifier (text tasks); a text hf
    # or trained model then refuses in one line rather than score answers without their image
    images = prompt_images(prompts_path) if params.kind != "builtin" else None
    position = {pid: i for i, pid in enumerate(prompts)}
    generations = read_generations(generations_dir)  # checked complete: every prompt has its n samples
    if not generations:
        raise ArtifactError(f"{generations_dir}: no generations to score")
    generations.sort(key=lambda r: (position.get(r["prompt_id"], -1), r["prompt_id"], r["sample_idx"]))
    timer = Timer("score")
    reward = get_reward(params, reward_model)
    try:
        rows = score_rows(reward, generations, prompts, images)
    finally:
        reward.close()
    write_parquet(rows, out, schema.SCORED)
    results = [RewardResult(r["reward"], json.loads(r["reward_details"])) for r in rows]
    metrics = score_metrics(reward.name, rows, results)
    metrics["reward_hash"] = reward_hash(params, reward_model)
    metrics["seconds"] = round(timer.seconds, 2)
    write_json(metrics, metrics_path)
    timer.summary(
        len(rows), "samples", mean_reward=f"{metrics['reward_mean']:.3f}", truncated=metrics["truncated"]
    )
    if metrics["truncated"]:
        print(
            f"score: {metrics['truncated']} conversation(s) cut to reward.max_length={params.max_length} tokens"
        )
    reward_truncation(results).warn("score", "conversations", "reward.max_length")
    return metrics


def prompt_images(prompts_path: str | os.PathLike) -> dict[str, list[Any]] | None:
    """prompt_id -> its images (PIL, opened once) when the prompts have an ``images`` column (VLM data);
    None for text prompts (the reward is then called as before)."""
    import pyarrow.parquet as pq

    if "images" not in pq.read_schema(prompts_path).names:
        return None
    from alignpipe.vision.models import open_images

    rows = read_parquet(prompts_path, schema.with_images(schema.PROMPTS))
    return {r["prompt_id"]: open_images(r["images"] or []) for r in rows}


def reward_hash(params: RewardParams, reward_model: Path | None = None) -> str:
    """The version of the reward: SHA-256 of the model folder (trained, a local hf folder), of the
    verifier's code (builtin) or of the function's module file (python); a hub id is its name."""
    if params.kind == "trained" and reward_model is not None:
        return sha256_tree(reward_model)
    if params.kind == "hf":
        return sha256_tree(Path(str(params.model))) if Path(str(params.model)).exists() else str(params.model)
    if params.kind == "builtin":
        import alignpipe.data.builtin as verifier

        files = [Path(verifier.__file__), Path(verifier.__file__).with_name("builtin_families.py")]
        return hashlib.sha256("".join(sha256_tree(f) for f in files).encode()).hexdigest()
    import importlib.util

    spec = importlib.util.find_spec(str(params.function).split(":")[0])
    origin = spec.origin if spec is not None else None
    return sha256_tree(Path(origin)) if origin and Path(origin).is_file() else str(params.function)


def import_rated(
    rated: list[dict[str, Any]],
    rated_path: Path,
    prompts_path: str | os.PathLike,
    out: str | os.PathLike,
    metrics_path: str | os.PathLike,
) -> dict[str, Any]:
    """A rated set (``data.rated``): its completions with their ratings become ``scored.parquet``, no
    reward runs. Generation columns a rated completion has not: ``n_tokens``, ``logprob`` and ``seed``
    null, ``finish_reason`` "stop", ``backend`` "rated"."""
    known = {r["prompt_id"] for r in read_parquet(prompts_path, schema.PROMPTS)}
    missing = next((r["prompt_id"] for r in rated if r["prompt_id"] not in known), None)
    if missing is not None:
        raise ArtifactError(f"{rated_path}: prompt_id {missing!r} is not in the prompts file")
    rows = [{**r, "n_tokens": None, "finish_reason": "stop", "logprob": None, "backend": "rated", "seed": None}
            for r in rated]  # fmt: skip
    write_parquet(rows, out, schema.SCORED)
    results = [RewardResult(r["reward"], json.loads(r["reward_details"])) for r in rows]
    first = results[0].details
    metrics = score_metrics(f"rated:{first['format']}:{first['rule']}", rows, results)
    metrics["reward_hash"] = sha256_tree(rated_path)  # the ratings are the reward
    write_json(metrics, metrics_path)
    print(f"score: imported {len(rows)} rated completions of {metrics['prompts']} prompts (reward: "
          f"{metrics['reward']}, data.rated.rating); no reward model ran", flush=True)  # fmt: skip
    return metrics


@dataclass(frozen=True)
class ScorePaths:
    """Where the stage reads and writes (``dvc.yaml`` passes them on the command line)."""

    generations: Path
    prompts: Path
    out: Path
    metrics: Path
    reward_model: Path | None = None  # models/reward (reward.kind: trained)
    rated: Path | None = None  # data/prepared/rated.parquet: rows there are imported instead


def run(params: RewardParams, paths: ScorePaths) -> dict[str, Any]:
    """The stage: a reward for every generation (or the ratings of a rated set); returns the metrics."""
    rated = read_parquet(paths.rated, schema.RATED) if paths.rated is not None else []
    if rated:
        assert paths.rated is not None
        return import_rated(rated, paths.rated, paths.prompts, paths.out, paths.metrics)
    return score(paths.generations, paths.prompts, paths.out, paths.metrics, params, paths.reward_model)
