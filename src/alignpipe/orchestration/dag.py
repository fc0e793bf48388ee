"""The DVC pipeline as the Prefect flow sees it: stage order, plans, ``dvc repro`` output.

The order comes from DVC itself (``dvc dag --dot``, a stable CLI output), never
from a hand-kept list, so a stage added to ``dvc.yaml`` shows up in the flow.
Everything here is plain data and parsing, testable without DVC or Prefect.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_NODE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)"\s*;\s*$')
_EDGE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)"\s*->\s*"((?:[^"\\]|\\.)*)"\s*;\s*$')

RAN, UP_TO_DATE, RESTORED, FAILED, NOT_RUN = (
    "ran",
    "up to date",
    "restored from run-cache",
    "failed",
    "not run",
)
UNKNOWN = "unknown"


class DagError(ValueError):
    """The DAG cannot be read, or a requested stage is not in it."""


@dataclass(frozen=True)
class Dag:
    """Stages in ``dvc.yaml`` order and edges ``(upstream, downstream)``."""

    nodes: tuple[str, ...]
    edges: tuple[tuple[str, str], ...] = ()
    _parents: dict[str, list[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parents: dict[str, list[str]] = {n: [] for n in self.nodes}
        for up, down in self.edges:
            if up not in parents or down not in parents:
                raise DagError(f"edge {up} -> {down} names a stage that is not a node")
            parents[down].append(up)
        object.__setattr__(self, "_parents", parents)

    def order(self) -> list[str]:
        """All stages, upstream first; ties keep ``dvc.yaml`` order (Kahn's algorithm)."""
        indegree = {n: len(self._parents[n]) for n in self.nodes}
        children: dict[str, list[str]] = {n: [] for n in self.nodes}
        for up, down in self.edges:
            children[up].append(down)
        rank = {n: i for i, n in enumerate(self.nodes)}
        ready = sorted((n for n in self.nodes if indegree[n] == 0), key=rank.__getitem__)
        out: list[str] = []
        while ready:
            node = ready.pop(0)
            out.append(node)
            for child in children[node]:
                indegree[child] -= 1
                if indegree[child] == 0:
                    ready.append(child)
            ready.sort(key=rank.__getitem__)
        if len(out) != len(self.nodes):
            raise DagError(f"the DAG has a cycle through {sorted(set(self.nodes) - set(out))}")
        return out

    def upstream(self, targets: Iterable[str]) -> set[str]:
        """The targets and every stage they (transitively) depend on."""
        seen: set[str] = set()
        todo = [m for t in targets for m in self.members(t)]
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(self._parents[node])
        return seen

    def plan(self, targets: Sequence[str] | None = None) -> list[str]:
        """Stages to visit, upstream first: all of them, or ``targets`` and what they need."""
        keep = set(self.nodes) if not targets else self.upstream(targets)
        return [n for n in self.order() if n in keep]

    def members(self, stage: str) -> list[str]:
        """``stage``, or every member of the ``foreach``/``matrix`` stage ``stage`` in DAG order, as
        ``dvc repro`` reads a group's name (dpo_round: dpo_round@extra0, dpo_round@extra1, ...)."""
        if stage in self._parents:
            return [stage]
        group = [n for n in self.order() if "@" in n and n.partition("@")[0] == stage]
        return group or [self.check(stage)]

    def check(self, stage: str) -> str:
        if stage not in self._parents:
            names = list(dict.fromkeys(n.partition("@")[0] for n in self.nodes))
            close = difflib.get_close_matches(stage, [*self.nodes, *names], n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"stages: {', '.join(self.nodes)}"
            raise DagError(f"unknown stage '{stage}' ({hint})")
        return stage


def parse_dot(text: str) -> Dag:
    """Parse ``dvc dag --dot``: nodes in file order, edges ``"up" -> "down"``."""
    nodes: list[str] = []
    edges: list[tuple[str, str]] = []
    for line in text.splitlines():
        if m := _EDGE.match(line):
            edges.append((m.group(1), m.group(2)))
        elif m := _NODE.match(line):
            nodes.append(m.group(1))
    for up, down in edges:  # a node only named in an edge still counts
        nodes.extend(n for n in (up, down) if n not in nodes)
    return Dag(tuple(dict.fromkeys(nodes)), tuple(edges))


def stage_status(output: Iterable[str], stage: str) -> str:
    """What ``dvc repro --single-item <stage>`` did, read from its output lines."""
    quoted = re.escape(f"'{stage}'")
    patterns = (
        (RAN, rf"^Running stage {quoted}"),
        (RESTORED, rf"^Stage {quoted} is cached - skipping run"),
        (UP_TO_DATE, rf"^(Stage )?{quoted} didn't change, skipping"),
    )
    lines = list(output)
    for status, pattern in patterns:
        if any(re.match(pattern, line) for line in lines):
            return status
    return (
        UP_TO_DATE if any(line.startswith("Data and pipelines are up to date") for line in lines) else UNKNOWN
    )


def error_message(stderr: Sequence[str], returncode: int) -> str:
    """The stage's own message: its last ``error: ...`` line, else DVC's last ``ERROR:`` line.

    Indented lines right after it are part of it (DVC names the process that holds a lock there).
    """
    lines = list(stderr)
    for prefix in ("error:", "ERROR:"):
        found = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        if found:
            parts = [lines[found[-1]].strip()]
            for line in lines[found[-1] + 1 :]:
                if not line.strip() or not line[0].isspace():
                    break
                parts.append(line.strip())
            return " ".join(parts)
    tail = [line.strip() for line in stderr if line.strip()]
    return tail[-1] if tail else f"exited with {returncode}"


def dvc_command() -> list[str]:
    """``dvc`` from this interpreter, so stages' ``python`` is this environment's too."""
    return [sys.executable, "-m", "dvc"]


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for stage processes: this venv first on PATH, unbuffered, calm progress bars."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TQDM_MININTERVAL", "10")  # tqdm>=4.66 reads TQDM_* defaults: ~1 log line per 10 s
    env.update(extra or {})
    return env


def read_dag(workspace: str | os.PathLike) -> Dag:
    """The workspace's DAG, from ``dvc dag --dot``."""
    proc = subprocess.run(
        [*dvc_command(), "dag", "--dot"], cwd=workspace, capture_output=True, text=True, env=stage_env()
    )
    if proc.returncode != 0:
        raise DagError(
            f"dvc dag failed in {workspace}: {error_message(proc.stderr.splitlines(), proc.returncode)}"
        )
    return parse_dot(proc.stdout)


def stage_command(workspace: str | os.PathLike, stage: str) -> str:
    """The shell command of a ``dvc.yaml`` stage with ``${...}`` resolved (DVC's Python API)."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        found = [
            s for s in repo.index.stages if getattr(s, "name", None) == stage and s.path_in_repo == "dvc.yaml"
        ]
    if not found:
        raise DagError(f"no stage '{stage}' in {Path(workspace) / 'dvc.yaml'}")
    cmd = found[0].cmd
    return cmd if isinstance(cmd, str) else " && ".join(cmd)
