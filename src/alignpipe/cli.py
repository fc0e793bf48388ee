"""What every stage script shares: one-line errors and a debug switch (the closing summary: core.progress)."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

DEBUG_ENV = "ALIGNPIPE_DEBUG"
RETAIN_ENV = "ALIGNPIPE_RETAIN_FREED_MEMORY"


def stage_parser(description: str, *sections: str) -> argparse.ArgumentParser:
    """A stage script's parser: its paths as options, and in ``--help`` the params keys it reads,
    with their defaults and descriptions (the same texts as the Prefect form's)."""
    from alignpipe.params import section_help

    return argparse.ArgumentParser(
        description=description,
        epilog=section_help(*sections),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def stage_main(fn: Callable[[], Any]) -> Callable[[], None]:
    """Run a stage's main: expected failures print ``error: <one line>`` and exit 1.

    The traceback is shown only with ALIGNPIPE_DEBUG=1; KeyboardInterrupt exits 130.
    """

    @functools.wraps(fn)
    def wrapper() -> None:
        exit_with_launcher()
        retain_freed_memory()
        try:
            fn()
            close_process_group()
            end_worker()
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


def exit_with_launcher() -> None:
    """Under torchrun (``accelerate launch``), die with the launcher. torchrun starts each worker in
    a session of its own, so a SIGKILL of the launcher (or of dvc's process group) left the workers
    training, and writing ``models/`` after the stage had failed. Linux: ``PR_SET_PDEATHSIG``."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the call
        os._exit(1)


def retain_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse: no mmap per large block, no trimming of the heap.

    torch's CPU allocator passes every tensor to malloc. glibc serves a block over its mmap threshold
    (at most 32 MiB: a chunk of logits, a batch of MLP activations) with a fresh mmap and unmaps it on
    free, so every training step page-faults its activations in again, and the kernel zeroes each page.
    Two DPO steps of 8 pairs at max_length 512 (SmolLM2-135M's shape, fp32, 2 threads) took 5.9 M
    minor faults and 19 s of system time; with this, 1.5 M and 11 s, 70.8 s -> 64.7 s of wall time,
    for 16% more peak RSS (bench/results/2026-12-02-amd-epyc-2c-dpo-malloc-*.json). The results are
    the same bytes. Only glibc on Linux; elsewhere, or
    with ``ALIGNPIPE_RETAIN_FREED_MEMORY=0``, nothing changes. Returns whether it was applied."""
    if os.environ.get(RETAIN_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc's (musl has no mallopt options)
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def close_process_group() -> None:
    """End a stage's torch.distributed group (gloo, DeepSpeed) before exit: left to the interpreter's
    teardown, a worker sometimes aborted ("terminate called without an active exception") after
    writing its outputs, and the launcher failed the stage."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def end_worker() -> None:
    """Under torchrun, end a worker whose stage succeeded without the interpreter's teardown: even with
    its process group closed, a DeepSpeed ZeRO-3 worker still aborted there now and then (C++ threads
    destroyed while joinable: "terminate called without an active exception", SIGABRT) after its
    outputs were written, and the launcher failed the stage (seen once in a CI run of
    tests/test_deepspeed.py). Output streams and logging are flushed first; atexit hooks do not run."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _is_ours(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("alignpipe") or isinstance(exc, ValueError | FileNotFoundError)
