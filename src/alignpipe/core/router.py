"""MoE routers: the auxiliary load-balancing loss of a mixture-of-experts model, as TRL adds it.

TRL's rule (DPOTrainer): when the model's config has ``output_router_logits`` on, the loss gets
``router_aux_loss_coef x aux_loss``, the Switch-Transformer load-balancing loss of the router logits
of that forward pass (each MoE architecture's own ``load_balancing_loss_func`` in transformers).
``dpo.router_aux_loss_coef`` overrides the weight (0: off). Dense models have no router: weight 0.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn


def is_moe(config: Any) -> bool:
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    return bool(experts) and bool(getattr(config, "num_experts_per_tok", None))


def router_weight(config: Any, override: float | None) -> float:
    """The weight of the router loss for a model with ``config`` (``override``: dpo.router_aux_loss_coef)."""
    if not is_moe(config):
        return 0.0
    if override is not None:
        return float(override)
    if getattr(config, "output_router_logits", False):
        return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    return 0.0


def router_inputs(route: bool) -> dict[str, Any]:
    """Extra decoder inputs: ask for the router logits when the loss needs them."""
    return {"output_router_logits": True} if route else {}


def router_aux_loss(out: Any, causal_lm: nn.Module, attention_mask: Tensor | None) -> Tensor | None:
    """The load-balancing loss of a decoder output ``out`` (None when it holds no router logits)."""
    logits = getattr(out, "router_logits", None)
    if not logits:
        return None
    loss_func = getattr(sys.modules[type(causal_lm).__module__], "load_balancing_loss_func", None)
    if loss_func is None:
        raise ValueError(f"{type(causal_lm).__name__}: router logits, but no load_balancing_loss_func")
    config = causal_lm.config
    experts = getattr(config, "num_local_experts", None) or config.num_experts
    mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    return loss_func(logits, experts, config.num_experts_per_tok, mask)
