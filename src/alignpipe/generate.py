"""The ``generate`` stage: ``n`` sampled completions per train prompt, in resumable shards.

Output folder (``data/generations/``): chunk files and a manifest, the format of
:mod:`alignpipe.artifacts.generations` (``score`` reads it from there).

Sharding (the choice made here): one DVC stage and one output folder for any
number of shards. Chunk ``k`` belongs to shard ``k % generate.num_shards``.
``dvc repro`` runs every shard in turn; ``python stages/generate.py ... --shard i``
runs shard ``i`` alone, on another GPU or machine. To combine, copy the chunk
files of every shard into one ``data/generations/`` and run the stage again
(``dvc repro generate``): it finds every chunk done, writes the manifest and
samples nothing. DVC foreach/matrix stages were not used because they fix the
shard count in ``dvc.yaml`` and give ``score`` one folder per shard to list; here
1 or 64 shards keep the same DAG. Set ``generate.backend`` explicitly (not ``auto``)
when shards run on different kinds of machines, or their fingerprints differ.

Resuming: each chunk is written atomically as soon as it is done, and the output
is a ``persist`` out, so an interrupted run continues with the chunks not yet
there. Chunks whose fingerprint (model, prompts, sampling settings; see
:func:`fingerprint`) differs from the current run's are deleted first. Every sample
draws from its own seed (``alignpipe.generation``), so the output does not depend
on how the run was sharded, split or resumed.

A rated set (``data.rated``: rows in ``data/prepared/rated.parquet``) skips the stage: it samples
nothing and writes the marker folder ``SKIPPED.json`` (a constant), and ``score`` imports the ratings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.artifacts.generations import (
    FORMAT_VERSION,
    Chunk,
    plan_chunks,
    prune_stale,
    read_generations,
    write_chunk,
    write_manifest,
)
from alignpipe.artifacts.io import ArtifactError, atomic_path, read_parquet, write_json
from alignpipe.artifacts.schema import PROMPTS, RATED, with_images
from alignpipe.core.progress import Timer
from alignpipe.generation.base import Backend, PromptRequest, build_requests, resolve_backend
from alignpipe.generation.load import load_chat_tokenizer, loaded_backend
from alignpipe.params import GenerateParams
from alignpipe.vision.backend import build_vision_requests, open_vision_backend
from alignpipe.vision.models import is_vision_model_folder, load_processor

# Settings that change speed or memory but not the samples: changing them keeps finished chunks.
NOT_FINGERPRINTED = {"num_shards", "batch_size", "gpu_memory_utilization", "tensor_parallel_size"}
SKIPPED = "SKIPPED.json"  # the marker of a run skipped for a rated set (data.rated)
FULL_HASH_LIMIT = 1 << 30  # model files up to 1 GiB are hashed whole; larger ones by size and 16 sampled MiB


def shard_chunks(chunks: Sequence[Chunk], num_shards: int, shard: int | None) -> list[Chunk]:
    """The chunks of shard ``shard`` (round robin: chunk k -> shard k % num_shards); all when shard is None."""
    if shard is None:
        return list(chunks)
    if not 0 <= shard < num_shards:
        raise ValueError(
            f"--shard {shard} is out of range: generate.num_shards is {num_shards} (shards 0..{num_shards - 1})"
        )
    return [c for c in chunks if c.index % num_shards == shard]


def model_digest(model_dir: str | os.PathLike) -> str:
    """Digest of a model folder's files (names and contents; files over 1 GiB by size and samples)."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= FULL_HASH_LIMIT:
                h.update(hashlib.file_digest(f, "sha256").digest())
            else:
                for i in range(16):
                    f.seek(i * (size - (1 << 20)) // 15)
                    h.update(f.read(1 << 20))
    return h.hexdigest()


def fingerprint(
    params: GenerateParams,
    backend: str,
    model: str,
    prompt_ids: Sequence[str],
    requests: Sequence[PromptRequest],
) -> str:
    """What decides the samples: model digest, rendered prompts, backend, device kind and dtype,
    sampling settings, chunking (``auto`` resolved, so a CPU and a GPU run never mix chunks)."""
    from alignpipe.core.models import pick_device, resolve_dtype
    from alignpipe.generation.vllm import engine_device

    device = engine_device() if backend == "vllm" else pick_device().type
    settings = params.model_dump(exclude=NOT_FINGERPRINTED)
    settings.update(backend=backend, device=device, dtype=str(resolve_dtype(params.dtype, device)))
    h = hashlib.sha256(
        json.dumps({"version": FORMAT_VERSION, "settings": settings, "model": model}, sort_keys=True).encode()
    )
    for pid, req in zip(prompt_ids, requests, strict=True):
        h.update(f"{pid}\0{req.text}\0".encode())
    return h.hexdigest()[:32]


def generate_chunk(
    backend: Backend,
    requests: Sequence[PromptRequest],
    prompt_ids: Sequence[str],
    chunk: Chunk,
    n: int,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """GENERATIONS rows of one chunk, in (prompt, sample_idx) order."""
    samples = backend.generate(requests[chunk.start : chunk.stop], n, progress)
    return [
        dict(
            prompt_id=prompt_ids[chunk.start + s.prompt_index],
            sample_idx=s.sample_idx,
            completion=s.completion,
            n_tokens=s.n_tokens,
            finish_reason=s.finish_reason,
            logprob=s.logprob,
            backend=backend.name,
            seed=s.seed,
        )
        for s in samples
    ]


def _load_prompts(
    prompts_path: str | os.PathLike, vision: bool = False
) -> tuple[list[str], list[Any], list[Any]]:
    """Prompt ids, prompts and (for a VLM, from the ``images`` column) each prompt's images."""
    rows = read_parquet(prompts_path, with_images(PROMPTS) if vision else PROMPTS)
    if not rows:
        raise ArtifactError(f"{prompts_path}: no prompts")
    ids = [r["prompt_id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ArtifactError(f"{prompts_path}: prompt_id '{dup}' appears more than once")
    return ids, [r["prompt"] for r in rows], [r.get("images") or [] for r in rows]


def run_generate(
    model_dir: str | os.PathLike,
    prompts_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    params: GenerateParams,
    *,
    shard: int | None = None,
    metrics_path: str | os.PathLike | None = None,
    progress: bool = True,
    after_chunk: Callable[[Chunk], None] | None = None,
) -> dict[str, Any]:
    """Sample the chunks of ``shard`` (all when None) that are not done yet; return the metrics.

    Writes ``manifest.json`` once every chunk of every shard is in ``out_dir``.
    ``after_chunk`` is called after each chunk is written (tests use it to interrupt a run).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vision = is_vision_model_folder(model_dir)  # dispatched once, on the model's config
    prompt_ids, prompts, images = _load_prompts(prompts_path, vision)
    tokenizer = load_processor(model_dir) if vision else load_chat_tokenizer(model_dir)
    backend_name = resolve_backend(params.backend)
    if vision:
        requests = build_vision_requests(tokenizer, prompts, images, prompt_ids, params.seed)
    else:
        requests = build_requests(tokenizer, prompts, prompt_ids, params.seed)
    fp = fingerprint(params, backend_name, model_digest(model_dir), prompt_ids, requests)
    chunks = plan_chunks(len(prompts), params.chunk_prompts)
    done = prune_stale(out_dir, fp)
    todo = [c for c in shard_chunks(chunks, params.num_shards, shard) if c.path_name not in done]
    timer = Timer("generate" if shard is None else f"generate shard {shard}/{params.num_shards}")
    new_rows: list[dict[str, Any]] = []
    if todo:
        opened = (contextlib.closing(open_vision_backend(model_dir, params, tokenizer, requests)) if vision
                  else loaded_backend(model_dir, params, tokenizer))  # fmt: skip
        with opened as backend:
            for chunk, rows in _sample_chunks(backend, requests, prompt_ids, todo, params.n, timer, progress):
                write_chunk(out_dir / chunk.path_name, rows, fp)
                new_rows += rows
                if after_chunk is not None:
                    after_chunk(chunk)
    tokens = sum(r["n_tokens"] for r in new_rows)
    timer.summary(tokens, "tokens", prompts=sum(c.stop - c.start for c in todo), samples=len(new_rows))
    metrics: dict[str, Any] = {
        "backend": backend_name,
        "shard": shard,
        "chunks": len(chunks),
        "chunks_generated": len(todo),
        "chunks_reused": len(chunks) - len(todo) if shard is None else None,
        "prompts_generated": sum(c.stop - c.start for c in todo),
        "samples_generated": len(new_rows),
        "tokens_generated": tokens,
        "seconds": round(timer.seconds, 2),
        "tokens_per_s": round(tokens / timer.seconds, 1) if tokens else None,
    }
    missing = sorted({c.index % params.num_shards for c in chunks if not (out_dir / c.path_name).exists()})
    if missing:
        print(f"generate: {out_dir} is incomplete; shard(s) {missing} still to run", flush=True)
    else:
        metrics.update(_finalize(out_dir, chunks, fp, params, backend_name, len(prompts)))
    metrics["complete"] = not missing
    if metrics_path is not None:
        write_json(metrics, metrics_path)
    return metrics


def _sample_chunks(
    backend: Backend,
    requests: Sequence[PromptRequest],
    prompt_ids: Sequence[str],
    todo: Sequence[Chunk],
    n: int,
    timer: Timer,
    progress: bool,
) -> Iterator[tuple[Chunk, list[dict[str, Any]]]]:
    """Yield each chunk's rows as it finishes, under one tqdm bar (prompts, generated tokens/s)."""
    from tqdm.auto import tqdm

    tokens = 0
    total = sum(c.stop - c.start for c in todo)
    with tqdm(total=total, desc="generate", unit="prompt", disable=not progress) as bar:
        for chunk in todo:
            rows = generate_chunk(backend, requests, prompt_ids, chunk, n, bar.update)
            tokens += sum(r["n_tokens"] for r in rows)
            bar.set_postfix(tok_s=f"{tokens / max(timer.seconds, 1e-9):.0f}")
            yield chunk, rows


def _finalize(
    out_dir: Path, chunks: Sequence[Chunk], fp: str, params: GenerateParams, backend: str, n_prompts: int
) -> dict[str, Any]:
    """Write the manifest, check the whole output, and return its statistics."""
    for tmp in out_dir.glob(".*.tmp"):  # leftovers of a killed run (atomic_path temp folders)
        shutil.rmtree(tmp, ignore_errors=True)
    write_manifest(out_dir, chunks, fp, backend=backend, prompts=n_prompts, n=params.n,
                   chunk_prompts=params.chunk_prompts, num_shards=params.num_shards)  # fmt: skip
    rows = read_generations(out_dir)
    lengths = [r["n_tokens"] for r in rows]
    return {
        "prompts": n_prompts,
        "samples": len(rows),
        "mean_tokens": round(sum(lengths) / len(lengths), 2),
        "finish_length_rate": round(sum(r["finish_reason"] == "length" for r in rows) / len(rows), 4),
        "distinct_completion_rate": round(_distinct_rate(rows, params.n), 4),
    }


def _distinct_rate(rows: list[dict[str, Any]], n: int) -> float:
    """Mean fraction of distinct completions among a prompt's n samples (best-of-N needs variety)."""
    by_prompt: dict[str, set[str]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], set()).add(r["completion"])
    return sum(len(s) for s in by_prompt.values()) / (n * len(by_prompt))


def skip_for_rated(rated: list[dict[str, Any]], out_dir: Path, metrics_path: Path | None) -> dict[str, Any]:
    """A rated set brings its scored completions (``data.rated``): sample nothing, write the constant
    marker folder ``out_dir/SKIPPED.json`` (score then reads ``rated.parquet``) and say so."""
    n_prompts = len({r["prompt_id"] for r in rated})
    marker = {"skipped": "rated set", "why": "data.rated brings scored completions; score imports them"}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        (tmp / SKIPPED).write_text(json.dumps(marker, indent=2) + "\n")
    metrics: dict[str, Any] = {"skipped": "rated set", "prompts": n_prompts, "rated_completions": len(rated),
                               "samples_generated": 0, "complete": True}  # fmt: skip
    if metrics_path is not None:
        write_json(metrics, metrics_path)
    print(f"generate: skipped: rated set ({len(rated)} rated completions of {n_prompts} prompts, "
          f"data.rated); wrote the marker {out_dir}/{SKIPPED}", flush=True)  # fmt: skip
    return metrics


@dataclass(frozen=True)
class GeneratePaths:
    """Where the stage reads and writes (``dvc.yaml`` passes them on the command line)."""

    model: Path
    prompts: Path
    out: Path
    metrics: Path | None = None
    rated: Path | None = None  # data/prepared/rated.parquet: rows there mean no sampling


def run(params: GenerateParams, paths: GeneratePaths, shard: int | None = None) -> dict[str, Any]:
    """The stage (one shard of it when ``shard`` is set); returns the metrics."""
    rated = read_parquet(paths.rated, RATED) if paths.rated is not None else []
    if rated:
        return skip_for_rated(rated, paths.out, paths.metrics)
    (paths.out / SKIPPED).unlink(missing_ok=True)  # a marker left by an earlier rated run (persist out)
    return run_generate(
        paths.model, paths.prompts, paths.out, params, shard=shard, metrics_path=paths.metrics
    )
