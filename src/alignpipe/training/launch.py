"""What a training loop that feeds its own batches needs from accelerate under each launcher:
the Accelerator for this machine (gloo on CPU) and ``prepare`` for DDP, FSDP and DeepSpeed."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch
from torch import nn

from alignpipe.core.models import accelerator_kwargs
from alignpipe.params import TrainParams
from alignpipe.training.numerics import Numerics


def make_accelerator(numerics: Numerics, grad_accum: int) -> Any:
    """The Accelerator: mixed precision as ``numerics`` say, the process group as this machine needs."""
    from accelerate import Accelerator

    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(numerics.autocast, "no")
    return Accelerator(mixed_precision=mixed, gradient_accumulation_steps=grad_accum, **accelerator_kwargs())


def fsdp_units(model: nn.Module) -> Counter[str]:
    """Modules FSDP (1 or 2) made into units of their own in ``model``, by class name."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    units = (m for m in model.modules() if isinstance(m, FSDPModule | FullyShardedDataParallel))
    return Counter(type(getattr(m, "module", m)).__name__.removeprefix("FSDP") for m in units)


def prepare(acc: Any, model: nn.Module, optimizer: Any, params: TrainParams) -> tuple[Any, Any]:
    """``acc.prepare(model, optimizer)`` for a loop that feeds its own batches (no DataLoader)."""
    if acc.distributed_type == "DEEPSPEED":  # DeepSpeed's "auto" sizes come from a DataLoader, else params
        acc.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=params.batch_size, gradient_clipping=params.max_grad_norm
        )
    model, optimizer = acc.prepare(model, optimizer)
    if acc.is_main_process and acc.distributed_type == "FSDP":
        print(f"FSDP units: {dict(fsdp_units(model))}", flush=True)  # the decoder layers and the root
    elif acc.is_main_process and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        print("accelerate applies FSDP to GPU processes only: these CPU ones run data parallel", flush=True)
    return model, optimizer
