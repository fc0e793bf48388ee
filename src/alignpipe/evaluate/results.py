"""What the ``evaluate`` stage measures, as typed results: the stage fills them, the report reads them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from alignpipe.core.chat import Message
from alignpipe.params import EvaluateParams

MODELS = ("base", "sft", "dpo")  # column order of the reports
TITLES = {"base": "base", "sft": "SFT", "dpo": "DPO"}


ROUND_PREFIX = "dpo_round_"  # an earlier round's policy: dpo_round_1 (models/dpo), ...; the last one is "dpo"


def round_number(model: str) -> int:
    """k of ``dpo_round_k``."""
    return int(model.removeprefix(ROUND_PREFIX))


def title(model: str) -> str:
    """A model's column title (an earlier round's policy: "DPO round k"; other labels as they are)."""
    if model.startswith(ROUND_PREFIX):
        return f"DPO round {round_number(model)}"
    return TITLES.get(model, model)


@dataclass(frozen=True)
class EvalPrompt:
    prompt_id: str
    prompt: list[Message]
    meta: str | None
    family: str | None  # primary family of a built-in prompt, else None


@dataclass(frozen=True)
class Answer:
    """One sampled answer of one model, with its reward (``passed``: None unless the reward is built-in)."""

    prompt_id: str
    sample_idx: int
    completion: str
    n_tokens: int
    finish_reason: str
    reward: float = math.nan
    passed: bool | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.prompt_id, self.sample_idx


@dataclass(frozen=True)
class WinRate:
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float | None:
        return (self.wins + 0.5 * self.ties) / self.n if self.n else None


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error (None with fewer than 2 groups) over ``n`` values."""

    mean: float | None
    stderr: float | None
    n: int


@dataclass(frozen=True)
class PairsResult:
    accuracy: float | None
    margin_mean: float | None
    n: int


@dataclass(frozen=True)
class DemoNll:
    """NLL of SFT demonstrations under one model: ``nll`` nats per token over ``tokens`` tokens."""

    nll: float
    tokens: int
    rows: int


@dataclass
class EvalResult:
    """Everything the reports are made of."""

    params: EvaluateParams
    reward_name: str
    builtin: bool
    backend: str
    prompts: list[EvalPrompt]
    answers: dict[str, list[Answer]]  # model -> answers in (prompt, sample_idx) order
    win: WinRate
    kl: Estimate
    pairs: PairsResult
    beta: float  # dpo.beta, the scale of the implicit rewards
    seconds: dict[str, float] = field(default_factory=dict)
    truncation: dict[str, dict[str, int]] = field(default_factory=dict)  # "answers"/"pairs": Truncation
    family_order: Sequence[str] = ()  # the task's families, the order pass rates are listed in
    demo_nll: dict[str, DemoNll] = field(default_factory=dict)  # model -> NLL of SFT demonstrations
    round_kl: dict[str, Estimate] = field(default_factory=dict)  # dpo_round_k -> KL(its policy || sft)
