"""The one LoRA configuration of both training stages (``<stage>.peft`` params)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignpipe.params import PeftParams


def lora_config(peft: PeftParams, task_type: str = "CAUSAL_LM") -> Any:
    """peft's ``LoraConfig`` from the ``peft`` params (``SEQ_CLS``: the score head is trained in full)."""
    from peft import LoraConfig

    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=peft.target_modules,
        task_type=task_type,
    )


def apply_peft(model: nn.Module, peft: PeftParams) -> nn.Module:
    """Wrap ``model`` with LoRA adapters when ``peft.enabled`` (adapters in float32)."""
    if not peft.enabled:
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(peft))


def unquantized_copy(peft_model: nn.Module, model_dir: Path, peft: PeftParams) -> nn.Module:
    """The trained adapters on a fresh bf16 CPU copy of the base (QLoRA: merging into the 4-bit
    layers would save quantized weights; the merged folder holds plain ones, as sft's does)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from alignpipe.core.models import load_causal_lm

    fresh = apply_peft(load_causal_lm(model_dir, dtype="bfloat16", device=torch.device("cpu")), peft)
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(peft_model))
    return fresh
