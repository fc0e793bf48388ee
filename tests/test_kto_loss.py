"""Tests of alignpipe.core.kto: hand-computed values, the KL point, gradient signs, errors, TRL parity.

``r = logp - ref_logp``; expected values come from the paper's formula with the ``math`` module.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from loss_helpers import completion_log_probs, sig, trl_compute_loss, trl_trainer

from alignpipe.core.kto import UNPAIRED_LOSSES, kl_point, unpaired_losses, unpaired_rewards

LOGPS = [-10.0, -12.0, -9.0, -11.0]
REFS = [-10.5, -11.0, -10.0, -11.0]  # r = 0.5, -1, 1, 0
LABELS = [True, True, False, False]
BETA = 0.5


def _t(values: list[Any], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def test_kto_hand_computed() -> None:
    z0, wd, wu = 0.3, 1.5, 0.7
    out = unpaired_losses(
        "kto", _t(LOGPS), _t(REFS), _t(LABELS, torch.bool), beta=BETA, kl=z0,
        desirable_weight=wd, undesirable_weight=wu,
    )  # fmt: skip
    r = [lp - ref for lp, ref in zip(LOGPS, REFS, strict=True)]
    expected = [
        wd * (1 - sig(BETA * (r[0] - z0))),
        wd * (1 - sig(BETA * (r[1] - z0))),
        wu * (1 - sig(BETA * (z0 - r[2]))),
        wu * (1 - sig(BETA * (z0 - r[3]))),
    ]
    torch.testing.assert_close(out, _t(expected))
    # at policy == reference and z0 = 0 every example costs half its weight
    zero = unpaired_losses("kto", _t(REFS), _t(REFS), _t(LABELS, torch.bool), beta=BETA, kl=0.0)
    torch.testing.assert_close(zero, torch.full((4,), 0.5, dtype=torch.float64))


def test_apo_zero_unpaired_hand_computed() -> None:
    out = unpaired_losses(
        "apo_zero_unpaired", _t(LOGPS), _t(REFS), _t(LABELS, torch.bool), beta=BETA, kl=5.0,
        desirable_weight=2.0,
    )  # fmt: skip
    expected = [2 * (1 - sig(0.25)), 2 * (1 - sig(-0.5)), sig(0.5), sig(0.0)]  # kl is not read
    torch.testing.assert_close(out, _t(expected))


def test_kl_point_mean_clamp_detach_and_reduce() -> None:
    policy = torch.tensor([-5.0, -4.0, -6.0], requires_grad=True)
    ref = torch.tensor([-6.0, -6.0, -5.0])  # diffs 1, 2, -1: mean 2/3
    z0 = kl_point(policy, ref)
    assert not z0.requires_grad
    assert z0.item() == pytest.approx(2 / 3)
    assert kl_point(ref, policy.detach()).item() == 0.0  # mean -2/3, clamped at 0
    assert kl_point(torch.zeros(0), torch.zeros(0)).item() == 0.0
    # two "processes": (1, 2) and (-1); their sums meet in reduce_sum, the mean is over all three
    other = torch.tensor([-1.0, 1.0], dtype=torch.float64)  # the other process's (sum, count)
    z_split = kl_point(policy[:2], ref[:2], reduce_sum=lambda t: t + other)
    assert z_split.item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("loss_type", sorted(UNPAIRED_LOSSES))
def test_gradient_signs(loss_type: str) -> None:
    """Desirable examples push their log-prob up (d loss / d logp < 0), undesirable ones down."""
    logps = _t(LOGPS).requires_grad_()
    unpaired_losses(loss_type, logps, _t(REFS), _t(LABELS, torch.bool), beta=BETA, kl=0.2).sum().backward()
    assert logps.grad is not None
    assert (logps.grad[:2] < 0).all() and (logps.grad[2:] > 0).all()


def test_kl_point_carries_no_gradient_into_the_loss() -> None:
    kl_logps = torch.tensor([-3.0, -2.0], requires_grad=True)
    z0 = kl_point(kl_logps, torch.tensor([-4.0, -4.0]))
    logps = _t(LOGPS[:2]).float().requires_grad_()
    unpaired_losses(
        "kto", logps, _t(REFS[:2]).float(), _t(LABELS[:2], torch.bool), beta=BETA, kl=z0
    ).sum().backward()
    assert kl_logps.grad is None


def test_rewards_and_errors() -> None:
    torch.testing.assert_close(unpaired_rewards(_t(LOGPS), _t(REFS), 0.5), _t([0.25, -0.5, 0.5, 0.0]))
    args = (_t(LOGPS), _t(REFS), _t(LABELS, torch.bool))
    with pytest.raises(ValueError, match="unknown unpaired loss_type 'kt'"):
        unpaired_losses("kt", *args, beta=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        unpaired_losses("kto", *args, beta=0.0)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        unpaired_losses("kto", *args, beta=0.1, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="labels must have shape"):
        unpaired_losses("kto", _t(LOGPS), _t(REFS), _t(LABELS[:3], torch.bool), beta=0.1)


# --- parity with TRL ---------------------------------------------------------------------------


def _trl_kto(batch: dict[str, Any], loss_type: str, beta: float, wd: float, wu: float) -> tuple[Any, Any]:
    """Run TRL's own ``KTOTrainer._compute_loss`` (TRL 1.16) on a stub trainer and model.

    The stub model returns per-token log-probs (zero outside the completion); ``_compute_kl_logps``
    returns the mismatched pairs' summed log-probs; references go in as precomputed, as in ref_logps.
    Returns (loss, the metrics TRL logged).
    """
    trainer = trl_trainer("trl.trainer.kto_trainer", "KTOTrainer")
    return trl_compute_loss(
        trainer, batch["per_token"], batch["mask"],
        inputs={"label": batch["labels"], "ref_logps": batch["ref"], "ref_KL_logps": batch["ref_kl"]},
        calculate_KL=loss_type == "kto", loss_type=loss_type, beta=beta, desirable_weight=wd,
        undesirable_weight=wu,
        _compute_kl_logps=lambda model, b: batch["kl_logps"] if loss_type == "kto" else None,
    )  # fmt: skip


def _parity_batch(batch: int = 8, seed: int = 3, kl_shift: float = 0.5) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    mask, per_token = completion_log_probs(torch.randint(3, 13, (batch,), generator=g), g)
    ref = per_token.sum(1) + torch.randn(batch, generator=g, dtype=torch.float64)
    kl_logps = -20 + 3 * torch.randn(batch, generator=g, dtype=torch.float64)
    ref_kl = kl_logps - kl_shift + torch.randn(batch, generator=g, dtype=torch.float64)
    labels = torch.tensor([True, False, True, True, False, True, False, True][:batch])
    return dict(per_token=per_token, mask=mask, ref=ref, kl_logps=kl_logps, ref_kl=ref_kl, labels=labels)


@pytest.mark.parametrize(
    ("loss_type", "wd", "wu", "kl_shift"),
    [
        ("kto", 1.0, 1.0, 0.5),
        ("kto", 1.33, 0.8, 0.5),
        ("kto", 1.0, 1.0, -3.0),
        ("apo_zero_unpaired", 1.2, 0.9, 0.5),
    ],
)
def test_parity_with_trl(loss_type: str, wd: float, wu: float, kl_shift: float) -> None:
    """Batch mean of our per-example losses, our KL point and rewards equal TRL's KTOTrainer's."""
    b = _parity_batch(kl_shift=kl_shift)
    expected, trl_metrics = _trl_kto(b, loss_type, beta=0.2, wd=wd, wu=wu)
    logps = b["per_token"].sum(1)
    z0 = kl_point(b["kl_logps"], b["ref_kl"]) if loss_type == "kto" else torch.tensor(0.0)
    ours = unpaired_losses(
        loss_type, logps, b["ref"], b["labels"], beta=0.2, kl=z0, desirable_weight=wd, undesirable_weight=wu
    )
    torch.testing.assert_close(ours.mean(), expected)
    assert trl_metrics["kl"][0] == pytest.approx(z0.item(), abs=1e-12)
    if kl_shift < 0:
        assert z0.item() == 0.0  # the clamp is exercised
    rewards, labels = unpaired_rewards(logps, b["ref"], 0.2), b["labels"]
    assert trl_metrics["rewards/chosen"][0] == pytest.approx(rewards[labels].mean().item())
    assert trl_metrics["rewards/rejected"][0] == pytest.approx(rewards[~labels].mean().item())
    assert trl_metrics["logps/chosen"][0] == pytest.approx(logps[labels].mean().item())
    assert trl_metrics["logps/rejected"][0] == pytest.approx(logps[~labels].mean().item())
