"""The ``ref_logps`` stage: reference (SFT) log-probs of every train and eval pair, cached once.

A sweep over ``dpo.beta`` or ``dpo.loss_type`` reuses them; ``dpo`` then holds no reference model.
They go through the same path as the live reference of ``dpo`` (:func:`alignpipe.core.logprobs.load_reference`
and :func:`~alignpipe.core.logprobs.pair_scores`), in length-sorted padding-free batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.artifacts.io import write_json
from alignpipe.artifacts.pairs import DPO_LENGTH_KEYS, PairDataError, count_truncation, read_pairs
from alignpipe.artifacts.ref_logps import PairScores
from alignpipe.core.chat import require_chat_template
from alignpipe.core.logprobs import pair_scores
from alignpipe.core.models import load_tokenizer, pick_device
from alignpipe.core.progress import Timer
from alignpipe.params import DpoParams, RefLogpsParams
from alignpipe.training.numerics import Numerics, reference_scorer

SPLITS = ("train", "eval", "test")  # test: evaluate.preferences (evaluate reads its SFT log-probs here)


def run_ref_logps(
    model_dir: Path,
    pairs_dir: Path,
    out: Path,
    params: RefLogpsParams,
    max_length: int,
    max_prompt_length: int,
    metrics: Path | None = None,
    policy: Numerics | None = None,
    reference_free: bool = False,
) -> dict[str, Any]:
    """Write ``out`` (schema.REF_LOGPS), one row per pair of ``pairs_dir/{train,eval}.parquet``,
    and ``metrics`` (pairs, tokens, what the length limits cut, seconds) when given.

    ``policy``: how dpo's policy computes; with ``ref_logps.dtype: auto`` the reference is computed the
    same way (weights, autocast, 4-bit base), so dpo's step-1 loss is ln 2 on any device.

    ``reference_free`` (``dpo.reference_free``): no model runs; every log-prob is 0 (the token counts
    are the pairs' own), which is what ``dpo`` and ``evaluate`` then read."""
    tokenizer = load_tokenizer(model_dir)
    require_chat_template(tokenizer, where=str(model_dir))
    pairs = []
    for split in SPLITS:
        path = pairs_dir / f"{split}.parquet"
        if split == "train" or path.exists():
            pairs += read_pairs(path, tokenizer, max_length, max_prompt_length)
    ids = [p.pair_id for p in pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PairDataError(f"{pairs_dir}: pair_id {dup!r} is in both train and eval")
    truncation = count_truncation(pairs)
    truncation.warn("ref_logps", "pairs", DPO_LENGTH_KEYS)
    timer = Timer("ref_logps")
    if reference_free:
        counts = [(len(p.chosen.completion_ids), len(p.rejected.completion_ids)) for p in pairs]
        scores = PairScores.from_rows(ids, [(0.0, 0.0, c, r) for c, r in counts])
    else:
        numerics = policy if policy is not None and params.dtype == "auto" else Numerics(params.dtype)
        device = pick_device()
        scorer = reference_scorer(model_dir, numerics, device)
        with numerics.context(device):
            scores = pair_scores(scorer, pairs, params.batch_size, tokenizer.pad_token_id, progress=True)
    n_tokens = sum(p.n_tokens for p in pairs)
    timer.summary(
        len(pairs), "pairs", tokens=n_tokens, tokens_per_s=round(n_tokens / max(timer.seconds, 1e-9))
    )
    scores.write(out)
    summary = {"pairs": len(pairs), "tokens": n_tokens, "truncation": truncation.as_dict(),
               "seconds": round(timer.seconds, 2), "reference_free": reference_free}  # fmt: skip
    if metrics is not None:
        write_json(summary, metrics)
    return summary


@dataclass(frozen=True)
class RefLogpsPaths:
    """Where the stage reads and writes (``dvc.yaml`` passes them on the command line)."""

    model: Path
    pairs: Path
    out: Path
    metrics: Path | None = None  # pairs, tokens, truncation, seconds


@dataclass(frozen=True)
class RefLogpsSettings:
    """The sections the stage reads: its own, and of ``dpo`` the tokenization lengths and how its
    policy computes (``dpo.dtype``, ``dpo.peft.enabled``, ``dpo.peft.load_in_4bit``)."""

    ref_logps: RefLogpsParams
    dpo: DpoParams


def run(params: RefLogpsSettings, paths: RefLogpsPaths) -> dict[str, Any]:
    """The stage: reference log-probs of every pair; returns counts and time."""
    dpo = params.dpo
    return run_ref_logps(
        paths.model,
        paths.pairs,
        paths.out,
        params.ref_logps,
        dpo.max_length,
        dpo.max_prompt_length,
        paths.metrics,
        Numerics.of_policy(dpo.dtype, dpo.peft.enabled, dpo.peft.load_in_4bit),  # how dpo computes
        dpo.reference_free,
    )
