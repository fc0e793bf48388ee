"""The one master-weight dtype policy of both training stages.

Full fine-tuning keeps float32 master weights and computes under autocast (bf16 or fp16 from
``<stage>.dtype``), so small updates are not rounded away. LoRA keeps the frozen base in bf16 when
the compute dtype is bf16 (the adapters stay float32, as peft makes them); QLoRA's 4-bit base
computes in bf16. fp16 never stores weights: its range is too small for them.
"""

from __future__ import annotations

import torch

from alignpipe.core.models import pick_device, resolve_dtype
from alignpipe.params import TrainParams


def compute_dtype(params: TrainParams, device: torch.device | str | None = None) -> torch.dtype:
    """The autocast dtype of the forward and backward passes (``auto``: bf16 on GPU, fp32 on CPU)."""
    return resolve_dtype(params.dtype, device if device is not None else pick_device())


def weights_dtype(params: TrainParams, device: torch.device | str | None = None) -> str:
    """The dtype the trained model is loaded (and saved) in."""
    if params.peft.load_in_4bit:
        return "bfloat16"
    if params.peft.enabled and compute_dtype(params, device) == torch.bfloat16:
        return "bfloat16"
    return "float32"
