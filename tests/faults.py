"""Fault injection for the reliability tests: kill a process at a seeded moment, compare artifacts.

``run_process`` starts a command in its own process group and, when asked, SIGKILLs the whole
group ``delay`` seconds after ``trigger()`` first holds (a checkpoint or chunk file appears),
as a crash or an OOM kill would. ``kill_at`` does the same inside the test process: a trainer's
``train_step`` raises at a given step. ``artifact_digests`` hashes what a run wrote, leaving out
what measures the run rather than its result (seconds, throughput, resume counters).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml

# Small enough for seconds per stage, big enough that each resumable stage has several resume points:
# sft 24 rows / 4 = 6 steps x 2 epochs, a checkpoint every 3; generate 12 prompts in 6 chunks;
# all_pairs with ties kept gives 4 pairs a prompt (~36 train pairs): dpo 9 steps x 2, checkpoint every 3.
TINY = {
    "data": {"builtin": {"n_sft": 24, "n_prompts": 12, "n_eval": 6}},
    "sft": {"batch_size": 4, "epochs": 2, "max_length": 128, "save_steps": 3, "logging_steps": 1},
    "generate": {"backend": "hf", "n": 4, "max_new_tokens": 24, "chunk_prompts": 2, "batch_size": 4},
    "pairs": {
        "strategy": "all_pairs",
        "drop_ties": False,
        "max_similarity": 1.0,
        "allow_truncated": True,
        "eval_fraction": 0.25,
    },
    "ref_logps": {"batch_size": 4},
    "dpo": {
        "batch_size": 4,
        "epochs": 2,
        "max_length": 128,
        "max_prompt_length": 64,
        "save_steps": 3,
        "logging_steps": 1,
        "eval_steps": 3,
        "learning_rate": 1.0e-3,
    },
    "evaluate": {"backend": "hf", "max_new_tokens": 16, "batch_size": 4},
}

# Metrics that describe the run, not its result: they differ between a resumed and a straight run.
VOLATILE_KEY = re.compile(r"seconds|per_s\b|per_second|resumed|_generated|_reused|^timestamp$")
VOLATILE_FILE = re.compile(r"per_s\.tsv$|per_second\.tsv$")
# What an interrupted atomic write can leave behind (alignpipe.artifacts.io.atomic_path, training.save_checkpoint).
TEMP_NAME = re.compile(r"^\..+\.(tmp|old)$")


@dataclass
class Run:
    returncode: int
    seconds: float  # start to exit
    trigger_seconds: float | None  # start to the first time trigger() held
    done_seconds: float | None  # start to the first time done() held (the final artifact is there)
    killed: bool
    log: str  # stdout and stderr, interleaved


def _resolved(params: dict, value: object, lookup: Callable[[object, str], object]) -> list:
    """A matrix entry's values: a list as written, or the params list a ``${...}`` names."""
    match = re.fullmatch(r"\$\{([\w.-]+)\}", value) if isinstance(value, str) else None
    return list(lookup(params, match.group(1)) if match else value)  # type: ignore[call-overload]


def stage_argv(ws: Path, stage: str) -> list[str]:
    """The stage's command from ``dvc.yaml`` (launchers resolved to this interpreter); a matrix stage by
    its generated name (``dpo_round@extra0``: its ``${item.extra.*}`` from entry 0 of ``rounds.extra``)."""
    name, _, member = stage.partition("@")
    definition = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"][name]
    cmd = re.sub(r"\$\{\w+\.launcher\}", "python", " ".join(definition["cmd"].split()))
    params = yaml.safe_load((ws / "params.yaml").read_text())

    def lookup(found: object, dotted: str) -> object:
        for part in dotted.split("."):
            found = found[int(part)] if isinstance(found, list) else found[part]  # type: ignore[index]
        return found

    context: dict[str, object] = dict(params)
    if "matrix" in definition:  # DVC names a member <key><index> for a dict or list value, else the value
        lists = {key: _resolved(params, v, lookup) for key, v in definition["matrix"].items()}
        members = {}
        for combo in itertools.product(*(list(enumerate(v)) for v in lists.values())):
            pairs = list(zip(lists, combo, strict=True))
            label = "-".join(f"{k}{i}" if isinstance(v, dict | list) else str(v) for k, (i, v) in pairs)
            members[label] = {k: v for k, (_, v) in pairs}
        context["item"], context["key"] = members[member], member

    def value(match: re.Match[str]) -> str:  # any other ${section.key}, e.g. evaluate's ${rounds.final}
        return str(lookup(context, match.group(1)))

    cmd = re.sub(r"\$\{([\w.-]+)\}", value, cmd)
    argv = shlex.split(cmd)
    return [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]


def run_process(
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    log_path: Path,
    *,
    trigger: Callable[[], bool] | None = None,
    done: Callable[[], bool] | None = None,
    kill_after: float | None = None,
    timeout: float = 300,
) -> Run:
    """Run ``argv``; with ``kill_after``, SIGKILL its process group that long after ``trigger`` holds.

    ``trigger=None`` counts from the start; ``done`` only records when the final artifact
    appears. A run that ends on its own first is reported with ``killed=False``.
    """
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        fired, finished, killed = None, None, False
        while proc.poll() is None:
            now = time.perf_counter() - start
            if fired is None and (trigger is None or trigger()):
                fired = now
            if finished is None and done is not None and done():
                finished = now
            if kill_after is not None and fired is not None and now - fired >= kill_after:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                # it may have exited on its own between the poll and the signal (a zombie takes the
                # signal): then it was not killed, and the caller retries with a shorter delay
                killed = proc.returncode == -signal.SIGKILL
                break
            if now > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError(
                    f"{shlex.join(argv)} ran over {timeout} s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.01)
    return Run(
        proc.returncode,
        time.perf_counter() - start,
        fired,
        finished,
        killed,
        log_path.read_text(errors="replace"),
    )


def kill_at(monkeypatch: pytest.MonkeyPatch, module: ModuleType, step: int) -> None:
    """Make ``module.train_step`` raise KeyboardInterrupt when it is called for ``step`` (1-based), as a
    kill between two steps would: the steps before it ran and their checkpoints are on disk.

    ``module`` is the trainer module whose ``train_step`` the loop looks up at call time
    (``alignpipe.dpo.stage`` for pair losses, ``alignpipe.dpo.kto`` for unpaired ones). Use it inside
    ``monkeypatch.context()`` so the rerun trains normally.
    """
    real = module.train_step

    def train_step(run, s, *args):
        if s == step:
            raise KeyboardInterrupt
        return real(run, s, *args)

    monkeypatch.setattr(module, "train_step", train_step)


def file_appears(ws: Path, pattern: str) -> Callable[[], bool]:
    return lambda: any(ws.glob(pattern))


def log_contains(log: Path, text: str) -> Callable[[], bool]:
    return lambda: log.exists() and text in log.read_text(errors="replace")


def _file_digest(path: Path) -> str:
    if path.suffix == ".json":
        try:
            return hashlib.sha256(
                json.dumps(_stable(json.loads(path.read_text())), sort_keys=True).encode()
            ).hexdigest()
        except ValueError:
            pass
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stable(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if not VOLATILE_KEY.search(str(k))}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def artifact_digests(ws: Path, paths: Iterable[str]) -> dict[str, str]:
    """relative path -> sha256 of every file under ``paths`` (JSON without volatile keys)."""
    out = {}
    for rel in paths:
        root = ws / rel
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if not VOLATILE_FILE.search(path.name):
                out[path.relative_to(ws).as_posix()] = _file_digest(path)
    return out


def temp_leftovers(root: Path) -> list[str]:
    """Temporary names under ``root`` that an interrupted atomic write leaves."""
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*") if TEMP_NAME.match(p.name))


def cache_problems(ws: Path) -> list[str]:
    """What is wrong in the DVC cache: objects whose content does not match their md5 name, temp
    files, and directory listings that are not JSON or name an object that is not there."""
    problems = []
    cache = ws / ".dvc" / "cache" / "files" / "md5"
    for path in sorted(cache.rglob("*")) if cache.exists() else []:
        if not path.is_file():
            continue
        name = path.parent.name + path.name
        if path.name.endswith(".dir"):
            try:
                entries = json.loads(path.read_text())
            except ValueError:
                problems.append(f"{name}: not a JSON directory listing")
                continue
            for entry in entries:
                md5 = entry["md5"]
                if not (cache / md5[:2] / md5[2:]).is_file():
                    problems.append(f"{name}: lists {entry['relpath']}, whose object {md5} is missing")
        elif not re.fullmatch(r"[0-9a-f]{32}", name):
            problems.append(f"{name}: not a cache object name (a temporary file?)")
        elif hashlib.md5(path.read_bytes()).hexdigest() != name:
            problems.append(f"{name}: content does not match its md5")
    return problems


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """A full disk, as the kernel enforces it: no file of this process may grow past ``nbytes``.

    RLIMIT_FSIZE makes every write beyond the limit fail with EFBIG, whoever writes (Python,
    pyarrow, safetensors' Rust); SIGXFSZ is ignored so the write fails instead of killing the
    process. Works unprivileged and as root (unlike a read-only folder or a tiny tmpfs).
    """
    import resource

    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def limit_file_size_in_child(nbytes: int) -> Callable[[], None]:
    """``preexec_fn`` for a subprocess that runs on a "full disk" (see :func:`file_size_limit`)."""

    def preexec() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # SIG_IGN survives exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return preexec
