"""Rewards: one interface, three kinds (``reward.kind`` in params.yaml).

- ``hf``: an ``AutoModelForSequenceClassification`` reward model with one output
  (Skywork-Reward style), run on the conversation rendered with its own chat template; a
  vision-language one (``vision_config``) with its processor and the prompts' images;
- ``builtin``: the built-in task's verifier, fed the prompt's constraint spec (``meta``);
- ``python``: a user function ``module:function(prompts, completions) -> list[float]``.

The ``score`` stage and the ``evaluate`` stage both go through :func:`alignpipe.rewards.load.get_reward` and
:func:`score_completions`, so a reward means the same thing in both places::

    reward = get_reward(params.reward)
    results = score_completions(reward, prompts, completions, metas)
    reward.close()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from alignpipe.core.chat import Message, Truncation

__all__ = [
    "Reward",
    "RewardError",
    "RewardResult",
    "check_finite",
    "reward_truncation",
    "score_completions",
]


class RewardError(ValueError):
    """A reward cannot be computed (bad config, bad user function, missing prompt spec).

    ``index`` is the completion it is about, if one; :func:`score_completions` names it by label.
    """

    def __init__(self, message: str, index: int | None = None) -> None:
        self.message = message
        self.index = index
        super().__init__(message if index is None else f"completion {index}: {message}")


@dataclass(frozen=True)
class RewardResult:
    """The reward of one completion and what went into it.

    ``details``: builtin, each constraint's pass/fail (``{"max_words": True, ...}``);
    hf, ``{"tokens": int, "truncated": bool}`` (+ ``"truncated_part"``: prompt, completion or both);
    python, ``{}``.
    """

    reward: float
    details: dict[str, Any] = field(default_factory=dict)


def reward_truncation(results: Sequence[RewardResult]) -> Truncation:
    """Conversations a reward model cut to reward.max_length, by what was cut (details' truncated_part)."""
    counts = Truncation()
    for res in results:
        part = res.details.get("truncated_part")
        counts.count(part in ("prompt", "both"), part in ("completion", "both"))
    return counts


class Reward(Protocol):
    """What every reward kind implements."""

    name: str  # e.g. "builtin", "hf:Skywork/Skywork-Reward-V2-Qwen3-0.6B", "python:mod:fn"

    def score(
        self, prompts: Sequence[list[Message]], completions: Sequence[str], metas: Sequence[str | None]
    ) -> list[RewardResult]:
        """One result per completion, in order. ``prompts[i]`` are the messages before ``completions[i]``."""
        ...

    def close(self) -> None:
        """Free what the reward holds (a model on the GPU)."""
        ...


def score_completions(
    reward: Reward,
    prompts: Sequence[list[Message]],
    completions: Sequence[str],
    metas: Sequence[str | None] | None = None,
    labels: Sequence[str] | None = None,
    images: Sequence[list[Any]] | None = None,
) -> list[RewardResult]:
    """Score ``completions`` (assistant texts) of ``prompts``; every reward is finite or this raises.

    ``metas`` are the prompts' ``meta`` column (the builtin reward needs it); ``labels`` name the
    rows in error messages (e.g. ``"(bi-prompt-000003, 2)"``), default their index. ``images``: per
    completion, its prompt's images (PIL), passed as ``images=`` (a ``python`` or VLM ``hf`` reward).
    """
    n = len(completions)
    metas = [None] * n if metas is None else list(metas)
    labels = [str(i) for i in range(n)] if labels is None else list(labels)
    if not len(prompts) == len(metas) == len(labels) == n:
        raise ValueError(
            f"score_completions: {len(prompts)} prompts, {n} completions, {len(metas)} metas and "
            f"{len(labels)} labels; expected one of each per completion"
        )
    if n == 0:
        return []
    try:
        extra = {} if images is None else {"images": list(images)}
        results = reward.score(list(prompts), list(completions), metas, **extra)
    except RewardError as exc:
        if exc.index is None or not 0 <= exc.index < n:
            raise
        raise RewardError(f"{labels[exc.index]}: {exc.message}") from None
    if len(results) != n:
        raise RewardError(f"reward {reward.name} returned {len(results)} results for {n} completions")
    check_finite(results, labels, reward.name)
    return results


def check_finite(results: Sequence[RewardResult], labels: Sequence[str], name: str = "reward") -> None:
    """Raise a RewardError naming the rows whose reward is NaN or infinite."""
    bad = [
        f"{label}: {r.reward}"
        for label, r in zip(labels, results, strict=True)
        if not math.isfinite(r.reward)
    ]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise RewardError(f"{name} gave {len(bad)} non-finite reward(s): {shown}")
