"""How the dpo policy computes (weights dtype, autocast, a 4-bit base), so that its reference
log-probs, precomputed by ``ref_logps`` or live, are computed the same way: the step-1 loss is ln 2
on any device (tests/test_numerics.py)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignpipe.core.logprobs import CompletionScorer
from alignpipe.core.models import load_causal_lm, load_causal_lm_4bit, resolve_dtype


@dataclass(frozen=True)
class Numerics:
    """How the dpo policy computes, so that its reference is computed the same way (step-1 loss ln 2):
    the weights' dtype, the autocast dtype (None: the weights' own) and a 4-bit NF4 base (QLoRA)."""

    weights: str  # float32 | bfloat16 | float16
    autocast: torch.dtype | None = None
    load_in_4bit: bool = False

    @classmethod
    def of_policy(cls, dtype: str, peft: bool, load_in_4bit: bool, device: torch.device | str | None = None) -> Numerics:  # fmt: skip
        """Full fine-tuning keeps float32 master weights under autocast to ``dtype`` (bf16 on GPU for
        ``auto``); LoRA keeps the base in ``dtype`` (its adapters add exact zeros at step 1)."""
        compute = resolve_dtype(dtype, device or ("cuda" if torch.cuda.is_available() else "cpu"))
        autocast = None if compute == torch.float32 else compute
        weights = str(compute).removeprefix("torch.") if peft else "float32"
        return cls("bfloat16" if load_in_4bit else weights, autocast, load_in_4bit)

    def context(self, device: torch.device | str) -> Any:
        """The autocast the policy's forward runs under (accelerate's mixed precision)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.autocast)


def load_model(path: str | Path, numerics: Numerics, device: torch.device) -> nn.Module:
    """The causal LM at ``path`` as ``numerics`` say (dtype, or a 4-bit base): policy and reference."""
    if numerics.load_in_4bit:
        return load_causal_lm_4bit(path, device)
    return load_causal_lm(path, dtype=numerics.weights, device=device)


def reference_scorer(path: str | Path, numerics: Numerics, device: torch.device) -> CompletionScorer:
    """A frozen scorer of the model at ``path`` loaded as ``numerics`` say; run it under
    ``numerics.context`` (the ``ref_logps`` stage and dpo's live reference)."""
    scorer = CompletionScorer(load_model(path, numerics, device)).eval()
    scorer.requires_grad_(False)
    return scorer
