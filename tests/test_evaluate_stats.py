"""evaluate's statistics, overfitting signals and gate: hand-computed values, a bootstrap that covers, identities."""

from __future__ import annotations

import math

import pytest
import torch

from alignpipe.evaluate.gate import GateFailed, enforce, gate_report
from alignpipe.evaluate.results import Answer
from alignpipe.evaluate.signals import distinct_n, repeated_ngram_rate
from alignpipe.evaluate.stats import compare, fit_logistic, pair_answers, percentile_interval
from alignpipe.params import GateParams


def answer(
    prompt: str, reward: float, n_tokens: int = 5, sample: int = 0, passed: bool | None = None
) -> Answer:
    return Answer(prompt, sample, f"answer to {prompt}", n_tokens, "stop", reward, passed)


def outcomes(results: list[float], lengths: list[int] | None = None) -> tuple[list[Answer], list[Answer]]:
    """A challenger and an incumbent whose answer i wins (1), ties (0.5) or loses (0) as ``results[i]``
    says, the challenger's answer ``lengths[i]`` tokens longer."""
    lengths = lengths or [0] * len(results)
    challenger = [answer(f"p{i}", r, 10 + d) for i, (r, d) in enumerate(zip(results, lengths, strict=True))]
    incumbent = [answer(f"p{i}", 0.5, 10) for i in range(len(results))]
    return challenger, incumbent


# ---- repetition -------------------------------------------------------------------------------


def test_distinct_2_by_hand():
    """Bigrams of "a b a b": ab, ba, ab; of "A b c": ab, bc (lower-cased). 3 distinct of 5."""
    assert distinct_n(["a b a b", "A b c"], 2) == pytest.approx(3 / 5)
    assert distinct_n(["one two", "three four"], 2) == 1.0  # bigrams never cross answers
    assert distinct_n(["x", ""], 2) is None


def test_repeated_3gram_rate_by_hand():
    """ "a b c a b c": abc bca cab abc, one repeat of 4; "x y z": xyz, no repeat. Pooled: 1/5.
    "no no no no": (no no no) twice, one repeat of 2."""
    assert repeated_ngram_rate(["a b c a b c", "x y z"]) == pytest.approx(1 / 5)
    assert repeated_ngram_rate(["no no no no"]) == pytest.approx(1 / 2)
    assert repeated_ngram_rate(["a b", "c"]) is None


# ---- win rate, pass-rate difference and their intervals ----------------------------------------


def test_a_model_against_itself_is_a_point():
    rows = [answer(f"p{i}", r, passed=r == 1.0) for i, r in enumerate([0.0, 1.0, 0.5, 1.0])]
    c = compare(rows, rows, 500, 0)
    assert (c.win_rate, c.win_rate_ci) == (0.5, (0.5, 0.5))
    assert (c.pass_rate_diff, c.pass_rate_diff_ci) == (0.0, (0.0, 0.0))
    assert c.lc_win_rate == 0.5 and c.lc_length_coef == 0.0


def test_pass_rate_difference_by_hand():
    """Challenger passes p0 p1 p3, incumbent p1 only: differences 1, 0, 0, 1, mean 0.5."""
    ch = [answer(f"p{i}", float(ok), passed=ok) for i, ok in enumerate([True, True, False, True])]
    inc = [answer(f"p{i}", float(ok), passed=ok) for i, ok in enumerate([False, True, False, False])]
    c = compare(ch, inc, 2000, 1)
    assert c.pass_rate_diff == 0.5
    low, high = c.pass_rate_diff_ci
    assert 0.0 <= low < 0.5 < high <= 1.0
    no_verdicts = compare([answer("p0", 1.0)], [answer("p0", 0.0)], 200, 0)
    assert no_verdicts.pass_rate_diff is None and no_verdicts.pass_rate_diff_ci is None


def test_win_rate_interval_matches_the_normal_approximation():
    """60 wins, 40 losses on 100 prompts: p = 0.6, 0.6 ± 1.96 sqrt(0.24/100) = [0.504, 0.696]."""
    c = compare(*outcomes([1.0] * 60 + [0.0] * 40), 4000, 7)
    assert c.win_rate == pytest.approx(0.6)
    assert c.win_rate_ci[0] == pytest.approx(0.504, abs=0.015) and c.win_rate_ci[1] == pytest.approx(
        0.696, abs=0.015
    )
    assert compare(*outcomes([1.0] * 60 + [0.0] * 40), 4000, 7).win_rate_ci == c.win_rate_ci  # seeded


def test_bootstrap_interval_covers_the_true_win_rate_about_95_percent_of_the_time():
    """200 runs of 50 prompts, each won with probability 0.6: the 95% percentile interval should contain
    0.6 in about 190 of them (binomial sd of the count ~3; the percentile bootstrap runs a little narrow)."""
    gen = torch.Generator().manual_seed(0)
    covered = 0
    for run in range(200):
        wins = (torch.rand(50, generator=gen) < 0.6).double().tolist()
        low, high = compare(*outcomes(wins), 1000, run).win_rate_ci
        covered += low <= 0.6 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_samples_of_one_prompt_are_resampled_together():
    """Four identical samples per prompt carry no more information than one: the interval must not shrink."""
    results = [1.0] * 12 + [0.0] * 8
    one = compare(*outcomes(results), 2000, 3)
    ch, inc = [], []
    for i, r in enumerate(results):
        ch += [answer(f"p{i}", r, sample=s) for s in range(4)]
        inc += [answer(f"p{i}", 0.5, sample=s) for s in range(4)]
    four = compare(ch, inc, 2000, 3)
    assert four.win_rate == one.win_rate and four.win_rate_ci == pytest.approx(one.win_rate_ci)
    assert pair_answers(ch, inc).outcome.shape == (20, 4)


def test_percentile_interval_of_known_values():
    assert percentile_interval(torch.arange(101, dtype=torch.float64)) == pytest.approx((2.5, 97.5))


def test_uneven_samples_per_prompt_are_refused():
    ch = [answer("p0", 1.0, sample=0), answer("p0", 1.0, sample=1), answer("p1", 1.0)]
    with pytest.raises(ValueError, match="different numbers of samples"):
        pair_answers(ch, ch)


# ---- length control ---------------------------------------------------------------------------


def test_length_controlled_win_rate_removes_a_win_rate_made_by_length():
    """12 prompts where the challenger is 1 token longer (9 wins, 3 losses), 4 where it is 1 shorter
    (1 win, 3 losses): raw win rate 10/16. The two groups saturate the logistic fit:
    sigmoid(a + b x+) = 3/4, sigmoid(a + b x-) = 1/4 with x- = -x+, so a = 0 and the LC win rate is 1/2."""
    results = [1.0] * 9 + [0.0] * 3 + [1.0] + [0.0] * 3
    lengths = [1] * 12 + [-1] * 4
    c = compare(*outcomes(results, lengths), 1000, 0)
    assert c.win_rate == pytest.approx(10 / 16)
    assert c.lc_win_rate == pytest.approx(0.5, abs=1e-9)
    x_plus = 1 / torch.tensor([1.0] * 12 + [-1.0] * 4, dtype=torch.float64).std().item()
    assert c.lc_length_coef == pytest.approx(math.log(3) / x_plus, abs=1e-9)  # b x+ = ln 3
    low, high = c.lc_win_rate_ci
    assert low < 0.5 < high


def test_length_controlled_equals_raw_without_length_differences():
    results = [1.0, 1.0, 0.5, 0.0, 1.0]
    c = compare(*outcomes(results), 500, 0)
    assert c.lc_win_rate == c.win_rate == pytest.approx(0.7) and c.lc_win_rate_ci == c.win_rate_ci


def test_length_controlled_is_undefined_when_every_answer_is_longer_by_the_same_amount():
    c = compare(*outcomes([1.0, 0.0, 1.0], [2, 2, 2]), 200, 0)
    assert c.lc_win_rate is None and c.lc_win_rate_ci is None and c.win_rate == pytest.approx(2 / 3)


def test_fit_logistic_recovers_known_coefficients_and_stops_on_separated_data():
    """Expected counts of sigmoid(0.5 + 1.5 x) at x = -1, 0, 1 as fractional outcomes: the MLE is exact."""
    x = torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64)
    y = torch.sigmoid(0.5 + 1.5 * x)
    a, b = fit_logistic(x, y)
    assert a.item() == pytest.approx(0.5, abs=1e-8) and b.item() == pytest.approx(1.5, abs=1e-8)
    a, _ = fit_logistic(
        torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64)
    )
    assert torch.sigmoid(a).item() > 0.999  # all wins: the win probability goes to 1, finitely


# ---- gate -------------------------------------------------------------------------------------


def metrics(**over) -> dict:
    base = {
        "win_rate": 0.57, "win_rate_ci": [0.43, 0.70], "kl": 5.4,
        "sft": {"pass_rate": 0.44, "pass_rate_by_family": {"arithmetic": 0.5, "bullets": 0.2}},
        "dpo": {"pass_rate": 0.57, "pass_rate_by_family": {"arithmetic": 0.1, "bullets": 0.4}},
    }  # fmt: skip
    return base | over


def test_gate_off_by_default_reports_only():
    report = gate_report(metrics(), GateParams())
    assert report == {"passed": True, "checks": []}
    enforce({"gate": report})  # does not raise


def test_gate_failures_name_each_check_and_its_figures_in_one_line():
    gate = GateParams(min_win_rate_lower=0.5, max_kl=3.0, max_family_regression=10, min_pass_rate_gain=20)
    report = gate_report(metrics(), gate)
    assert not report["passed"] and [c["passed"] for c in report["checks"]] == [False] * 4
    family = next(c for c in report["checks"] if c["check"] == "max_family_regression")
    assert family["value"] == 40.0 and family["family"] == "arithmetic"
    with pytest.raises(GateFailed) as caught:
        enforce({"gate": report})
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        "evaluate.gate failed: win_rate_ci low 0.430 < min_win_rate_lower 0.5 (win_rate 0.570 [0.430, 0.700]); "
        "kl 5.400 nats > max_kl 3.0; "
        "family arithmetic 40.0 points below SFT (0.500 -> 0.100) > max_family_regression 10.0; "
        "pass rate gain 13.0 points (0.440 -> 0.570) < min_pass_rate_gain 20.0"
    )


def test_gate_passes_at_its_thresholds():
    """Each figure exactly at its threshold passes (13 points: 0.57 - 0.44 is 13.000000000000002 in floats)."""
    gate = GateParams(min_win_rate_lower=0.43, max_kl=5.4, max_family_regression=40, min_pass_rate_gain=13)
    report = gate_report(metrics(), gate)
    assert report["passed"], report
    enforce({"gate": report})


def test_a_gate_on_a_missing_figure_fails():
    no_builtin = metrics(sft={"pass_rate": None, "pass_rate_by_family": None},
                         dpo={"pass_rate": None, "pass_rate_by_family": None}, kl=None)  # fmt: skip
    report = gate_report(no_builtin, GateParams(max_kl=3.0, min_pass_rate_gain=0.0))
    assert not report["passed"]
    assert [c["text"] for c in report["checks"]] == [
        "max_kl 3.0: kl n/a",
        "min_pass_rate_gain 0.0: pass_rate (needs reward.kind: builtin) n/a",
    ]
