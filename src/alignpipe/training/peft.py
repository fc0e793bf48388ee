"""The one LoRA configuration of both training stages (``<stage>.peft`` params)."""

from __future__ import annotations

from typing import Any

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
