"""The ``ref_logps`` stage on a vision-language model (the SFT folder has a vision config).

Pairs come from ``data/pairs/{train,eval,test}.parquet`` with their ``images`` column (the pairs stage
writes it on image data); each is encoded once through the processor
(:func:`alignpipe.vision.logprobs.read_vision_pairs`) and scored by the frozen VLM in length-sorted
batches (:func:`~alignpipe.vision.logprobs.vision_pair_scores`): a pair's images go through the vision
tower once and both answers share the features. The output is the text path's ``REF_LOGPS`` file.
With ``dtype: auto`` the reference computes as dpo's policy does (weights, autocast). With
``ref_logps.unpaired`` (KTO) the unpaired examples of ``data/unpaired`` are scored too, each with its KL
mismatch in one shared-prompt row and its images through the tower once
(:mod:`alignpipe.vision.unpaired`), into the text path's ``REF_LOGPS_UNPAIRED`` file. Not built yet: a
4-bit base on a VLM (refused in one line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignpipe.artifacts.io import write_json
from alignpipe.artifacts.pairs import PairDataError, count_truncation
from alignpipe.artifacts.ref_logps import PairScores
from alignpipe.artifacts.unpaired import UnpairedScores
from alignpipe.core.models import pick_device
from alignpipe.core.progress import Timer
from alignpipe.params import RefLogpsParams
from alignpipe.training.numerics import Numerics
from alignpipe.vision.logprobs import (
    VisionPair,
    read_vision_pairs,
    vision_pair_scores,
    vision_reference_scorer,
)
from alignpipe.vision.models import load_processor
from alignpipe.vision.unpaired import read_vision_unpaired_splits


def read_vision_splits(pairs_dir: Path, processor: Any, max_length: int, splits: tuple[str, ...]) -> list[VisionPair]:  # fmt: skip
    """The pairs of ``splits`` (train required, the others when present); ids unique across them."""
    pairs: list[VisionPair] = []
    for split in splits:
        path = pairs_dir / f"{split}.parquet"
        if split == "train" or path.exists():
            pairs += read_vision_pairs(path, processor, max_length)
    ids = [p.pair_id for p in pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PairDataError(f"{pairs_dir}: pair_id {dup!r} is in more than one split")
    return pairs


def _zeros(pairs: list[Any]) -> PairScores:
    """Reference-free scores: every log-prob 0, the token counts the pairs' own."""
    counts = [(len(p.chosen.completion_ids), len(p.rejected.completion_ids)) for p in pairs]
    return PairScores.from_rows([p.pair_id for p in pairs], [(0.0, 0.0, c, r) for c, r in counts])


def run_vision_ref_logps(
    model_dir: Path,
    pairs_dir: Path,
    out: Path,
    params: RefLogpsParams,
    max_length: int,
    metrics: Path | None,
    numerics: Numerics,
    reference_free: bool,
    unpaired: tuple[Path | None, Path] | None,
    splits: tuple[str, ...],
) -> dict[str, Any]:
    """:func:`alignpipe.ref_logps.run_ref_logps` for a VLM (``numerics``: already resolved from dpo)."""
    processor = load_processor(model_dir)
    pairs = read_vision_splits(pairs_dir, processor, max_length, splits)
    folder = unpaired[0] if unpaired is not None else None
    examples = read_vision_unpaired_splits(folder, processor, max_length) if folder is not None else None
    examples = examples or None  # no examples: nothing to score, an empty file
    timer = Timer("ref_logps")
    unpaired_scores = UnpairedScores.empty()
    if reference_free:
        scores = _zeros(pairs)
        if examples is not None:
            unpaired_scores = UnpairedScores.from_pair_scores(_zeros(examples.pairs), examples.kl_ids)
    else:
        device = pick_device()
        scorer = vision_reference_scorer(model_dir, numerics, device)
        pad = processor.tokenizer.pad_token_id
        with numerics.context(device):
            scores = vision_pair_scores(scorer, pairs, params.batch_size, pad)
            if examples is not None:  # an example and its KL mismatch share their prompt and images
                found = vision_pair_scores(scorer, examples.pairs, params.batch_size, pad)
                unpaired_scores = UnpairedScores.from_pair_scores(found, examples.kl_ids)
    if unpaired is not None:
        unpaired_scores.write(unpaired[1])
    scores.write(out)
    n_tokens = sum(p.n_tokens for p in pairs) + (sum(p.n_tokens for p in examples.pairs) if examples else 0)
    timer.summary(len(pairs), "pairs", tokens=n_tokens)
    summary = {"pairs": len(pairs), "tokens": n_tokens, "truncation": count_truncation(pairs).as_dict(), "seconds": round(timer.seconds, 2),
               "reference_free": reference_free, "vision": True}  # fmt: skip
    if examples is not None:
        summary["unpaired_examples"] = len(examples)
        summary["unpaired_truncation"] = count_truncation(examples.pairs).as_dict()
    if metrics is not None:
        write_json(summary, metrics)
    return summary
