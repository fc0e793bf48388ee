"""Preference pairs (``data/pairs/<split>.parquet``, schema PAIRS) read and encoded as token ids.

A pair becomes two token sequences (prompt + chosen, prompt + rejected) through
:func:`alignpipe.core.chat.encode_completion`: the prompt is masked, the completion ends with
exactly one EOS. ``ref_logps``, ``dpo`` and ``evaluate`` all encode pairs here, so the
precomputed and live reference values score the same tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet
from alignpipe.core.chat import ChatTemplateError, Encoded, Truncation, TruncationError, encode_completion


class PairDataError(ValueError):
    """A pair cannot be encoded; the message names the file, the pair and the field."""


@dataclass(frozen=True)
class EncodedPair:
    """One pair as token ids: the same prompt with the chosen and with the rejected completion."""

    pair_id: str
    chosen: Encoded
    rejected: Encoded

    @property
    def n_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def _check_completion(value: Any, field: str, where: str) -> None:
    if not (isinstance(value, Sequence) and len(value) == 1 and value[0].get("role") == "assistant"):
        raise PairDataError(f"{where}: field '{field}': expected exactly one assistant message")


def encode_pair(
    tokenizer: Any, row: Mapping[str, Any], max_length: int, max_prompt_length: int, where: str = "pairs"
) -> EncodedPair:
    """Encode one row of ``schema.PAIRS`` (prompt messages, one assistant message each side)."""
    pair_id = str(row["pair_id"])
    where = f"{where}: pair {pair_id}"
    _check_completion(row["chosen"], "chosen", where)
    _check_completion(row["rejected"], "rejected", where)
    try:
        chosen, rejected = (
            encode_completion(tokenizer, row["prompt"], row[side], max_length, max_prompt_length)
            for side in ("chosen", "rejected")
        )
    except ChatTemplateError as exc:
        raise PairDataError(f"{where}: {exc}") from None
    except TruncationError as exc:
        raise PairDataError(
            f"{where}: {exc} (dpo.max_length={max_length}, dpo.max_prompt_length={max_prompt_length}; "
            "raise dpo.max_prompt_length)"
        ) from None
    if not chosen.prompt_ids:
        raise PairDataError(f"{where}: field 'prompt': renders to no tokens (nothing predicts the answer)")
    return EncodedPair(pair_id, chosen, rejected)


def encode_pairs(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], max_length: int, max_prompt_length: int, where: str
) -> list[EncodedPair]:
    return [encode_pair(tokenizer, row, max_length, max_prompt_length, where) for row in rows]


def count_truncation(pairs: Sequence[EncodedPair]) -> Truncation:
    """Pairs cut to dpo.max_length / dpo.max_prompt_length: their prompt, a completion, or both."""
    counts = Truncation()
    for pair in pairs:
        counts.count(
            pair.chosen.prompt_cut or pair.rejected.prompt_cut,
            pair.chosen.completion_cut or pair.rejected.completion_cut,
        )
    return counts


DPO_LENGTH_KEYS = "dpo.max_length / dpo.max_prompt_length"


def read_pairs(path: Path, tokenizer: Any, max_length: int, max_prompt_length: int) -> list[EncodedPair]:
    """Read and encode ``data/pairs/<split>.parquet``; pair ids must be unique."""
    rows = read_parquet(path, schema.PAIRS)
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if row["pair_id"] in seen:
            raise PairDataError(f"{path}: row {i}: field 'pair_id': duplicate id {row['pair_id']!r}")
        seen.add(row["pair_id"])
    return encode_pairs(tokenizer, rows, max_length, max_prompt_length, where=str(path))
