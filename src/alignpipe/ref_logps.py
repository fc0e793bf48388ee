"""The ``ref_logps`` stage: reference (SFT) log-probs of every train and eval pair, cached once.

A sweep over ``dpo.beta`` or ``dpo.loss_type`` reuses them; ``dpo`` then holds no reference model.
With ``ref_logps.unpaired`` (which ``dpo.loss_type: kto`` requires) it also scores every unpaired
example of ``data/unpaired`` and its mismatched KL completion (:mod:`alignpipe.artifacts.unpaired`)
into ``data/ref_logps_unpaired.parquet``; otherwise, or without unpaired examples, that file is empty
(schema REF_LOGPS_UNPAIRED), so the DAG has the same outputs. It does not read ``dpo.loss_type``.
They go through the same path as the live reference of ``dpo`` (:func:`alignpipe.core.logprobs.load_reference`
and :func:`~alignpipe.core.logprobs.pair_scores`), in length-sorted padding-free batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.artifacts.io import write_json
from alignpipe.artifacts.pairs import (
    DPO_LENGTH_KEYS,
    EncodedPair,
    PairDataError,
    count_truncation,
    read_pairs,
)
from alignpipe.artifacts.ref_logps import PairScores
from alignpipe.artifacts.unpaired import UnpairedScores, UnpairedSet, read_unpaired
from alignpipe.core.chat import require_chat_template
from alignpipe.core.logprobs import pair_scores
from alignpipe.core.models import load_tokenizer, pick_device
from alignpipe.core.progress import Timer
from alignpipe.params import DpoParams, RefLogpsParams
from alignpipe.training.numerics import Numerics, reference_scorer
from alignpipe.vision.models import is_vision_model_folder
from alignpipe.vision.ref_logps import run_vision_ref_logps

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
    unpaired: tuple[Path | None, Path] | None = None,
) -> dict[str, Any]:
    """Write ``out`` (schema.REF_LOGPS), one row per pair of ``pairs_dir/{train,eval}.parquet``,
    and ``metrics`` (pairs, tokens, what the length limits cut, seconds) when given.

    ``policy``: how dpo's policy computes; with ``ref_logps.dtype: auto`` the reference is computed the
    same way (weights, autocast, 4-bit base), so dpo's step-1 loss is ln 2 on any device.

    ``unpaired``: ``(data/unpaired folder, out)``: also score its train and eval examples (those present;
    none when the folder is missing or None) and their KL mismatches into ``out`` (REF_LOGPS_UNPAIRED).

    ``reference_free`` (``dpo.reference_free``): no model runs; every log-prob is 0 (the token counts
    are the pairs' own), which is what ``dpo`` and ``evaluate`` then read.

    A VLM folder (a vision config) dispatches once to :mod:`alignpipe.vision.ref_logps`."""
    if is_vision_model_folder(model_dir):
        numerics = policy if policy is not None and params.dtype == "auto" else Numerics(params.dtype)
        return run_vision_ref_logps(model_dir, pairs_dir, out, params, max_length, metrics, numerics,
                                    reference_free, unpaired, SPLITS)  # fmt: skip
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
    examples = _unpaired_examples(unpaired[0], tokenizer, max_length, max_prompt_length) if unpaired else None
    examples = examples or None  # no examples: nothing to score, an empty file
    timer = Timer("ref_logps")
    unpaired_scores = UnpairedScores.empty()
    if reference_free:
        scores = _zeros(pairs)
        if examples is not None:
            unpaired_scores = UnpairedScores.from_pair_scores(_zeros(examples.pairs), examples.kl_ids)
    else:
        numerics = policy if policy is not None and params.dtype == "auto" else Numerics(params.dtype)
        device = pick_device()
        scorer = reference_scorer(model_dir, numerics, device)
        with numerics.context(device):
            scores = pair_scores(scorer, pairs, params.batch_size, tokenizer.pad_token_id, progress=True)
            if examples is not None:  # one pair path: an example and its KL mismatch share their prompt
                found = pair_scores(scorer, examples.pairs, params.batch_size, tokenizer.pad_token_id,
                                    progress=True, desc="ref_logps unpaired")  # fmt: skip
                unpaired_scores = UnpairedScores.from_pair_scores(found, examples.kl_ids)
    if unpaired is not None:
        unpaired_scores.write(unpaired[1])
    n_tokens = sum(p.n_tokens for p in pairs) + (sum(p.n_tokens for p in examples.pairs) if examples else 0)
    timer.summary(
        len(pairs), "pairs", tokens=n_tokens, tokens_per_s=round(n_tokens / max(timer.seconds, 1e-9))
    )
    scores.write(out)
    summary = {"pairs": len(pairs), "tokens": n_tokens, "truncation": truncation.as_dict(),
               "seconds": round(timer.seconds, 2), "reference_free": reference_free}  # fmt: skip
    if examples is not None:
        summary["unpaired_examples"] = len(examples)
        summary["unpaired_truncation"] = count_truncation(examples.pairs).as_dict()
    if metrics is not None:
        write_json(summary, metrics)
    return summary


def _zeros(pairs: list[EncodedPair]) -> PairScores:
    """Reference-free scores: every log-prob 0, the token counts the pairs' own."""
    counts = [(len(p.chosen.completion_ids), len(p.rejected.completion_ids)) for p in pairs]
    return PairScores.from_rows([p.pair_id for p in pairs], [(0.0, 0.0, c, r) for c, r in counts])


def _unpaired_examples(
    folder: Path | None, tokenizer: Any, max_length: int, max_prompt_length: int
) -> UnpairedSet:
    """The train and eval examples of ``folder`` (each file when present); ids unique across the two."""
    examples = UnpairedSet([], [], [])
    for split in SPLITS:
        path = folder / f"{split}.parquet" if folder is not None else None
        if path is not None and path.exists():
            examples = examples + read_unpaired(path, tokenizer, max_length, max_prompt_length)
    ids = [p.pair_id for p in examples.pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PairDataError(f"{folder}: example_id {dup!r} is in both train and eval")
    count_truncation(examples.pairs).warn("ref_logps", "unpaired examples", DPO_LENGTH_KEYS)
    return examples


@dataclass(frozen=True)
class RefLogpsPaths:
    """Where the stage reads and writes (``dvc.yaml`` passes them on the command line)."""

    model: Path
    pairs: Path
    out: Path
    metrics: Path | None = None  # pairs, tokens, truncation, seconds
    unpaired: Path | None = None  # data/unpaired: read with ref_logps.unpaired (KTO)
    out_unpaired: Path | None = None  # schema REF_LOGPS_UNPAIRED; empty without ref_logps.unpaired


@dataclass(frozen=True)
class RefLogpsSettings:
    """The sections the stage reads: its own, and of ``dpo`` the tokenization lengths and how its
    policy computes (``dpo.dtype``, ``dpo.peft.enabled``, ``dpo.peft.load_in_4bit``)."""

    ref_logps: RefLogpsParams
    dpo: DpoParams


def run(params: RefLogpsSettings, paths: RefLogpsPaths) -> dict[str, Any]:
    """The stage: reference log-probs of every pair (and unpaired example); returns counts and time."""
    dpo = params.dpo
    if paths.unpaired is not None and paths.out_unpaired is None:
        raise ValueError("--unpaired needs --out-unpaired (where its reference log-probs go)")
    folder = paths.unpaired if params.ref_logps.unpaired else None  # None: an empty file
    unpaired = None if paths.out_unpaired is None else (folder, paths.out_unpaired)
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
        unpaired,
    )
