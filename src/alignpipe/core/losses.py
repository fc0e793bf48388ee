"""Preference losses: one pure function per ``loss_type`` and one registry, :data:`LOSSES`
(:mod:`alignpipe.core.objective` combines them into the training objective).

Every loss takes a :class:`LossInputs` (summed log-probs per sequence, each of shape (B,)), ``beta``
and a :class:`LossOptions`, and returns per-pair losses of shape (B,); the trainer takes the mean.
The formulas are those of TRL 1.16 (``DPOTrainer._compute_loss``; ``CPOTrainer`` for simpo,
``ORPOTrainer`` for orpo) so that the parity benchmark compares like with like; every departure
from TRL or from the paper is stated in one line where it occurs. Notation below:
``c = chosen - ref_chosen``, ``r = rejected - ref_rejected`` (log-ratios), ``m = c - r``,
``Lc, Lr`` the completion token counts, ``ls(x) = log sigmoid(x)``, ``eps = label_smoothing``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossInputs:
    """Summed log-probs of one batch of pairs; every tensor has shape (B,)."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (value.ndim != 1 or value.shape != self.chosen.shape):
                raise ValueError(
                    f"{f.name} must have shape (B,) = {tuple(self.chosen.shape)}, got {tuple(value.shape)}"
                )

    def refs(self) -> tuple[Tensor, Tensor]:
        """``(ref_chosen, ref_rejected)``, (B,) each; an error when they are missing."""
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this loss needs ref_chosen_logps and ref_rejected_logps")
        return self.ref_chosen, self.ref_rejected

    def logratios(self) -> tuple[Tensor, Tensor]:
        """``(c, r)``: log pi(y|x) - log pi_ref(y|x) for chosen and rejected, (B,) each."""
        ref_chosen, ref_rejected = self.refs()
        return self.chosen - ref_chosen, self.rejected - ref_rejected

    def per_token(self, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
        """``(chosen / Lc, rejected / Lr)``, lengths clamped to >= 1 as in TRL."""
        return _per_token(chosen, self.chosen_lengths), _per_token(rejected, self.rejected_lengths)

    def chosen_nll(self) -> Tensor:
        """Length-normalised NLL of the chosen completion, ``-chosen / Lc``, (B,)."""
        return -_per_token(self.chosen, self.chosen_lengths)


def _per_token(value: Tensor, lengths: Tensor | None) -> Tensor:
    if lengths is None:
        raise ValueError("this loss (or rpo_alpha) needs chosen_lengths and rejected_lengths (token counts)")
    return value / lengths.clamp(min=1).to(value.dtype)


@dataclass(frozen=True)
class LossOptions:
    """Loss-specific options; a loss reads only the fields listed in its :class:`LossSpec`."""

    label_smoothing: float = 0.0  # cDPO / rDPO flip rate / EXO epsilon / AOT smoothing
    bco_delta: float = 0.0  # bco_pair reward shift delta (TRL <= 0.x: running mean; TRL 1.16: 0)
    discopop_tau: float = 0.05  # DiscoPOP temperature (paper and TRL default)
    simpo_gamma: float = 0.5  # SimPO target margin gamma (TRL CPOConfig default)
    orpo_lambda: float = 0.1  # ORPO odds-ratio weight lambda (TRL ORPOConfig.beta default)


LossFn = Callable[[LossInputs, float, LossOptions], Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function, whether it needs a reference, the options it reads."""

    fn: LossFn
    reference_free: bool = False
    options: frozenset[str] = frozenset()
    sorted_rows: bool = False  # rows are sorted quantiles, not pairs: per-pair weights do not apply


_LOSSES: dict[str, LossSpec] = {}
LOSSES: Mapping[str, LossSpec] = MappingProxyType(_LOSSES)


def _register(
    name: str, *, reference_free: bool = False, options: Sequence[str] = (), sorted_rows: bool = False
) -> Callable[[LossFn], LossFn]:
    def add(fn: LossFn) -> LossFn:
        _LOSSES[name] = LossSpec(fn, reference_free, frozenset(options), sorted_rows)
        return fn

    return add


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """``-(1 - eps) ls(z) - eps ls(-z)``: logistic loss on a label flipped with probability eps."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@_register("sigmoid", options=["label_smoothing"])
def sigmoid_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """DPO, Rafailov et al. 2023 eq. 7, with cDPO label smoothing: ``-(1-eps) ls(beta m) - eps ls(-beta m)``.

    TRL 1.16's ``sigmoid`` ignores label_smoothing (TRL <= 0.x applied it as here); equal at eps = 0.
    """
    c, r = x.logratios()
    return _smoothed_logistic(beta * (c - r), o.label_smoothing)


@_register("hinge")
def hinge_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """SLiC-HF hinge, Zhao et al. 2023, on the DPO log-ratio margin (as TRL): ``relu(1 - beta m)``."""
    c, r = x.logratios()
    return torch.relu(1 - beta * (c - r))


@_register("ipo")
def ipo_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """IPO, Azar et al. 2023 eq. 17 (beta = tau): ``(c/Lc - r/Lr - 1/(2 beta))^2``.

    Departs from the paper: log-ratios are length-normalised, as in TRL and as the IPO authors use it.
    """
    c_tok, r_tok = x.per_token(*x.logratios())
    return (c_tok - r_tok - 1 / (2 * beta)) ** 2


@_register("robust", options=["label_smoothing"])
def robust_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """rDPO, Chowdhury et al. 2024 (unbiased loss under label flips), flip rate eps in [0, 0.5).

    ``(-(1-eps) ls(beta m) + eps ls(-beta m)) / (1 - 2 eps)``; equals sigmoid at eps = 0.
    """
    eps = o.label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5 (a label flip rate), got {eps}")
    c, r = x.logratios()
    z = beta * (c - r)
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@_register("exo_pair", options=["label_smoothing"])
def exo_pair_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """EXO-pref, Ji et al. 2024 eq. 16 (K = 2): ``KL(q || [1-eps, eps])`` with ``q = sigmoid(beta m)``.

    Needs 0 < eps < 1 (the paper suggests 1e-3); TRL also rejects eps = 0.
    """
    eps = o.label_smoothing
    if not 0.0 < eps < 1.0:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (the paper suggests 1e-3), got {eps}")
    c, r = x.logratios()
    z = beta * (c - r)
    win = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
    lose = torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
    return win + lose


@_register("nca_pair")
def nca_pair_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """NCA (pairwise), Chen et al. 2024: ``-ls(beta c) - ls(-beta c)/2 - ls(-beta r)/2``."""
    c, r = x.logratios()
    return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)


@_register("bco_pair", options=["bco_delta"])
def bco_pair_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """BCO on pairs, Jung et al. 2024: ``-ls(beta c - delta) - ls(-(beta r - delta))``.

    Departs from the paper: delta is the explicit option ``bco_delta`` (default 0, as TRL 1.16), not a
    running mean of the rewards (the paper and TRL <= 0.x).
    """
    c, r = x.logratios()
    delta = o.bco_delta
    return -F.logsigmoid(beta * c - delta) - F.logsigmoid(-(beta * r - delta))


@_register("sppo_hard")
def sppo_hard_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """SPPO, Wu et al. 2024 eq. 4.7 with hard P(win) = 1 and eta = 1/beta (as TRL).

    ``(c - 1/(2 beta))^2 + (r + 1/(2 beta))^2``.
    """
    c, r = x.logratios()
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


@_register("aot", options=["label_smoothing"], sorted_rows=True)
def aot_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """AOT (paired), D'Oosterlinck et al. 2024: sigmoid loss, ``beta (sort(pi_w-pi_l) - sort(ref_w-ref_l))``.

    Row i is the i-th quantile of the batch, not pair i: only the mean is meaningful.
    """
    ref_chosen, ref_rejected = x.refs()
    policy, ref = torch.sort(x.chosen - x.rejected).values, torch.sort(ref_chosen - ref_rejected).values
    return _smoothed_logistic(beta * (policy - ref), o.label_smoothing)


@_register("aot_unpaired", options=["label_smoothing"], sorted_rows=True)
def aot_unpaired_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """AOT (unpaired), D'Oosterlinck et al. 2024: sigmoid loss on ``beta (sort(c) - sort(r))``.

    Row i is the i-th quantile of the batch, not pair i: only the mean is meaningful.
    """
    c, r = x.logratios()
    return _smoothed_logistic(beta * (torch.sort(c).values - torch.sort(r).values), o.label_smoothing)


@_register("apo_zero")
def apo_zero_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """APO-zero, D'Oosterlinck et al. 2024 eq. 7: ``1 - sigmoid(beta c) + sigmoid(beta r)``."""
    c, r = x.logratios()
    return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)


@_register("apo_down")
def apo_down_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """APO-down, D'Oosterlinck et al. 2024 eq. 8: ``sigmoid(beta c) + 1 - sigmoid(beta (c - r))``.

    By design it may push the chosen likelihood down: d loss / d chosen has no fixed sign.
    """
    c, r = x.logratios()
    return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))


@_register("discopop", options=["discopop_tau"])
def discopop_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """DiscoPOP (log-ratio modulated loss), Chen et al. 2024 eq. 5; ``z = beta m``, ``w = sigmoid(z / tau)``.

    ``-ls(z) (1 - w) + exp(-z) w``. Not monotone near z = 0: d loss / dz at 0 is -3/4 + (1 - ln 2)/(4 tau).
    """
    c, r = x.logratios()
    z = beta * (c - r)
    w = torch.sigmoid(z / o.discopop_tau)
    return -F.logsigmoid(z) * (1 - w) + torch.exp(-z) * w


@_register("sigmoid_norm")
def sigmoid_norm_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """DPO eq. 7 on length-normalised log-ratios (TRL ``sigmoid_norm``): ``-ls(beta (c/Lc - r/Lr))``.

    Departs from the paper: per-token rather than per-sequence log-ratios.
    """
    c_tok, r_tok = x.per_token(*x.logratios())
    return -F.logsigmoid(beta * (c_tok - r_tok))


@_register("simpo", reference_free=True, options=["simpo_gamma", "label_smoothing"])
def simpo_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """SimPO, Meng et al. 2024 eq. 6: ``-ls(beta (chosen/Lc - rejected/Lr) - gamma)``; no reference.

    With label_smoothing eps the logistic term is smoothed as in sigmoid (TRL CPOTrainer does the same).
    """
    c_tok, r_tok = x.per_token(x.chosen, x.rejected)
    return _smoothed_logistic(beta * (c_tok - r_tok) - o.simpo_gamma, o.label_smoothing)


def _log1mexp(v: Tensor) -> Tensor:
    """``log(1 - exp(v))`` for v < 0, branching at -ln 2 for precision."""
    return torch.where(v < -math.log(2), torch.log1p(-torch.exp(v)), torch.log(-torch.expm1(v)))


@_register("orpo", reference_free=True, options=["orpo_lambda"])
def orpo_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """ORPO, Hong et al. 2024 eqs. 4 and 7: ``NLL + lambda L_OR``; no reference; beta is not used.

    ``NLL = -chosen/Lc``; ``L_OR = -ls(log odds(yc) - log odds(yl))`` with ``odds(y) = p / (1 - p)`` and
    ``log p = logps/L`` (length-averaged), lambda = option ``orpo_lambda`` (TRL's ``ORPOConfig.beta``).
    Departs from TRL: TRL's NLL is a token-weighted batch mean (on the tokens its labels keep); here it is
    per pair, so batch means agree when lengths are equal.
    """
    c_tok, r_tok = x.per_token(x.chosen, x.rejected)
    log_odds = (c_tok - r_tok) - (_log1mexp(c_tok) - _log1mexp(r_tok))
    return x.chosen_nll() - o.orpo_lambda * F.logsigmoid(log_odds)


@_register("sft", reference_free=True)
def sft_loss(x: LossInputs, beta: float, o: LossOptions) -> Tensor:
    """NLL of the chosen completion, ``-chosen/Lc`` (the ``sft`` term of MPO, Wang et al. 2024).

    Departs from TRL: TRL averages over all chosen tokens of the batch (token-weighted); here per pair.
    """
    return x.chosen_nll()


def wpo_weights(chosen_token_logps_mean: Tensor, rejected_token_logps_mean: Tensor) -> Tensor:
    """WPO pair weights, Zhou et al. 2024 eq. 2: ``min(1, exp(mean_c + mean_r))``, detached, (B,).

    Inputs are per-token policy log-probs averaged over each completion, (B,) each. TRL first aligns
    every token, ``log p(y_t) - log sum_v p(v)^2``; pass those means to match it. The clamp at 1
    follows TRL <= 0.x; TRL 1.16 does not clamp (the two agree whenever the weight is <= 1).
    """
    return torch.exp(chosen_token_logps_mean + rejected_token_logps_mean).detach().clamp(max=1.0)


def implicit_rewards(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """DPO implicit rewards ``beta (log pi - log pi_ref)`` of chosen and rejected, detached, (B,) each."""
    return (
        (beta * (chosen_logps - ref_chosen_logps)).detach(),
        (beta * (rejected_logps - ref_rejected_logps)).detach(),
    )
