"""``reward.kind: python``: a user function ``module:function(prompts, completions) -> list[float]``.

For VLM prompts (an ``images`` column) the function is called with ``images=`` too: per completion, the
list of its prompt's images (PIL, RGB); a function without an ``images`` parameter is then refused.

The module is imported by its name only (``importlib.import_module``), never run from a
file path. It must be importable: installed, on ``PYTHONPATH``, or a file in the working
directory (the repository root under ``dvc repro``, which is added to the end of
``sys.path``). List that file in the ``score`` stage's deps so a change re-scores.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from alignpipe.core.chat import Message
from alignpipe.rewards.base import RewardError, RewardResult


class PythonReward:
    """Calls the user function once with every prompt (messages) and completion (text)."""

    def __init__(self, function: str) -> None:
        self.name = f"python:{function}"
        self.spec = function
        self.fn = load_function(function)

    def score(
        self,
        prompts: Sequence[list[Message]],
        completions: Sequence[str],
        metas: Sequence[str | None],
        images: Sequence[list[Any]] | None = None,
    ) -> list[RewardResult]:
        kwargs = {} if images is None else {"images": list(images)}
        if images is not None and not _takes_images(self.fn):
            raise RewardError(
                f"reward.function {self.spec!r}: the prompts have images; give it an 'images' parameter"
            )
        try:
            out = self.fn(list(prompts), list(completions), **kwargs)
        except Exception as exc:  # noqa: BLE001 - user code: name the function in the message
            raise RewardError(f"reward.function {self.spec!r} raised {type(exc).__name__}: {exc}") from exc
        return [RewardResult(value) for value in _as_floats(out, len(completions), self.spec)]

    def close(self) -> None:
        pass


def _takes_images(fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: let the call tell
        return True
    return any(p.name == "images" or p.kind is p.VAR_KEYWORD for p in parameters)


def load_function(spec: str) -> Callable[..., Any]:
    """Import ``module:function``; a clear error if the module or the function is missing."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward.function {spec!r}: expected 'module:function'")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise RewardError(
            f"reward.function {spec!r}: cannot import module {module_name!r} ({exc}); install it, put it "
            "on PYTHONPATH, or place it in the repository root"
        ) from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise RewardError(f"reward.function {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardError(f"reward.function {spec!r}: {attr!r} is not callable")
    return fn


def _as_floats(out: Any, n: int, spec: str) -> list[float]:
    """The function's result as ``n`` floats (numbers, numpy or 0-d torch scalars)."""
    if isinstance(out, str | bytes) or not hasattr(out, "__len__"):
        raise RewardError(
            f"reward.function {spec!r} returned {type(out).__name__}; expected a list of {n} numbers"
        )
    if len(out) != n:
        raise RewardError(f"reward.function {spec!r} returned {len(out)} rewards for {n} completions")
    values = []
    for i, value in enumerate(out):
        if not isinstance(value, numbers.Real) and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise RewardError(
                f"reward.function {spec!r} returned {type(value).__name__} {str(value)[:40]!r} "
                "for a completion; expected a number",
                index=i,
            )
        values.append(float(value))
    return values
