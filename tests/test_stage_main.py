"""alignpipe.cli.stage_main's ends: a torchrun worker that succeeded exits 0 without the interpreter's
teardown (where a DeepSpeed worker sometimes aborted after writing), with its output flushed; outside
torchrun, and on failure, the process ends as before."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

SCRIPT = textwrap.dedent(
    """
    import atexit, logging, sys
    from alignpipe.cli import stage_main

    logging.basicConfig(stream=sys.stderr, level=logging.INFO)

    @stage_main
    def main():
        atexit.register(lambda: print("teardown ran", flush=True))
        print("stage done")  # buffered: stdout is a pipe
        logging.getLogger("x").info("logged")
        if sys.argv[1] == "fail":
            raise ValueError("bad input")

    main()
    """
)


def run(mode: str, torchrun: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    env["PYTHONPATH"] = str(SRC)
    if torchrun:
        env["TORCHELASTIC_RUN_ID"] = "test"
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=60
    )


def test_a_torchrun_worker_that_succeeded_skips_the_teardown_with_its_output_flushed():
    done = run("ok", torchrun=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "stage done\n"  # flushed, and the atexit hook (interpreter teardown) did not run
    assert "logged" in done.stderr


def test_outside_torchrun_and_on_failure_the_process_ends_as_before():
    plain = run("ok", torchrun=False)
    assert plain.returncode == 0 and plain.stdout == "stage done\nteardown ran\n"
    failed = run("fail", torchrun=True)
    assert failed.returncode == 1 and "error: bad input" in failed.stderr
    assert failed.stdout == "stage done\nteardown ran\n"


FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    from alignpipe.cli import stage_main

    @stage_main
    def main():
        def cycle():  # a 64 MiB block: over glibc's largest mmap threshold (32 MiB)
            torch.empty(16 * 2**20).fill_(1.0)
        for _ in range(16):  # warm-up: the heap grows until a freed block fits the next aligned request
            cycle()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            cycle()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    main()
    """
)


def test_stages_keep_freed_memory_for_reuse_instead_of_faulting_it_in_again(tmp_path):
    """stage_main sets glibc's malloc to reuse freed blocks (alignpipe.cli.retain_freed_memory): once the
    heap has grown to fit them, at most one of five allocations of 64 MiB faults its pages in, where glibc's defaults mmap and
    fault in each one afresh (16384 pages of 4 KiB each time); ALIGNPIPE_RETAIN_FREED_MEMORY=0 keeps them."""
    if not sys.platform.startswith("linux"):
        import pytest

        pytest.skip("glibc's mallopt: Linux only")
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)

    def faults(retain: str) -> int:
        env = dict(os.environ, PYTHONPATH=str(SRC), ALIGNPIPE_RETAIN_FREED_MEMORY=retain)
        proc = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, check=True
        )
        return int(proc.stdout.split()[-1])

    default, retained = faults("0"), faults("1")
    assert default >= 5 * 16384 * 0.9, default
    assert retained < default / 4, (retained, default)  # at most one of the five faulted in
