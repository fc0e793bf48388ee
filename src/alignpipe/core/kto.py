"""Unpaired preference losses: each example is one completion with a label (desirable or not).

KTO, Ethayarajh et al. 2024 ("KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7 as
TRL 1.16's ``KTOTrainer._compute_loss`` implements it). With ``r = log pi(y|x) - log pi_ref(y|x)``
the log-ratio of an example and ``z0`` the reference point::

    L(x, y) = w_d (1 - sigmoid(beta (r - z0)))   if y is desirable
              w_u (1 - sigmoid(beta (z0 - r)))   if y is undesirable
    z0 = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])   (detached)

``w_d, w_u`` are ``desirable_weight`` and ``undesirable_weight``; ``z0`` estimates KL(pi || pi_ref)
from *mismatched* pairs: prompt x_j with the completion y'_j of another example. TRL takes the
mean over each process's batch, gathers it and averages over processes; :func:`kl_point` does the
same from a (sum, count) so processes with uneven batches weigh each example the same (equal to
TRL's mean of means when the batches are equal). The mean over the batch of ``L`` is the loss.

``apo_zero_unpaired`` (D'Oosterlinck et al. 2024, eq. 7 unpaired, as TRL): ``1 - sigmoid(beta r)``
for desirable, ``sigmoid(beta r)`` for undesirable, weighted the same way; it reads no KL point.

Not here: BCO for unpaired data (Jung et al. 2024; TRL <= 0.x ``BCOTrainer``, gone from TRL 1.16).
Its reward shift is a running mean of the rewards across steps (state the loop would have to
checkpoint), and its UDM variant trains a density-ratio classifier on prompt embeddings; the paired
form with an explicit shift is ``bco_pair`` in :mod:`alignpipe.core.losses`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor


@dataclass(frozen=True)
class UnpairedSpec:
    """A registered unpaired loss: whether it reads the KL reference point."""

    needs_kl: bool


UNPAIRED_LOSSES: Mapping[str, UnpairedSpec] = MappingProxyType(
    {"kto": UnpairedSpec(needs_kl=True), "apo_zero_unpaired": UnpairedSpec(needs_kl=False)}
)


def kl_point(
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``z0 = max(0, mean(policy_kl_logps - ref_kl_logps))``, detached, a 0-d tensor.

    ``reduce_sum`` sums a tensor over processes (``accelerator.reduce(t, "sum")``): the mean is then
    over every process's mismatched pairs. An empty batch contributes nothing; no pairs at all: 0.
    """
    diff = (policy_kl_logps - ref_kl_logps).detach().double()
    total = torch.stack([diff.sum(), diff.new_tensor(float(diff.numel()))])
    if reduce_sum is not None:
        total = reduce_sum(total)
    mean = total[0] / total[1].clamp(min=1.0)
    return mean.clamp(min=0.0).to(policy_kl_logps.dtype)


def unpaired_losses(
    loss_type: str,
    logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    *,
    beta: float,
    kl: Tensor | float = 0.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """Per-example loss (B,) of ``loss_type`` ('kto' or 'apo_zero_unpaired'); the batch loss is the mean.

    ``logps``/``ref_logps`` (B,) are summed completion log-probs; ``labels`` (B,) bool, True =
    desirable; ``kl`` the reference point of :func:`kl_point` (read by kto only).
    """
    if loss_type not in UNPAIRED_LOSSES:
        raise ValueError(f"unknown unpaired loss_type {loss_type!r}; valid: {sorted(UNPAIRED_LOSSES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(
            f"desirable/undesirable weights must be >= 0, got {desirable_weight}, {undesirable_weight}"
        )
    for name, t in (("ref_logps", ref_logps), ("labels", labels)):
        if t.shape != logps.shape or logps.ndim != 1:
            raise ValueError(f"{name} must have shape (B,) = {tuple(logps.shape)}, got {tuple(t.shape)}")
    r = logps - ref_logps
    labels = labels.to(device=r.device, dtype=torch.bool)
    if loss_type == "kto":
        z0 = torch.as_tensor(kl, dtype=r.dtype, device=r.device).detach()
        desirable, undesirable = 1 - torch.sigmoid(beta * (r - z0)), 1 - torch.sigmoid(beta * (z0 - r))
    else:
        desirable, undesirable = 1 - torch.sigmoid(beta * r), torch.sigmoid(beta * r)
    return torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)


def unpaired_rewards(logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """Implicit rewards ``beta (log pi - log pi_ref)``, detached, (B,) (TRL's ``rewards/*``)."""
    return (beta * (logps - ref_logps)).detach()
