"""What an SFT run reads: examples tokenized once, batched by length, collated padded or packed.

Each row of ``sft.parquet`` becomes one :class:`SftExample` through
:func:`alignpipe.core.chat.encode_completion` (prompt ids + completion ids ending with
exactly one EOS); its labels are -100 on the prompt, so the loss is on the
assistant's tokens only. Tokenization happens here, once, never per step.

Two collators build a batch from the same examples and give the same loss:

- :func:`collate_padded`: ``(B, T)`` right-padded rows, labels -100 on padding;
- :func:`collate_packed`: padding-free, the ``B`` sequences concatenated into one
  ``(1, sum of lengths)`` row whose ``position_ids`` restart at 0 for each sequence
  (transformers derives a block-diagonal mask from them, or flash-attention uses
  them as ``cu_seqlens``); the first token of each sequence gets label -100, so no
  sequence is trained to predict the start of the next one.

Both compute logits only at the positions that predict a completion token
(``logits_to_keep`` + ``shift_labels``): the loss is the same, and the LM head,
a fifth of a small model's FLOPs (and its biggest activation on large
vocabularies), skips the prompt, about 3/4 of the tokens of the built-in task.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, Sampler

from alignpipe.core.chat import (
    WARN_FRACTION,
    ChatTemplateError,
    Truncation,
    TruncationError,
    encode_completion,
)

IGNORE_INDEX = -100


class SftDataError(ValueError):
    """The SFT data cannot be trained on; the message names the file, and the row where there is one."""


@dataclass(frozen=True)
class SftExample:
    """One training sequence: prompt then completion, loss on the completion only."""

    input_ids: list[int]
    prompt_len: int
    row_id: str = ""  # the row's id (or "row <i>"): named when a batch goes non-finite

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.prompt_len + self.input_ids[self.prompt_len :]


@dataclass
class SftData:
    """The encoded dataset and what it cost to fit it into ``max_length``."""

    examples: list[SftExample] = field(default_factory=list)
    rows: int = 0
    truncation: Truncation = field(default_factory=Truncation)  # rows cut to max_length, by what was cut
    dropped: int = 0  # sequences left out for being longer than max_length (sft.truncation: drop)

    @property
    def truncated(self) -> int:
        """Sequences cut to max_length (sft.truncation: truncate)."""
        return self.truncation.cut

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def completion_tokens(self) -> int:
        return sum(len(e.input_ids) - e.prompt_len for e in self.examples)


def encode_rows(
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    max_length: int,
    truncation: Literal["truncate", "drop"] = "truncate",
    where: str = "sft data",
) -> SftData:
    """Tokenize SFT rows (schema ``alignpipe.artifacts.schema.SFT``) into training examples.

    A sequence longer than ``max_length`` is cut (the prompt inside its first user turn, as far as
    needed to leave the completion ``min(its length, max_length // 2)`` tokens, then the
    completion's end; see ``encode_completion``) or dropped; both are counted.
    """
    if not rows:
        raise SftDataError(f"{where}: no rows, nothing to train on")
    data = SftData(rows=len(rows))
    for i, row in enumerate(rows):
        for column in ("prompt", "completion"):
            if not row.get(column):
                raise SftDataError(f"{where}: row {i} (id {row.get('id')!r}): field '{column}' is empty")
        try:
            enc = encode_completion(tokenizer, row["prompt"], row["completion"])
            if len(enc.input_ids) > max_length:
                if truncation == "drop":
                    data.dropped += 1
                    continue
                enc = encode_completion(tokenizer, row["prompt"], row["completion"], max_length=max_length)
        except TruncationError as exc:
            raise SftDataError(
                f"{where}: row {i} (id {row.get('id')!r}): {exc} (sft.max_length={max_length}; raise it)"
            ) from None
        except (ChatTemplateError, KeyError, TypeError) as exc:
            raise SftDataError(f"{where}: row {i} (id {row.get('id')!r}): {exc}") from None
        data.truncation.count(enc.prompt_cut, enc.completion_cut)
        row_id = str(row["id"]) if row.get("id") is not None else f"row {i}"
        data.examples.append(SftExample(enc.input_ids, len(enc.prompt_ids), row_id))
    if not data.examples:
        raise SftDataError(
            f"{where}: all {data.rows} rows are longer than sft.max_length={max_length} and were dropped; "
            "raise sft.max_length or set sft.truncation: truncate"
        )
    return data


def warn_length_costs(data: SftData, max_length: int) -> list[str]:
    """One ``warning:`` line each (stderr) when more than WARN_FRACTION of the rows were cut or dropped."""
    lines = [line for line in [data.truncation.warn("sft", "rows", "sft.max_length")] if line]
    if data.rows and data.dropped > WARN_FRACTION * data.rows:
        line = (
            f"warning: sft: {data.dropped} of {data.rows} rows dropped as longer than sft.max_length={max_length} "
            "(sft.truncation: drop); raise sft.max_length to keep them"
        )
        print(line, file=sys.stderr, flush=True)
        lines.append(line)
    return lines


class SftDataset(Dataset):
    """Examples as the dicts the collators take (``input_ids``, ``labels``)."""

    def __init__(self, examples: Sequence[SftExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = self.examples[i]
        return {"input_ids": example.input_ids, "labels": example.labels, "row_id": example.row_id}


class LengthGroupedSampler(Sampler[int]):
    """Indices in batches of similar length (less padding), batch order shuffled per epoch.

    The order depends only on ``(seed, epoch)``, so a resumed run sees the same
    batches as an uninterrupted one. Full batches come first in shuffled order
    and the one short batch (if any) last, so a ``BatchSampler`` of the same
    ``batch_size`` cuts the stream exactly at the batch boundaries made here.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        shuffled = torch.randperm(len(self.lengths), generator=generator).tolist()
        by_length = sorted(shuffled, key=lambda i: self.lengths[i])  # stable: equal lengths stay shuffled
        full = len(by_length) // self.batch_size * self.batch_size
        chunks = [by_length[k : k + self.batch_size] for k in range(0, full, self.batch_size)]
        order = torch.randperm(len(chunks), generator=generator).tolist()
        tail = [by_length[full:]] if full < len(by_length) else []
        return [chunks[k] for k in order] + tail

    def __iter__(self):
        for batch in self.batches():
            yield from batch


def completion_logits_only(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``logits_to_keep`` (positions that predict a label, in any row) and their ``shift_labels``.

    transformers' causal LMs then run the LM head on those positions only and take
    the loss against ``shift_labels`` instead of shifting ``labels`` themselves.
    """
    targets = torch.nn.functional.pad(
        batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX
    )  # target of each position
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    return {**batch, "logits_to_keep": keep, "shift_labels": targets[:, keep]}


def collate_padded(
    features: Sequence[dict[str, list[int]]], pad_token_id: int, trim_logits: bool = True
) -> dict[str, torch.Tensor]:
    """Right-padded ``(B, T)`` batch; labels -100 on the prompt and on padding."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = torch.tensor(f["input_ids"])
        labels[row, :n] = torch.tensor(f["labels"])
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return completion_logits_only(batch) if trim_logits else batch


def collate_packed(
    features: Sequence[dict[str, list[int]]], trim_logits: bool = True
) -> dict[str, torch.Tensor]:
    """Padding-free ``(1, N)`` batch: sequences back to back, ``position_ids`` restarting at 0."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for f in features:
        input_ids += f["input_ids"]
        labels += [IGNORE_INDEX] + list(f["labels"][1:])
        position_ids += range(len(f["input_ids"]))
    batch = {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([position_ids]),
    }
    return completion_logits_only(batch) if trim_logits else batch
