"""Build the reward that the ``reward`` params section describes."""

from __future__ import annotations

from alignpipe.params import RewardParams
from alignpipe.rewards.base import Reward, RewardError


def get_reward(params: RewardParams) -> Reward:
    """Build the reward that ``params`` (the ``reward`` section) describes."""
    if params.kind == "builtin":
        from alignpipe.rewards.builtin import BuiltinReward

        return BuiltinReward()
    if params.kind == "python":
        from alignpipe.rewards.python import PythonReward

        return PythonReward(str(params.function))
    if params.kind == "hf":
        from alignpipe.rewards.hf import HFReward

        return HFReward(
            str(params.model),
            max_length=params.max_length,
            batch_size=params.batch_size,
            dtype=params.dtype,
            trust_remote_code=params.trust_remote_code,
        )
    raise RewardError(f"unknown reward.kind {params.kind!r}; expected builtin, hf or python")
