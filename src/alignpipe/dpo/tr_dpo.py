"""TR-DPO (Gorbatovski et al. 2024): the live reference moves towards the policy every k steps,
``ref <- alpha * policy + (1 - alpha) * ref``, with a LoRA policy's deltas added (not merged in place) and
the trained copies of its ``modules_to_save`` (a VLM's projector under LoRA) taken for the originals."""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn


@torch.no_grad()
def sync_reference(policy_model: nn.Module, reference: nn.Module, alpha: float) -> None:
    """TR-DPO soft update of the live reference: ``ref <- alpha * policy + (1 - alpha) * ref``."""
    policy = merged_weights(policy_model)
    for name, ref in reference.named_parameters():
        ref.mul_(1 - alpha).add_(policy[name].to(ref.dtype), alpha=alpha)


def merged_weights(model: nn.Module) -> dict[str, Tensor]:
    """The policy's effective weights keyed like a plain model (LoRA deltas added, not merged in place)."""
    if not hasattr(model, "get_base_model"):
        return dict(model.named_parameters())
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    weights = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
            weights[f"{name}.weight"] = module.get_base_layer().weight + delta
    for name, param in base.named_parameters():
        if "lora_" in name or ".original_module." in name:  # modules_to_save: the trained copy counts
            continue
        weights.setdefault(re.sub(r"\.modules_to_save\.[^.]+\.", ".", name.replace(".base_layer", "")), param)
    return weights
