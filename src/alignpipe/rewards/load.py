"""Build the reward that the ``reward`` params section describes."""

from __future__ import annotations

from pathlib import Path

from alignpipe.params import RewardParams
from alignpipe.rewards.base import Reward, RewardError


def get_reward(params: RewardParams, trained: Path | None = None) -> Reward:
    """Build the reward that ``params`` (the ``reward`` section) describes; ``trained``: the folder of
    the reward_model stage (``models/reward``), read by ``reward.kind: trained``."""
    if params.kind == "builtin":
        from alignpipe.rewards.builtin import BuiltinReward

        return BuiltinReward()
    if params.kind == "python":
        from alignpipe.rewards.python import PythonReward

        return PythonReward(str(params.function))
    if params.kind in ("hf", "trained"):
        from alignpipe.rewards.hf_vision import hf_reward

        if params.kind == "trained" and trained is None:
            raise RewardError("reward.kind 'trained' needs the reward_model stage's folder (--reward-model)")
        return hf_reward(
            str(params.model if params.kind == "hf" else trained),
            max_length=params.max_length,
            batch_size=params.batch_size,
            dtype=params.dtype,
            trust_remote_code=params.trust_remote_code,
        )
    raise RewardError(f"unknown reward.kind {params.kind!r}; expected builtin, hf, python or trained")
