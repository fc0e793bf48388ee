"""``reward.kind: builtin``: the built-in task's verifier (fraction of constraints satisfied)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from alignpipe.core.chat import Message
from alignpipe.rewards.base import RewardError, RewardResult


class BuiltinReward:
    """Scores a completion with ``alignpipe.data.builtin.verify(spec, completion)``.

    ``spec`` is ``json.loads(meta)`` of the completion's prompt; details keep each
    constraint's pass/fail (keyed by family, ``_2`` for a repeated one).
    """

    name = "builtin"

    def __init__(self) -> None:
        from alignpipe.data.builtin import verify

        self._verify = verify

    def score(
        self, prompts: Sequence[list[Message]], completions: Sequence[str], metas: Sequence[str | None]
    ) -> list[RewardResult]:
        specs: dict[str, dict[str, Any]] = {}  # meta text -> parsed spec (N samples share one prompt)
        results = []
        for i, (completion, meta) in enumerate(zip(completions, metas, strict=True)):
            if meta is None or not str(meta).strip():
                raise RewardError(
                    "reward.kind 'builtin' needs built-in prompts (a constraint spec in the prompt's "
                    "'meta'), and this prompt has none; use data.prompts.source: "
                    "builtin:verifiable-instructions, or reward.kind hf or python for your own prompts",
                    index=i,
                )
            if meta not in specs:
                specs[meta] = _parse_spec(meta, i)
            try:
                verdict = self._verify(specs[meta], completion)
            except ValueError as exc:
                raise RewardError(f"the prompt's built-in spec is invalid ({exc})", index=i) from None
            results.append(RewardResult(float(verdict.score), dict(verdict.details)))
        return results

    def close(self) -> None:
        pass


def _parse_spec(meta: str, index: int) -> dict[str, Any]:
    try:
        spec = json.loads(meta)
    except json.JSONDecodeError as exc:
        raise RewardError(f"prompt meta is not JSON ({exc}): {meta[:80]!r}", index=index) from None
    if not isinstance(spec, dict):
        raise RewardError(f"prompt meta is not a built-in spec object: {meta[:80]!r}", index=index)
    return spec
