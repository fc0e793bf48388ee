"""DPO data: encoded pairs joined with their reference log-probs, and a deterministic batch order.

The order of an epoch is a function of (seed, epoch) only, so a resumed run lands on the
same batches. A *global batch* is what one optimizer step sees: ``batch_size x grad_accum x
num_processes`` pairs; it is cut into ``grad_accum`` micro-batches per process. Its
composition depends only on that product, so 8 pairs x 1 step and 1 pair x 8 accumulation
steps see the same pairs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignpipe.artifacts.pairs import EncodedPair, read_pairs
from alignpipe.artifacts.ref_logps import PairScores

# Length grouping: a window of this many global batches is sorted by length before it is cut.
GROUP_WINDOW = 16


@dataclass(frozen=True)
class DpoPairs:
    """Encoded pairs of one split and their reference log-probs, aligned by index."""

    pairs: list[EncodedPair]
    ref_chosen: torch.Tensor  # (N,) float32
    ref_rejected: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return len(self.pairs)

    def ref(self, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return self.ref_chosen[idx], self.ref_rejected[idx]


def join_ref_logps(pairs: list[EncodedPair], scores: PairScores, where: str) -> DpoPairs:
    """Attach reference log-probs; a missing pair or a token count that differs means stale ref_logps."""
    ref = scores.aligned(pairs, where)
    return DpoPairs(pairs, ref.chosen.float(), ref.rejected.float())


def load_split(
    pairs_dir: Path, split: str, ref_logps: Path, tokenizer: Any, max_length: int, max_prompt_length: int
) -> DpoPairs:
    pairs = read_pairs(pairs_dir / f"{split}.parquet", tokenizer, max_length, max_prompt_length)
    return join_ref_logps(pairs, PairScores.read(ref_logps), where=str(ref_logps))


def epoch_batches(lengths: Sequence[int], global_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Global batches of one epoch: shuffled, length-grouped within windows, in shuffled order.

    Within a global batch, indices are sorted longest first, so each micro-batch is of similar length.
    """
    rng = random.Random(f"alignpipe-dpo:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    window = GROUP_WINDOW * global_size
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: (-lengths[i], i))
        batches += [chunk[j : j + global_size] for j in range(0, len(chunk), global_size)]
    rng.shuffle(batches)
    return batches


def file_batches(n_pairs: int, global_size: int) -> list[list[int]]:
    """Global batches in file order, no shuffle and no length grouping (TRL's sequential sampler)."""
    return [list(range(i, min(i + global_size, n_pairs))) for i in range(0, n_pairs, global_size)]


def micro_batches(
    global_batch: Sequence[int], num_processes: int, process_index: int, grad_accum: int
) -> list[list[int]] | None:
    """This process's ``grad_accum`` micro-batches of a global batch (sizes differ by at most one).

    The batch is cut into ``num_processes x grad_accum`` near-equal parts; micro-step i of
    process r is part ``i * num_processes + r``, so processes run similar lengths in lock-step.
    None when the batch has fewer pairs than parts (only an epoch's last batch can).
    """
    n_parts = num_processes * grad_accum
    if len(global_batch) < n_parts:
        return None
    size, extra = divmod(len(global_batch), n_parts)
    parts, start = [], 0
    for k in range(n_parts):
        end = start + size + (1 if k < extra else 0)
        parts.append(list(global_batch[start:end]))
        start = end
    return [parts[i * num_processes + process_index] for i in range(grad_accum)]


def steps_per_epoch(n_pairs: int, global_size: int, n_parts: int) -> int:
    """Optimizer steps in one epoch (a last batch smaller than ``n_parts`` pairs is skipped)."""
    full, rest = divmod(n_pairs, global_size)
    return full + (1 if rest >= n_parts else 0)
