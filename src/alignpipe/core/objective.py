"""The training objective: one registered loss, or a weighted mix of them (MPO), with the loss
options checked by name (a typo names the closest valid option) and RPO/WPO terms applied."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from alignpipe.core.losses import LOSSES, LossInputs, LossOptions, LossSpec

_OPTION_NAMES = frozenset(f.name for f in fields(LossOptions))


def _did_you_mean(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else "."


def _spec(loss_type: str) -> LossSpec:
    if loss_type not in LOSSES:
        hint = _did_you_mean(loss_type, list(LOSSES))
        raise ValueError(f"unknown loss_type {loss_type!r}{hint} Valid: {sorted(LOSSES)}")
    return LOSSES[loss_type]


def _loss_options(
    loss_types: Sequence[str], label_smoothing: float, options: Mapping[str, float]
) -> LossOptions:
    """Check that every option exists and is read by one of ``loss_types``; build the LossOptions."""
    used = frozenset().union(*(_spec(t).options for t in loss_types))
    for name in options:
        if name not in _OPTION_NAMES:
            hint = _did_you_mean(name, sorted(_OPTION_NAMES - {"label_smoothing"}))
            raise ValueError(f"unknown loss option {name!r}{hint} Valid: {sorted(_OPTION_NAMES)}")
        if name not in used:
            raise ValueError(f"option {name!r} is not used by loss_type {list(loss_types)}")
    if label_smoothing != 0.0 and "label_smoothing" not in used:
        users = sorted(n for n, s in LOSSES.items() if "label_smoothing" in s.options)
        raise ValueError(
            f"label_smoothing is not used by loss_type {list(loss_types)}; it applies to {users}"
        )
    return LossOptions(label_smoothing=label_smoothing, **options)


def combined_loss(
    loss_types: Sequence[str],
    weights: Sequence[float],
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    rpo_alpha: float = 0.0,
    wpo_weights: Tensor | None = None,
    **options: float,
) -> Tensor:
    """Weighted sum of losses (MPO, Wang et al. 2024): ``W * sum_k w_k L_k + rpo_alpha * NLL``, (B,).

    Logps are summed per sequence, lengths are token counts, all of shape (B,). ``sft`` is the
    length-normalised NLL of chosen. ``wpo_weights`` (B,) multiply the preference terms (WPO, Zhou et
    al. 2024 eq. 2; see :func:`wpo_weights`); the RPO term (Pang et al. 2024) is added unweighted.
    """
    if len(loss_types) == 0 or len(loss_types) != len(weights):
        raise ValueError(f"need one weight per loss_type, got {list(loss_types)} and {list(weights)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
    opts = _loss_options(loss_types, label_smoothing, options)
    specs = [_spec(t) for t in loss_types]
    needs_ref = [t for t, s in zip(loss_types, specs, strict=True) if not s.reference_free]
    if needs_ref and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type {needs_ref} needs ref_chosen_logps and ref_rejected_logps (got None)")
    x = LossInputs(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths
    )
    total = torch.zeros_like(chosen_logps)
    for spec, weight in zip(specs, weights, strict=True):
        if weight != 0.0:
            total = total + weight * spec.fn(x, beta, opts)
    if wpo_weights is not None:
        if any(s.sorted_rows for s in specs):
            raise ValueError("wpo_weights cannot weight aot/aot_unpaired: their rows are sorted, not pairs")
        if wpo_weights.shape != chosen_logps.shape:
            raise ValueError(
                f"wpo_weights must have shape {tuple(chosen_logps.shape)}, got {tuple(wpo_weights.shape)}"
            )
        total = total * wpo_weights
    if rpo_alpha != 0.0:
        total = total + rpo_alpha * x.chosen_nll()
    return total


def preference_loss(loss_type: str, *logps: Tensor | None, **settings: Any) -> Tensor:
    """Per-pair loss (B,) of one registered ``loss_type``: :func:`combined_loss` with that loss alone
    (same arguments after the loss name: the four log-prob tensors, then ``beta=`` and the rest)."""
    return combined_loss([loss_type], [1.0], *logps, **settings)
