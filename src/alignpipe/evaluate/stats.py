"""Paired statistics of one model against another on the same eval prompts, with bootstrap intervals.

Both models answered the same prompts with the same per-prompt seeds, ``n`` samples each (``evaluate.n``),
and answer ``(prompt_id, sample_idx)`` of one is compared with the same key of the other:

- **win rate**: the mean outcome, 1 for a higher reward, 1/2 for an equal one, 0 for a lower one;
- **pass-rate difference**: mean of ``passed(challenger) - passed(incumbent)`` (built-in reward only);
- **length-controlled win rate** (after AlpacaEval's LC, a GLM on the length difference): a logistic
  regression of the outcome y in {0, 1/2, 1} on the length difference in tokens of the same two answers,
  ``P(win) = sigmoid(a + b * dlen / sd(dlen))``, fitted by maximum (quasi-)likelihood at the answer level;
  the LC win rate is ``sigmoid(a)``, the win probability when both answers have the same length. With no
  length difference anywhere it equals the win rate; when every answer pair has the same nonzero length
  difference, length and model cannot be told apart and it is None.

**Intervals**: a paired percentile bootstrap over prompts. One resample draws P prompts with replacement
(``torch.Generator`` seeded by ``evaluate.seed``), each with all its samples from both models (samples of one
prompt are not independent), and every statistic of a comparison is recomputed on the same resamples;
the interval is the 2.5% and 97.5% quantiles of ``evaluate.bootstrap_resamples`` resampled values. More
samples per prompt (``evaluate.n``) shrink the intervals as far as the prompts' own spread allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alignpipe.evaluate.results import Answer

LEVEL = 0.95  # two-sided coverage of every interval
NEWTON_STEPS = 50
LOGIT_CLAMP = 30.0  # |a|, |b| at most this: separated data (all wins) drive the MLE to infinity


@dataclass(frozen=True)
class Paired:
    """Two models' answers matched by (prompt, sample): tensors of shape (P prompts, n samples)."""

    prompt_ids: list[str]
    outcome: torch.Tensor  # 1 challenger's reward higher, 0.5 equal, 0 lower
    length_diff: torch.Tensor  # challenger's answer tokens - incumbent's
    pass_diff: torch.Tensor | None  # passed(challenger) - passed(incumbent); None without pass verdicts


@dataclass(frozen=True)
class Comparison:
    """A challenger against an incumbent (SFT): point estimates and 95% intervals (None: not defined)."""

    win_rate: float
    win_rate_ci: tuple[float, float]
    lc_win_rate: float | None
    lc_win_rate_ci: tuple[float, float] | None
    lc_length_coef: float | None  # b: log-odds of a win per standard deviation of the length difference
    pass_rate_diff: float | None
    pass_rate_diff_ci: tuple[float, float] | None
    prompts: int


def pair_answers(challenger: Sequence[Answer], incumbent: Sequence[Answer]) -> Paired:
    """Match answers by (prompt_id, sample_idx); every prompt must have the same number of samples."""
    theirs = {a.key: a for a in incumbent}
    if set(theirs) != {a.key for a in challenger}:
        raise ValueError("pair_answers: the two models answered different (prompt_id, sample_idx) sets")
    by_prompt: dict[str, list[tuple[Answer, Answer]]] = {}
    for a in sorted(challenger, key=lambda a: a.sample_idx):
        by_prompt.setdefault(a.prompt_id, []).append((a, theirs[a.key]))
    sizes = {len(v) for v in by_prompt.values()}
    if len(sizes) > 1:
        raise ValueError(f"pair_answers: prompts have different numbers of samples ({sorted(sizes)})")
    rows = list(by_prompt.values())

    def table(fn) -> torch.Tensor:  # noqa: ANN001 - (Answer, Answer) -> float
        return torch.tensor([[fn(c, i) for c, i in row] for row in rows], dtype=torch.float64)

    outcome = table(lambda c, i: 1.0 if c.reward > i.reward else 0.5 if c.reward == i.reward else 0.0)
    verdicts = all(a.passed is not None for a in [*challenger, *incumbent])
    return Paired(
        list(by_prompt),
        outcome,
        table(lambda c, i: float(c.n_tokens - i.n_tokens)),
        table(lambda c, i: float(c.passed) - float(i.passed)) if verdicts else None,
    )


def resample_indices(n_prompts: int, resamples: int, seed: int) -> torch.Tensor:
    """(resamples, n_prompts) prompt indices drawn with replacement, the same for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_prompts, (resamples, n_prompts), generator=generator)


def percentile_interval(values: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap values (linear interpolation between order statistics)."""
    tail = (1 - level) / 2
    low, high = torch.quantile(values.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def mean_with_interval(table: torch.Tensor, index: torch.Tensor) -> tuple[float, tuple[float, float]]:
    """Mean of a (P, n) table and its bootstrap interval over the resampled prompt rows ``index``."""
    per_prompt = table.mean(dim=1)
    return per_prompt.mean().item(), percentile_interval(per_prompt[index].mean(dim=1))


def fit_logistic(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intercept a and slope b of ``P(y) = sigmoid(a + b x)`` for each row of x, y (B, N), y in [0, 1].

    Newton's method on the (quasi-)log-likelihood ``sum y log p + (1 - y) log(1 - p)`` from a = b = 0,
    all rows at once; a ridge of 1e-9 on the 2x2 Hessian keeps it solvable when x is constant in a row,
    and |a|, |b| stop at LOGIT_CLAMP where the data are separated.
    """
    a = torch.zeros(x.shape[0], dtype=torch.float64)
    b = torch.zeros_like(a)
    ridge = 1e-9 * x.shape[1]
    for _ in range(NEWTON_STEPS):
        p = torch.sigmoid(a[:, None] + b[:, None] * x)
        r, w = y - p, p * (1 - p)
        g0, g1 = r.sum(1), (r * x).sum(1)
        h00, h01, h11 = w.sum(1) + ridge, (w * x).sum(1), (w * x * x).sum(1) + ridge
        det = h00 * h11 - h01 * h01
        da, db = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
        a = (a + da).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        b = (b + db).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        if max(da.abs().max().item(), db.abs().max().item()) < 1e-10:
            break
    return a, b


def length_controlled(
    paired: Paired, index: torch.Tensor
) -> tuple[float | None, tuple[float, float] | None, float | None]:
    """(LC win rate, its interval, slope per SD of length difference); see the module docstring."""
    dlen, y = paired.length_diff, paired.outcome
    if bool((dlen == 0).all()):
        win, ci = mean_with_interval(y, index)
        return win, ci, 0.0
    scale = dlen.std().item()
    if scale == 0:  # one nonzero length difference everywhere: the intercept is not identified
        return None, None, None
    x = dlen / scale
    a, b = fit_logistic(x.reshape(1, -1), y.reshape(1, -1))
    a_boot, _ = fit_logistic(x[index].flatten(1), y[index].flatten(1))
    return torch.sigmoid(a).item(), percentile_interval(torch.sigmoid(a_boot)), b.item()


def compare(
    challenger: Sequence[Answer], incumbent: Sequence[Answer], resamples: int, seed: int
) -> Comparison:
    """Win rate, LC win rate and pass-rate difference of ``challenger`` over ``incumbent``, with intervals.

    The resampled prompts depend only on (number of prompts, resamples, seed), so every comparison of one
    run (each model against SFT) uses the same resamples."""
    paired = pair_answers(challenger, incumbent)
    index = resample_indices(len(paired.prompt_ids), resamples, seed)
    win, win_ci = mean_with_interval(paired.outcome, index)
    lc, lc_ci, slope = length_controlled(paired, index)
    diff, diff_ci = (None, None) if paired.pass_diff is None else mean_with_interval(paired.pass_diff, index)
    return Comparison(win, win_ci, lc, lc_ci, slope, diff, diff_ci, len(paired.prompt_ids))
