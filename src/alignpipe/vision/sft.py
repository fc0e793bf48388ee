"""SFT examples of a VLM: prompt (with images) + completion token ids, and their padded batches.

Rows are ``sft.parquet`` rows with an ``images`` column (``prepare``). Each is rendered once through
:func:`alignpipe.vision.models.encode_vision_completion` (the loss on the completion only, exactly one
EOS); a batch is right-padded as the text SFT batches are, with the rows' pixel inputs concatenated in
row order, so ``AutoModelForImageTextToText``'s forward takes it as it is (``labels`` -100 on the
prompt, its image tokens and the padding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignpipe.core.chat import ChatTemplateError, TruncationError
from alignpipe.vision.models import encode_vision_completion

IGNORE_INDEX = -100


class VisionSftDataError(ValueError):
    """A VLM SFT row cannot be encoded; the message names the row."""


@dataclass(frozen=True)
class VisionSftExample:
    """One training sequence with its images: loss on the completion only."""

    input_ids: list[int]
    prompt_len: int
    pixel_inputs: dict[str, Tensor] = field(default_factory=dict)
    row_id: str = ""

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.prompt_len + self.input_ids[self.prompt_len :]


def encode_vision_sft(
    processor: Any, rows: Sequence[Mapping[str, Any]], max_length: int, where: str = "sft"
) -> list[VisionSftExample]:
    """Encode ``sft.parquet`` rows (``id``, ``prompt``, ``completion``, ``images``)."""
    out = []
    for i, row in enumerate(rows):
        row_id = str(row.get("id") or f"row {i}")
        try:
            enc = encode_vision_completion(processor, row["prompt"], row["completion"], row.get("images") or [],
                                           max_length)  # fmt: skip
        except (ChatTemplateError, TruncationError) as exc:
            raise VisionSftDataError(f"{where}: {row_id}: {exc} (sft.max_length={max_length})") from None
        ids = enc.encoded.input_ids
        out.append(VisionSftExample(ids, len(enc.encoded.prompt_ids), enc.pixel_inputs, row_id))
    return out


def collate_vision_sft(features: Sequence[VisionSftExample], pad_token_id: int) -> dict[str, Tensor]:
    """Right-padded ``(B, T)`` ids, mask and labels, plus the rows' pixel inputs (concatenated)."""
    width = max(len(f.input_ids) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f.input_ids)
        input_ids[row, :n], labels[row, :n] = torch.tensor(f.input_ids), torch.tensor(f.labels)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    keys = sorted({k for f in features for k in f.pixel_inputs})
    return batch | {k: torch.cat([f.pixel_inputs[k] for f in features if k in f.pixel_inputs]) for k in keys}
