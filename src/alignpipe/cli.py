"""What every stage script shares: one-line errors and a debug switch (the closing summary: core.progress)."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

DEBUG_ENV = "ALIGNPIPE_DEBUG"


def stage_main(fn: Callable[[], Any]) -> Callable[[], None]:
    """Run a stage's main: expected failures print ``error: <one line>`` and exit 1.

    The traceback is shown only with ALIGNPIPE_DEBUG=1; KeyboardInterrupt exits 130.
    """

    @functools.wraps(fn)
    def wrapper() -> None:
        try:
            fn()
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the one place that turns failures into messages
            if os.environ.get(DEBUG_ENV):
                raise
            name = type(exc).__name__
            message = " ".join(str(exc).split()) or name
            print(
                f"error: {message}"
                + ("" if _is_ours(exc) else f" ({name}; set {DEBUG_ENV}=1 for the traceback)"),
                file=sys.stderr,
            )
            sys.exit(1)

    return wrapper


def _is_ours(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("alignpipe") or isinstance(exc, ValueError | FileNotFoundError)
