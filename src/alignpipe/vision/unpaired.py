"""Unpaired examples with images (KTO on a vision-language model): ``data/unpaired/<split>.parquet`` with
an ``images`` column (the pairs stage writes each example's prompt images).

As for text (:mod:`alignpipe.artifacts.unpaired`), an example is run as a pair: ``chosen`` is its prompt
and completion, ``rejected`` the same prompt with its fixed mismatched completion (another prompt's,
:func:`~alignpipe.artifacts.unpaired.kl_partners`), so both read the example's own images: they go
through the vision tower once per example and both sequences share the features
(:class:`alignpipe.vision.logprobs.VisionPair`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from alignpipe.artifacts import schema
from alignpipe.artifacts.pairs import PairDataError
from alignpipe.artifacts.unpaired import UnpairedSet, as_example_error, kl_partners, read_unpaired_rows
from alignpipe.vision.logprobs import encode_vision_pair


def encode_vision_unpaired(
    processor: Any, rows: Sequence[Mapping[str, Any]], max_length: int, where: str
) -> UnpairedSet:
    """Encode unpaired rows with images, each with its mismatched completion after its own prompt."""
    partner = kl_partners(rows, where)
    pairs = []
    for row, j in zip(rows, partner, strict=True):
        as_pair = {"pair_id": row["example_id"], "prompt": row["prompt"], "chosen": row["completion"],
                   "rejected": rows[j]["completion"], "images": row.get("images") or []}  # fmt: skip
        try:
            pairs.append(encode_vision_pair(processor, as_pair, max_length, where))
        except PairDataError as exc:
            raise as_example_error(exc, rows[j]["example_id"]) from None
    return UnpairedSet(pairs, [bool(r["label"]) for r in rows], [str(rows[j]["example_id"]) for j in partner])


def read_vision_unpaired(path: Path, processor: Any, max_length: int) -> UnpairedSet:
    """Read and encode an unpaired file with an ``images`` column (ids unique, labels set)."""
    rows = read_unpaired_rows(path, schema.with_images(schema.UNPAIRED))
    return encode_vision_unpaired(processor, rows, max_length, where=str(path))


def read_vision_unpaired_splits(folder: Path, processor: Any, max_length: int) -> UnpairedSet:
    """The train and eval examples of ``folder`` (each file when present); ids unique across the two."""
    examples = UnpairedSet([], [], [])
    for split in ("train", "eval"):
        if (folder / f"{split}.parquet").exists():
            examples = examples + read_vision_unpaired(folder / f"{split}.parquet", processor, max_length)
    ids = [p.pair_id for p in examples.pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PairDataError(f"{folder}: example_id {dup!r} is in both train and eval")
    return examples
