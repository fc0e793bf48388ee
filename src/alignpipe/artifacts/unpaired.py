"""Unpaired examples (``data/unpaired/<split>.parquet``, schema UNPAIRED) encoded for KTO, and their
reference log-probs (``data/ref_logps_unpaired.parquet``, schema REF_LOGPS_UNPAIRED).

An example is its prompt x_i and completion y_i with a label (True: desirable). KTO's KL reference
point also needs a *mismatched* sequence: x_i with the completion y_j of another example (TRL builds
it by rotating completions within a batch). Here the mismatch is fixed per example, so the reference
side is computed once by ``ref_logps``: order a split's examples by ``sha256(example_id)`` (a fixed
order that mixes prompts, independent of file order and of the batches), and give example k of that
order the completion of the next example, cyclically, whose ``prompt_id`` differs (``kl_example_id``).

Both sequences start with x_i, so an example is encoded as an :class:`EncodedPair` (``chosen`` =
x_i + y_i, ``rejected`` = x_i + y_j) and goes through the pair path of
:mod:`alignpipe.core.logprobs`: one shared prompt row serves the example's completion and its
mismatched completion (:mod:`alignpipe.core.attention`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import ArtifactError, read_parquet
from alignpipe.artifacts.pairs import EncodedPair, PairDataError, encode_pair
from alignpipe.artifacts.ref_logps import PairScores, write_columns


@dataclass(frozen=True)
class UnpairedSet:
    """Encoded examples of one split, aligned by index: ``pairs[i].chosen`` is example i's sequence,
    ``pairs[i].rejected`` its mismatched one (the completion of ``kl_ids[i]`` after the same prompt)."""

    pairs: list[EncodedPair]  # pair_id = example_id
    labels: list[bool]
    kl_ids: list[str]

    def __len__(self) -> int:
        return len(self.pairs)

    def __add__(self, other: UnpairedSet) -> UnpairedSet:
        return UnpairedSet(self.pairs + other.pairs, self.labels + other.labels, self.kl_ids + other.kl_ids)


def kl_partners(rows: Sequence[Mapping[str, Any]], where: str) -> list[int]:
    """For each row, the index of the row whose completion is its mismatched (KL) completion."""
    if not rows:
        return []
    order = sorted(
        range(len(rows)), key=lambda i: hashlib.sha256(str(rows[i]["example_id"]).encode()).digest()
    )
    partner = [0] * len(rows)
    n = len(order)
    for k, i in enumerate(order):
        for step in range(1, n):
            j = order[(k + step) % n]
            if rows[j]["prompt_id"] != rows[i]["prompt_id"]:
                partner[i] = j
                break
        else:
            raise PairDataError(
                f"{where}: every example has prompt_id {rows[i]['prompt_id']!r}; KTO's KL point needs "
                "completions of at least two prompts"
            )
    return partner


def encode_unpaired(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], max_length: int, max_prompt_length: int, where: str
) -> UnpairedSet:
    """Encode rows of ``schema.UNPAIRED`` with their mismatched completions (see :func:`kl_partners`)."""
    partner = kl_partners(rows, where)
    pairs = []
    for row, j in zip(rows, partner, strict=True):
        as_pair = {"pair_id": row["example_id"], "prompt": row["prompt"], "chosen": row["completion"],
                   "rejected": rows[j]["completion"]}  # fmt: skip
        try:
            pairs.append(encode_pair(tokenizer, as_pair, max_length, max_prompt_length, where))
        except PairDataError as exc:
            raise as_example_error(exc, rows[j]["example_id"]) from None
    return UnpairedSet(pairs, [bool(r["label"]) for r in rows], [str(rows[j]["example_id"]) for j in partner])


def as_example_error(exc: PairDataError, kl_id: str) -> PairDataError:
    """A pair-path error named as an unpaired file has its fields (example, completion, the KL mismatch)."""
    msg = str(exc).replace(": pair ", ": example ").replace("'chosen'", "'completion'")
    return PairDataError(msg.replace("'rejected'", f"'completion' of {kl_id} (the KL mismatch)"))


def read_unpaired(path: Path, tokenizer: Any, max_length: int, max_prompt_length: int) -> UnpairedSet:
    """Read and encode ``data/unpaired/<split>.parquet``; example ids must be unique, labels set."""
    rows = read_unpaired_rows(path, schema.UNPAIRED)
    return encode_unpaired(tokenizer, rows, max_length, max_prompt_length, where=str(path))


def read_unpaired_rows(path: Path, table_schema: Any) -> list[dict[str, Any]]:
    """The rows of an unpaired file (``table_schema``: UNPAIRED, or with images), checked: example ids
    unique, every label set."""
    rows = read_parquet(path, table_schema)
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if row["example_id"] in seen:
            raise PairDataError(f"{path}: row {i}: field 'example_id': duplicate id {row['example_id']!r}")
        if row["label"] is None:
            raise PairDataError(f"{path}: row {i}: field 'label': missing (true: desirable, false: not)")
        seen.add(row["example_id"])
    return rows


@dataclass(frozen=True)
class UnpairedScores:
    """Per example, aligned with ``example_ids``: summed log-probs (float64) and scored tokens (int64) of
    its completion and of its mismatched completion ``kl_ids``, (N,) each."""

    example_ids: list[str]
    logps: Tensor
    tokens: Tensor
    kl_ids: list[str]
    kl_logps: Tensor
    kl_tokens: Tensor

    def __len__(self) -> int:
        return len(self.example_ids)

    @classmethod
    def from_pair_scores(cls, scores: PairScores, kl_ids: Sequence[str]) -> UnpairedScores:
        """From :func:`alignpipe.core.logprobs.pair_scores` of an :class:`UnpairedSet`'s pairs."""
        return cls(list(scores.pair_ids), scores.chosen, scores.chosen_tokens, list(kl_ids), scores.rejected,
                   scores.rejected_tokens)  # fmt: skip

    @classmethod
    def empty(cls) -> UnpairedScores:
        z, n = torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
        return cls([], z, n, [], z, n)

    def write(self, path: str | os.PathLike) -> None:
        """``path`` as schema REF_LOGPS_UNPAIRED (atomically)."""
        columns = {
            "example_id": self.example_ids,
            "ref_logps": self.logps,
            "tokens": self.tokens,
            "kl_example_id": self.kl_ids,
            "ref_kl_logps": self.kl_logps,
            "kl_tokens": self.kl_tokens,
        }
        write_columns(columns, path, schema.REF_LOGPS_UNPAIRED)

    @classmethod
    def read(cls, path: str | os.PathLike) -> UnpairedScores:
        rows = read_parquet(path, schema.REF_LOGPS_UNPAIRED)

        def col(name: str, dtype: torch.dtype) -> Tensor:
            return torch.tensor([r[name] for r in rows], dtype=dtype)

        return cls([r["example_id"] for r in rows], col("ref_logps", torch.float64), col("tokens", torch.long),
                   [r["kl_example_id"] for r in rows], col("ref_kl_logps", torch.float64),
                   col("kl_tokens", torch.long))  # fmt: skip

    def aligned(self, data: UnpairedSet, where: str) -> UnpairedScores:
        """The scores of ``data``'s examples, in their order; a missing example, another KL partner or a
        token count that differs from the encoding here means the scores are stale."""
        index = {eid: i for i, eid in enumerate(self.example_ids)}
        picked = []
        for pair, kl_id in zip(data.pairs, data.kl_ids, strict=True):
            i = index.get(pair.pair_id)
            if i is None:
                raise ArtifactError(
                    f"{where}: no reference log-probs for example {pair.pair_id!r} (rerun ref_logps)"
                )
            stored = (int(self.tokens[i]), self.kl_ids[i], int(self.kl_tokens[i]))
            here = (len(pair.chosen.completion_ids), kl_id, len(pair.rejected.completion_ids))
            if stored != here:
                raise ArtifactError(
                    f"{where}: example {pair.pair_id!r}: (tokens, KL partner, KL tokens) {stored} differ from "
                    f"{here} here (stale ref_logps; rerun it)"
                )
            picked.append(i)
        idx = torch.tensor(picked, dtype=torch.long)
        return UnpairedScores([p.pair_id for p in data.pairs], self.logps[idx], self.tokens[idx],
                              list(data.kl_ids), self.kl_logps[idx], self.kl_tokens[idx])  # fmt: skip
