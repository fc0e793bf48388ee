"""Summed completion log-probs of pairs under one frozen model, and their file ``data/ref_logps.parquet``.

:class:`PairScores` is what scoring pairs returns (:func:`alignpipe.core.logprobs.pair_scores`)
and what the reference log-probs are on disk (schema REF_LOGPS, one row per pair): ``ref_logps``
writes it, ``dpo`` and ``evaluate`` read it and align it to their encoded pairs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch
from torch import Tensor

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import ArtifactError, read_parquet, write_parquet
from alignpipe.artifacts.pairs import EncodedPair


def write_columns(
    columns: Mapping[str, Sequence[str] | Tensor], path: str | os.PathLike, parquet_schema: pa.Schema
) -> None:
    """One row per index of ``columns`` (name -> ids or an (N,) tensor, all of length N), as
    ``parquet_schema`` (atomically): the writer of :class:`PairScores` and of its unpaired twin."""
    values = [c.tolist() if isinstance(c, Tensor) else c for c in columns.values()]
    rows = [dict(zip(columns, row, strict=True)) for row in zip(*values, strict=True)]
    write_parquet(rows, path, parquet_schema)


@dataclass(frozen=True)
class PairScores:
    """Per pair, aligned with ``pair_ids``: summed log-probs of each side (float64: the float32 sums,
    exactly) and the completion tokens they sum over (int64), (N,) each."""

    pair_ids: list[str]
    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    def __len__(self) -> int:
        return len(self.pair_ids)

    @classmethod
    def from_rows(cls, pair_ids: Sequence[str], rows: Sequence[tuple[float, float, int, int]]) -> PairScores:
        """From ``(chosen, rejected, chosen_tokens, rejected_tokens)`` per pair."""
        columns = list(zip(*rows, strict=True)) if rows else [(), (), (), ()]
        logps = [torch.tensor(c, dtype=torch.float64) for c in columns[:2]]
        tokens = [torch.tensor(c, dtype=torch.long) for c in columns[2:]]
        return cls(list(pair_ids), *logps, *tokens)

    def write(self, path: str | os.PathLike) -> None:
        """``path`` as schema REF_LOGPS (atomically)."""
        columns = {
            "pair_id": self.pair_ids,
            "ref_chosen_logps": self.chosen,
            "ref_rejected_logps": self.rejected,
            "chosen_tokens": self.chosen_tokens,
            "rejected_tokens": self.rejected_tokens,
        }
        write_columns(columns, path, schema.REF_LOGPS)

    @classmethod
    def read(cls, path: str | os.PathLike) -> PairScores:
        rows = read_parquet(path, schema.REF_LOGPS)
        values = [
            (r["ref_chosen_logps"], r["ref_rejected_logps"], r["chosen_tokens"], r["rejected_tokens"])
            for r in rows
        ]
        return cls.from_rows([r["pair_id"] for r in rows], values)

    def aligned(self, pairs: Sequence[EncodedPair], where: str) -> PairScores:
        """The scores of ``pairs``, in their order; a missing pair or a token count that differs from
        the pair's encoding here means the scores are stale."""
        index = {pid: i for i, pid in enumerate(self.pair_ids)}
        picked = []
        for pair in pairs:
            i = index.get(pair.pair_id)
            if i is None:
                raise ArtifactError(
                    f"{where}: no reference log-probs for pair {pair.pair_id!r} (rerun ref_logps)"
                )
            stored = (int(self.chosen_tokens[i]), int(self.rejected_tokens[i]))
            counts = (len(pair.chosen.completion_ids), len(pair.rejected.completion_ids))
            if stored != counts:
                raise ArtifactError(
                    f"{where}: pair {pair.pair_id!r}: token counts {stored[0]}/{stored[1]} "
                    f"differ from the tokenization here {counts[0]}/{counts[1]} (stale ref_logps; rerun it)"
                )
            picked.append(i)
        idx = torch.tensor(picked, dtype=torch.long)
        return PairScores(
            [p.pair_id for p in pairs],
            self.chosen[idx],
            self.rejected[idx],
            self.chosen_tokens[idx],
            self.rejected_tokens[idx],
        )
