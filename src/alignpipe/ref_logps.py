"""The ``ref_logps`` stage: reference (SFT) log-probs of every train and eval pair, cached once.

A sweep over ``dpo.beta`` or ``dpo.loss_type`` reuses them; ``dpo`` then holds no reference model.
They go through the same path as the live reference of ``dpo`` (:func:`alignpipe.logprobs.load_reference`
and :func:`~alignpipe.logprobs.pair_logps`), in length-sorted padding-free batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignpipe import schema
from alignpipe.chat import require_chat_template
from alignpipe.cli import Timer
from alignpipe.io import write_json, write_parquet
from alignpipe.logprobs import (
    DPO_LENGTH_KEYS,
    Numerics,
    PairDataError,
    count_truncation,
    load_reference,
    read_pairs,
    reference_logps,
)
from alignpipe.params import RefLogpsParams
from alignpipe.runtime import load_tokenizer, pick_device

SPLITS = ("train", "eval")


def run_ref_logps(
    model_dir: Path,
    pairs_dir: Path,
    out: Path,
    params: RefLogpsParams,
    max_length: int,
    max_prompt_length: int,
    metrics: Path | None = None,
    policy: Numerics | None = None,
) -> dict[str, Any]:
    """Write ``out`` (schema.REF_LOGPS), one row per pair of ``pairs_dir/{train,eval}.parquet``,
    and ``metrics`` (pairs, tokens, what the length limits cut, seconds) when given.

    ``policy``: how dpo's policy computes; with ``ref_logps.dtype: auto`` the reference is computed the
    same way (weights, autocast, 4-bit base), so dpo's step-1 loss is ln 2 on any device."""
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
    numerics = policy if policy is not None and params.dtype == "auto" else Numerics(params.dtype)
    device = pick_device()
    scorer = load_reference(model_dir, numerics, device)
    timer = Timer("ref_logps")
    with numerics.context(device):
        rows = reference_logps(scorer, pairs, params.batch_size, tokenizer.pad_token_id, progress=True)
    n_tokens = sum(p.n_tokens for p in pairs)
    timer.summary(
        len(pairs), "pairs", tokens=n_tokens, tokens_per_s=round(n_tokens / max(timer.seconds, 1e-9))
    )
    write_parquet(rows, out, schema.REF_LOGPS)
    summary = {"pairs": len(pairs), "tokens": n_tokens, "truncation": truncation.as_dict(),
               "seconds": round(timer.seconds, 2)}  # fmt: skip
    if metrics is not None:
        write_json(summary, metrics)
    return summary
