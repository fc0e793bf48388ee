"""Tests of alignpipe.core.losses: hand-computed values, identities, limits, gradient signs, errors, TRL parity.

Notation: ``c = chosen - ref_chosen``, ``r = rejected - ref_rejected``, ``m = c - r``,
``ls(x) = log sigmoid(x)``, ``Lc, Lr`` token counts. Expected values are computed here with the
``math`` module from the papers' formulas, never by calling the implementation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from loss_helpers import completion_log_probs, sig, trl_compute_loss, trl_trainer

from alignpipe.core.losses import LOSSES, implicit_rewards, wpo_weights
from alignpipe.core.objective import combined_loss, preference_loss

LN2 = math.log(2)
REF_BASED = sorted(n for n, s in LOSSES.items() if not s.reference_free)


def ls(x: float) -> float:
    """log sigmoid(x), stable for either sign."""
    return min(x, 0.0) - math.log1p(math.exp(-abs(x)))


# Two pairs. Pair 0: c = 0.5, r = -0.5, m = 1. Pair 1: c = -1, r = 1, m = -2.
CHOSEN, REJECTED = [-10.0, -12.0], [-11.0, -9.0]
REF_CHOSEN, REF_REJECTED = [-10.5, -11.0], [-10.5, -10.0]
LC, LR = [4, 6], [5, 3]
BETA = 0.5


def _pairs() -> list[SimpleNamespace]:
    return [
        SimpleNamespace(
            pc=CHOSEN[i],
            pr=REJECTED[i],
            c=CHOSEN[i] - REF_CHOSEN[i],
            r=REJECTED[i] - REF_REJECTED[i],
            lc=LC[i],
            lr=LR[i],
        )  # fmt: skip
        for i in range(2)
    ]


def _inputs(**kw: Any) -> dict[str, Any]:
    """The two fixed pairs as float64 tensors (lengths as int64), updated with ``kw``."""
    t = torch.tensor
    args: dict[str, Any] = dict(
        chosen_logps=t(CHOSEN, dtype=torch.float64),
        rejected_logps=t(REJECTED, dtype=torch.float64),
        ref_chosen_logps=t(REF_CHOSEN, dtype=torch.float64),
        ref_rejected_logps=t(REF_REJECTED, dtype=torch.float64),
        chosen_lengths=t(LC),
        rejected_lengths=t(LR),
    )
    return args | kw


def _log_odds(avg_logp: float) -> float:
    p = math.exp(avg_logp)
    return math.log(p / (1 - p))


# name -> (options, per-pair formula f(pair, beta)); b = beta.
PER_PAIR: dict[str, tuple[dict[str, float], Callable[[SimpleNamespace, float], float]]] = {
    "sigmoid": (
        {"label_smoothing": 0.1},
        lambda p, b: -0.9 * ls(b * (p.c - p.r)) - 0.1 * ls(-b * (p.c - p.r)),
    ),
    "hinge": ({}, lambda p, b: max(0.0, 1 - b * (p.c - p.r))),
    "ipo": ({}, lambda p, b: (p.c / p.lc - p.r / p.lr - 1 / (2 * b)) ** 2),
    "robust": (
        {"label_smoothing": 0.1},
        lambda p, b: (-0.9 * ls(b * (p.c - p.r)) + 0.1 * ls(-b * (p.c - p.r))) / 0.8,
    ),
    "exo_pair": (  # KL(q || [1 - eps, eps]), q = sigmoid(b m), eps = 1e-3
        {"label_smoothing": 1e-3},
        lambda p, b: (
            sig(b * (p.c - p.r)) * math.log(sig(b * (p.c - p.r)) / (1 - 1e-3))
            + sig(-b * (p.c - p.r)) * math.log(sig(-b * (p.c - p.r)) / 1e-3)
        ),
    ),
    "nca_pair": ({}, lambda p, b: -ls(b * p.c) - 0.5 * ls(-b * p.c) - 0.5 * ls(-b * p.r)),
    "bco_pair": ({"bco_delta": 0.3}, lambda p, b: -ls(b * p.c - 0.3) - ls(0.3 - b * p.r)),
    "sppo_hard": ({}, lambda p, b: (p.c - 1 / (2 * b)) ** 2 + (p.r + 1 / (2 * b)) ** 2),
    "apo_zero": ({}, lambda p, b: (1 - sig(b * p.c)) + sig(b * p.r)),
    "apo_down": ({}, lambda p, b: sig(b * p.c) + (1 - sig(b * (p.c - p.r)))),
    "discopop": (  # w = sigmoid(z / tau), z = b m, tau = 0.05
        {"discopop_tau": 0.05},
        lambda p, b: (
            -ls(b * (p.c - p.r)) * (1 - sig(b * (p.c - p.r) / 0.05))
            + math.exp(-b * (p.c - p.r)) * sig(b * (p.c - p.r) / 0.05)
        ),
    ),
    "sigmoid_norm": ({}, lambda p, b: -ls(b * (p.c / p.lc - p.r / p.lr))),
    "simpo": ({"simpo_gamma": 0.4}, lambda p, b: -ls(b * (p.pc / p.lc - p.pr / p.lr) - 0.4)),
    "orpo": (  # NLL + lambda * -ls(log odds(chosen) - log odds(rejected)), lambda = 0.2
        {"orpo_lambda": 0.2},
        lambda p, b: -p.pc / p.lc - 0.2 * ls(_log_odds(p.pc / p.lc) - _log_odds(p.pr / p.lr)),
    ),
    "sft": ({}, lambda p, b: -p.pc / p.lc),
}


@pytest.mark.parametrize("name", sorted(PER_PAIR))
def test_per_pair_losses_match_hand_computed(name: str) -> None:
    """Each per-pair loss on the two fixed pairs equals its paper formula evaluated with ``math``."""
    options, formula = PER_PAIR[name]
    got = preference_loss(name, **_inputs(beta=BETA, **options))
    expected = [formula(p, BETA) for p in _pairs()]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_sigmoid_literal_values() -> None:
    """DPO with beta = 0.5: pair 0 has beta m = 0.5, pair 1 has beta m = -1.

    -ls(0.5) = ln(1 + e^-0.5) = 0.474077, -ls(-1) = ln(1 + e) = 1.313262.
    """
    got = preference_loss("sigmoid", **_inputs(beta=BETA))
    torch.testing.assert_close(
        got, torch.tensor([0.474077, 1.313262], dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_aot_losses_sort_the_batch() -> None:
    """AOT compares sorted quantiles, eps = 0.1: row k is ``-(1-eps) ls(b d_k) - eps ls(-b d_k)``.

    aot: d = sort(pi_w - pi_l) - sort(ref_w - ref_l) = sort([1, -3]) - sort([0, -1]) = [-2, 1].
    aot_unpaired: d = sort(c) - sort(r) = sort([0.5, -1]) - sort([-0.5, 1]) = [-0.5, -0.5].
    """

    def smoothed(d: float) -> float:
        return -0.9 * ls(BETA * d) - 0.1 * ls(-BETA * d)

    for name, deltas in {"aot": [-2.0, 1.0], "aot_unpaired": [-0.5, -0.5]}.items():
        got = preference_loss(name, **_inputs(beta=BETA, label_smoothing=0.1))
        torch.testing.assert_close(got, torch.tensor([smoothed(d) for d in deltas], dtype=torch.float64))


def test_registry_is_complete() -> None:
    expected = {
        "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "simpo", "orpo", "sft",
    }  # fmt: skip
    assert set(LOSSES) == expected
    assert {n for n, s in LOSSES.items() if s.reference_free} == {"simpo", "orpo", "sft"}


def test_reference_free_losses_accept_no_reference() -> None:
    kw = _inputs(beta=BETA)
    with_ref = preference_loss("simpo", **kw)
    kw.update(ref_chosen_logps=None, ref_rejected_logps=None)
    torch.testing.assert_close(preference_loss("simpo", **kw), with_ref)


# --- identities and limits ---------------------------------------------------------------------


def test_robust_without_noise_equals_sigmoid() -> None:
    """rDPO at eps = 0 is DPO: (-(1-0) ls(z) + 0) / (1 - 0) = -ls(z)."""
    kw = _inputs(beta=BETA)
    torch.testing.assert_close(preference_loss("robust", **kw), preference_loss("sigmoid", **kw))


EPS_EXO = 1e-3
# Loss at zero margin (policy == reference, or beta -> 0 for the logistic family); z = 0 everywhere.
AT_ZERO: dict[str, tuple[dict[str, float], float]] = {
    "sigmoid": ({}, LN2),  # -ls(0)
    "robust": ({"label_smoothing": 0.2}, LN2),  # ln 2 (1 - 2 eps) / (1 - 2 eps)
    "hinge": ({}, 1.0),  # relu(1 - 0)
    "nca_pair": ({}, 2 * LN2),  # 3 terms: ln 2 + ln 2 / 2 + ln 2 / 2
    "bco_pair": ({}, 2 * LN2),
    "apo_zero": ({}, 1.0),  # 1 - 1/2 + 1/2
    "apo_down": ({}, 1.0),  # 1/2 + 1 - 1/2
    "discopop": ({}, (1 + LN2) / 2),  # w = 1/2: ln 2 / 2 + e^0 / 2
    "exo_pair": ({"label_smoothing": EPS_EXO}, -LN2 - 0.5 * math.log(EPS_EXO * (1 - EPS_EXO))),
    "aot": ({}, LN2),
    "aot_unpaired": ({}, LN2),
    "sigmoid_norm": ({}, LN2),
}


@pytest.mark.parametrize("name", sorted(AT_ZERO))
def test_loss_at_policy_equal_reference(name: str) -> None:
    """Step 1 of training (policy == reference): every log-ratio is 0, so z = 0 in each formula."""
    options, expected = AT_ZERO[name]
    kw = _inputs(beta=0.3, **options)
    kw.update(ref_chosen_logps=kw["chosen_logps"].clone(), ref_rejected_logps=kw["rejected_logps"].clone())
    torch.testing.assert_close(preference_loss(name, **kw), torch.full((2,), expected, dtype=torch.float64))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_squared_losses_at_policy_equal_reference(beta: float) -> None:
    """At c = r = 0: IPO = (0 - 1/(2b))^2 = 1/(4 b^2); SPPO-hard = 2 (1/(2b))^2 = 1/(2 b^2)."""
    kw = _inputs(beta=beta)
    kw.update(ref_chosen_logps=kw["chosen_logps"].clone(), ref_rejected_logps=kw["rejected_logps"].clone())
    torch.testing.assert_close(
        preference_loss("ipo", **kw), torch.full((2,), 1 / (4 * beta**2), dtype=torch.float64)
    )
    torch.testing.assert_close(
        preference_loss("sppo_hard", **kw), torch.full((2,), 1 / (2 * beta**2), dtype=torch.float64)
    )


@pytest.mark.parametrize("name", sorted(AT_ZERO))
def test_beta_to_zero_gives_zero_margin_value(name: str) -> None:
    """As beta -> 0 every z = beta * (...) -> 0: the loss tends to its zero-margin value, for any data."""
    options, expected = AT_ZERO[name]
    got = preference_loss(name, **_inputs(beta=1e-7, **options))
    torch.testing.assert_close(got, torch.full((2,), expected, dtype=torch.float64), atol=1e-5, rtol=0)


def test_beta_to_zero_for_squared_and_simpo_losses() -> None:
    """beta -> 0: beta^2 IPO -> 1/4 and beta^2 SPPO-hard -> 1/2 (the margin target dominates);
    SimPO -> -ls(-gamma) = ln(1 + e^gamma); ORPO does not use beta at all."""
    beta = 1e-7  # beta^2 IPO = (beta h - 1/2)^2 = 1/4 - beta h + ...
    kw = _inputs(beta=beta)
    torch.testing.assert_close(
        beta**2 * preference_loss("ipo", **kw), torch.full((2,), 0.25, dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        beta**2 * preference_loss("sppo_hard", **kw),
        torch.full((2,), 0.5, dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    simpo = preference_loss("simpo", **_inputs(beta=1e-9, simpo_gamma=0.7))
    torch.testing.assert_close(simpo, torch.full((2,), math.log1p(math.exp(0.7)), dtype=torch.float64))
    torch.testing.assert_close(
        preference_loss("orpo", **_inputs(beta=1e-9)), preference_loss("orpo", **_inputs(beta=3.0))
    )


def test_single_pair_aot_equals_sigmoid() -> None:
    """With B = 1 sorting is the identity: aot = aot_unpaired = sigmoid (delta = m)."""
    kw = {k: v[:1] for k, v in _inputs().items()}
    expected = preference_loss("sigmoid", beta=BETA, **kw)
    for name in ("aot", "aot_unpaired"):
        torch.testing.assert_close(preference_loss(name, beta=BETA, **kw), expected)


def test_sigmoid_norm_and_simpo_reduce_to_sigmoid() -> None:
    """With all lengths 1 sigmoid_norm is sigmoid; so is SimPO with gamma = 0, lengths 1, zero reference."""
    kw = _inputs(beta=BETA, chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2))
    sigmoid = preference_loss("sigmoid", **kw)
    torch.testing.assert_close(preference_loss("sigmoid_norm", **kw), sigmoid)
    kw.update(
        ref_chosen_logps=torch.zeros(2, dtype=torch.float64),
        ref_rejected_logps=torch.zeros(2, dtype=torch.float64),
    )
    torch.testing.assert_close(
        preference_loss("simpo", simpo_gamma=0.0, **kw), preference_loss("sigmoid", **kw)
    )


# --- cross-cutting options: RPO, WPO, MPO ------------------------------------------------------


def test_rpo_alpha_zero_is_plain_and_alpha_adds_nll() -> None:
    """RPO adds alpha * (-chosen / Lc): NLL = [10/4, 12/6] = [2.5, 2.0]."""
    plain = preference_loss("sigmoid", **_inputs(beta=BETA))
    torch.testing.assert_close(preference_loss("sigmoid", **_inputs(beta=BETA, rpo_alpha=0.0)), plain)
    rpo = preference_loss("sigmoid", **_inputs(beta=BETA, rpo_alpha=0.5))
    torch.testing.assert_close(rpo - plain, torch.tensor([1.25, 1.0], dtype=torch.float64))


def test_mpo_weights() -> None:
    """MPO: weights [1, 0] give the first loss; [0.8, 0.2] give 0.8 sigmoid + 0.2 sft (sft = -chosen / Lc)."""
    args = _inputs()
    refs = [args.pop(k) for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")]
    sigmoid = preference_loss("sigmoid", *refs, beta=BETA, **args)
    ipo = preference_loss("ipo", *refs, beta=BETA, **args)
    torch.testing.assert_close(
        combined_loss(["sigmoid", "ipo"], [1.0, 0.0], *refs, beta=BETA, **args), sigmoid
    )
    torch.testing.assert_close(combined_loss(["ipo", "sigmoid"], [1.0, 0.0], *refs, beta=BETA, **args), ipo)
    mixed = combined_loss(["sigmoid", "sft"], [0.8, 0.2], *refs, beta=BETA, **args)
    torch.testing.assert_close(mixed, 0.8 * sigmoid + 0.2 * torch.tensor([2.5, 2.0], dtype=torch.float64))


def test_wpo_weights_helper_and_weighting() -> None:
    """WPO: w = min(1, exp(mean_c + mean_r)), detached; the preference term is multiplied by w, RPO is not."""
    mean_c = torch.tensor([-0.2, 0.3], requires_grad=True)
    mean_r = torch.tensor([-0.5, 0.1])
    w = wpo_weights(mean_c, mean_r)
    torch.testing.assert_close(w, torch.tensor([math.exp(-0.7), 1.0]))
    assert not w.requires_grad

    weights = torch.tensor([0.5, 0.25], dtype=torch.float64)
    plain = preference_loss("sigmoid", **_inputs(beta=BETA))
    torch.testing.assert_close(
        preference_loss("sigmoid", **_inputs(beta=BETA, wpo_weights=weights)), plain * weights
    )
    both = preference_loss("sigmoid", **_inputs(beta=BETA, wpo_weights=weights, rpo_alpha=1.0))
    torch.testing.assert_close(both, plain * weights + torch.tensor([2.5, 2.0], dtype=torch.float64))
    ones = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(preference_loss("sigmoid", **_inputs(beta=BETA, wpo_weights=ones)), plain)


def test_implicit_rewards() -> None:
    """beta (log pi - log pi_ref) = 0.5 * [0.5, -1] and 0.5 * [-0.5, 1], detached."""
    kw = _inputs()
    chosen = kw["chosen_logps"].clone().requires_grad_()
    rc, rr = implicit_rewards(
        chosen, kw["rejected_logps"], kw["ref_chosen_logps"], kw["ref_rejected_logps"], BETA
    )
    torch.testing.assert_close(rc, torch.tensor([0.25, -0.5], dtype=torch.float64))
    torch.testing.assert_close(rr, torch.tensor([-0.25, 0.5], dtype=torch.float64))
    assert not rc.requires_grad


# --- gradient signs ----------------------------------------------------------------------------

SIGN_OPTIONS: dict[str, dict[str, float]] = {
    "robust": {"label_smoothing": 0.1},
    "exo_pair": {"label_smoothing": 1e-3},
}


def _near_reference_batch(seed: int = 0, batch: int = 8) -> dict[str, Any]:
    """Policy within 0.5 nats of the reference, beta = 0.1: every |beta * log-ratio| <= 0.1.

    That keeps the losses with a target (ipo: h < 1/(2 beta) = 5; sppo_hard: c < 5, r > -5; hinge:
    beta m < 1; nca_pair: beta c < ln 2; exo_pair: beta m < logit(1 - eps)) on the side where the signs hold.
    """
    g = torch.Generator().manual_seed(seed)
    ref = -5 - 25 * torch.rand(2, batch, generator=g, dtype=torch.float64)
    policy = ref + (torch.rand(2, batch, generator=g, dtype=torch.float64) - 0.5)
    lengths = torch.randint(5, 21, (2, batch), generator=g)
    return dict(
        chosen_logps=policy[0].clone().requires_grad_(),
        rejected_logps=policy[1].clone().requires_grad_(),
        ref_chosen_logps=ref[0],
        ref_rejected_logps=ref[1],
        chosen_lengths=lengths[0],
        rejected_lengths=lengths[1],
        beta=0.1,
    )


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"discopop"}))
def test_gradient_signs(name: str) -> None:
    """d loss / d chosen_logps < 0 and d loss / d rejected_logps > 0, per pair, near the reference.

    Exceptions: apo_down may lower chosen by design (d/d chosen = b [s'(b c) - s'(b m)], no fixed sign);
    sft ignores rejected (no gradient); discopop is in test_discopop_gradient (not monotone near m = 0);
    for aot and aot_unpaired the gradient is of the batch sum (rows are sorted quantiles; at ties sort
    picks one).
    """
    kw = _near_reference_batch()
    preference_loss(name, **kw, **SIGN_OPTIONS.get(name, {})).sum().backward()
    d_chosen, d_rejected = kw["chosen_logps"].grad, kw["rejected_logps"].grad
    if name != "apo_down":
        assert (d_chosen < 0).all(), d_chosen
    if name == "sft":
        assert d_rejected is None  # no dependence on rejected at all
    else:
        assert (d_rejected > 0).all(), d_rejected


def test_discopop_gradient() -> None:
    """DiscoPOP f(z) = -ls(z)(1 - w) + e^-z w, w = s(z/tau). Far from 0 (|z| >> tau) f' < 0 as for DPO;
    at z = 0: f'(0) = -1/2 * 1/2 - 1 * 1/2 + (1 - ln 2)/(4 tau) = -3/4 + (1 - ln 2)/(4 tau) > 0 (tau = 0.05).
    """
    beta, tau = 0.5, 0.05
    for margin, expected_sign in [(-4.0, -1), (4.0, -1)]:
        kw = _inputs(beta=beta)
        kw["chosen_logps"] = (kw["ref_chosen_logps"] + margin).requires_grad_()
        kw["rejected_logps"] = kw["ref_rejected_logps"].clone().requires_grad_()
        preference_loss("discopop", **kw).sum().backward()
        assert (torch.sign(kw["chosen_logps"].grad) == expected_sign).all()
        assert (torch.sign(kw["rejected_logps"].grad) == -expected_sign).all()
    kw = _inputs(beta=beta)
    kw["chosen_logps"] = kw["ref_chosen_logps"].clone().requires_grad_()
    kw["rejected_logps"] = kw["ref_rejected_logps"].clone()
    preference_loss("discopop", **kw).sum().backward()
    expected = beta * (-0.75 + (1 - LN2) / (4 * tau))
    torch.testing.assert_close(kw["chosen_logps"].grad, torch.full((2,), expected, dtype=torch.float64))


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kw", "match"),
    [
        ("sigmod", {}, "did you mean 'sigmoid'"),
        ("sigmoid", {"beta": 0.0}, "beta must be > 0"),
        ("sigmoid", {"beta": -1.0}, "beta must be > 0"),
        ("sigmoid", {"ref_chosen_logps": None}, "needs ref_chosen_logps"),
        ("discopop", {"discopop_ta": 0.1}, "did you mean 'discopop_tau'"),
        ("sigmoid", {"simpo_gamma": 0.1}, "not used by loss_type"),
        ("hinge", {"label_smoothing": 0.1}, "label_smoothing is not used"),
        ("robust", {"label_smoothing": 0.5}, "0 <= label_smoothing < 0.5"),
        ("exo_pair", {}, "0 < label_smoothing < 1"),
        ("ipo", {"chosen_lengths": None}, "token counts"),
        ("sigmoid", {"rpo_alpha": 1.0, "chosen_lengths": None}, "token counts"),
        ("aot", {"wpo_weights": torch.ones(2, dtype=torch.float64)}, "sorted"),
        ("sigmoid", {"wpo_weights": torch.ones(3, dtype=torch.float64)}, "shape"),
        ("sigmoid", {"rejected_logps": torch.zeros(3, dtype=torch.float64)}, "shape"),
    ],
)
def test_errors(name: str, kw: dict[str, Any], match: str) -> None:
    args = _inputs(beta=BETA)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        preference_loss(name, **args)


def test_combined_loss_needs_one_weight_per_type() -> None:
    with pytest.raises(ValueError, match="one weight per loss_type"):
        combined_loss(["sigmoid", "sft"], [1.0], *list(_inputs().values())[:4], beta=BETA)


# --- parity with TRL ---------------------------------------------------------------------------


def _trl_loss(
    loss_types: list[str],
    weights: list[float],
    batch: dict[str, torch.Tensor],
    *,
    beta: float,
    label_smoothing: float,
) -> torch.Tensor:
    """Run TRL's own loss code, ``DPOTrainer._compute_loss`` (TRL 1.16), on a stub trainer and model.

    The stub model returns per-token log-probs (zero outside the completion) so that TRL's sums and
    token counts are ours; reference log-probs go in as precomputed, as in our ``ref_logps`` stage.
    """
    trainer = trl_trainer("trl.trainer.dpo_trainer", "DPOTrainer")
    # per_token, mask: (2B, T), chosen rows then rejected rows
    loss, _ = trl_compute_loss(
        trainer, batch["per_token"], batch["mask"],
        outputs={"log_sum_sq_probs": batch["log_sum_sq"][:, 1:],
                 "is_top1": torch.zeros_like(batch["mask"][:, 1:], dtype=torch.bool)},
        inputs={"ref_chosen_logps": batch["ref_chosen"], "ref_rejected_logps": batch["ref_rejected"]},
        args=SimpleNamespace(discopop_tau=0.05), beta=beta, label_smoothing=label_smoothing,
        loss_types=loss_types, loss_weights=weights, ld_alpha=None, f_divergence_type="reverse_kl",
        use_weighting=batch["use_weighting"],
    )  # fmt: skip
    return loss


def _parity_batch(equal_lengths: bool, use_weighting: bool, batch: int = 6, seed: int = 1) -> dict[str, Any]:
    """Random per-token log-probs in [-3, -1] over completions of 3..12 tokens (column 0 is the prompt)."""
    g = torch.Generator().manual_seed(seed)
    lengths = (
        torch.full((2 * batch,), 8) if equal_lengths else torch.randint(3, 13, (2 * batch,), generator=g)
    )
    mask, per_token = completion_log_probs(lengths, g)
    log_sum_sq = -0.5 * torch.rand(2 * batch, 13, generator=g, dtype=torch.float64)
    ref = per_token.sum(1) + torch.randn(2 * batch, generator=g, dtype=torch.float64)
    return dict(
        per_token=per_token, mask=mask, lengths=lengths, log_sum_sq=log_sum_sq, use_weighting=use_weighting,
        ref_chosen=ref[:batch], ref_rejected=ref[batch:],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("loss_types", "weights", "label_smoothing", "equal_lengths", "use_weighting"),
    [
        (["sigmoid"], [1.0], 0.0, False, False),
        (["hinge"], [1.0], 0.0, False, False),
        (["ipo"], [1.0], 0.0, False, False),
        (["robust"], [1.0], 0.1, False, False),
        (["exo_pair"], [1.0], 1e-3, False, False),
        (["nca_pair"], [1.0], 0.0, False, False),
        (["bco_pair"], [1.0], 0.0, False, False),
        (["sppo_hard"], [1.0], 0.0, False, False),
        (["aot"], [1.0], 0.1, False, False),
        (["aot_unpaired"], [1.0], 0.1, False, False),
        (["apo_zero"], [1.0], 0.0, False, False),
        (["apo_down"], [1.0], 0.0, False, False),
        (["discopop"], [1.0], 0.0, False, False),
        (["sigmoid_norm"], [1.0], 0.0, False, False),
        (["sigmoid"], [1.0], 0.0, False, True),  # WPO
        (["sigmoid", "sft"], [0.8, 0.2], 0.0, True, False),  # MPO; sft matches TRL at equal lengths
    ],
)
def test_parity_with_trl(
    loss_types: list[str],
    weights: list[float],
    label_smoothing: float,
    equal_lengths: bool,
    use_weighting: bool,
) -> None:
    """Batch mean of our per-pair losses equals the loss TRL's DPOTrainer computes on the same log-probs."""
    b = _parity_batch(equal_lengths, use_weighting)
    expected = _trl_loss(loss_types, weights, b, beta=0.2, label_smoothing=label_smoothing)
    logps, lengths = b["per_token"].sum(1), b["lengths"]
    n = logps.shape[0] // 2
    kw: dict[str, Any] = {}
    if use_weighting:
        aligned_mean = ((b["per_token"] - b["log_sum_sq"]) * b["mask"]).sum(1) / lengths
        kw["wpo_weights"] = wpo_weights(aligned_mean[:n], aligned_mean[n:])
    if label_smoothing:
        kw["label_smoothing"] = label_smoothing
    ours = combined_loss(
        loss_types, weights, logps[:n], logps[n:], b["ref_chosen"], b["ref_rejected"], beta=0.2,
        chosen_lengths=lengths[:n], rejected_lengths=lengths[n:], **kw,
    )  # fmt: skip
    torch.testing.assert_close(ours.mean(), expected)
