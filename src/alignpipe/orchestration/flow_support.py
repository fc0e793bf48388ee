"""What the Prefect flow needs besides Prefect: params updates, streamed processes (its report: report.py).

Kept out of ``flows/pipeline.py`` so it is tested without a Prefect server.
"""

from __future__ import annotations

import io
import os
import queue
import re
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from alignpipe.artifacts.io import atomic_path
from alignpipe.params import Params, parse_yaml, read_yaml, validate

_DVC_STATUS = re.compile(r"^(Running stage '|Stage '|'.*' didn't change|Data and pipelines are up to date)")


@dataclass(frozen=True)
class Change:
    """One params.yaml key the flow writes."""

    key: str  # dotted, e.g. "dpo.beta"
    old: Any
    new: Any


@dataclass
class StageResult:
    stage: str
    status: str
    seconds: float = 0.0
    message: str = ""


@dataclass
class ProcessResult:
    returncode: int
    dvc_lines: list[str] = field(default_factory=list)  # DVC's own status lines
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=200))


# ---------------------------------------------------------------- params.yaml


def explicit_values(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> JSON value for each leaf the caller set explicitly (``model_fields_set``).

    A partial section (``{"beta": 0.2}`` from the CLI) yields only ``beta``; a full form
    yields every key. Dicts and lists are leaves (they replace the old value whole).
    """
    out: dict[str, Any] = {}
    for name in sorted(model.model_fields_set):
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(explicit_values(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = to_jsonable_python(value)
    return out


def _lookup(tree: Mapping[str, Any] | None, dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def plan_changes(
    sections: Mapping[str, BaseModel | None],
    current: Mapping[str, Any],
    baseline: Mapping[str, Any] | None = None,
) -> list[Change]:
    """Keys to write: set explicitly, different from ``baseline`` and from ``current``.

    ``current`` is params.yaml as validated sections (JSON, defaults filled in).
    ``baseline`` is what the caller saw before editing (the deployment's form
    defaults); a key left as the form showed it is not written, even if params.yaml
    changed since the form was rendered. Without a baseline, ``current`` is it.
    """
    changes = []
    for section, model in sections.items():
        if model is None:
            continue
        base = (baseline or {}).get(section) or current.get(section)
        for key, new in explicit_values(model).items():
            known, seen = _lookup(base, key)
            if known and seen == new:
                continue
            _, old = _lookup(current.get(section), key)
            if old != new:
                changes.append(Change(f"{section}.{key}", old, new))
    return changes


def _complete(model: BaseModel) -> bool:
    """Every key set explicitly, nested models too: what a UI form submits."""
    return set(type(model).model_fields) <= model.model_fields_set and all(
        _complete(v)
        for v in (getattr(model, k) for k in type(model).model_fields)
        if isinstance(v, BaseModel)
    )


def form_baseline(
    deployment: Mapping[str, Any] | None, sections: Mapping[str, BaseModel | None]
) -> dict[str, Any] | None:
    """What the run form showed for each section, from the deployment's parameters.

    A section the deployment fills (``python flows/pipeline.py`` fills them from
    params.yaml) is its own baseline. A section it leaves null and that comes back
    complete was filled in the UI from the models' defaults (the JSON schema), so
    those are the baseline. Anything else (a partial section from the CLI, no
    deployment) is compared with params.yaml itself.
    """
    if deployment is None:
        return None
    out: dict[str, Any] = {}
    for name, model in sections.items():
        shown = deployment.get(name)
        if isinstance(shown, Mapping):
            out[name] = shown
        elif model is not None and _complete(model):
            out[name] = type(model)().model_dump(mode="json")
    return out


def current_sections(path: str | os.PathLike) -> dict[str, Any]:
    """params.yaml as JSON sections, every default filled in (what the stages will read)."""
    return validate(Params, read_yaml(path), where=str(path)).model_dump(mode="json")


def _yaml() -> Any:
    from ruamel.yaml import YAML  # a dvc dependency; round-trips comments and layout

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    rt.representer.add_representer(float, _represent_float)
    return rt


def _represent_float(representer: Any, value: float) -> Any:
    text = repr(value)  # PyYAML (YAML 1.1) reads 1e-05 as a string: write 1.0e-05
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _inline(value: Any) -> Any:
    """Lists and dicts in flow style, so a new value stays on its key's line, by its comment."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, list):
        node: Any = CommentedSeq([_inline(v) for v in value])
    elif isinstance(value, dict):
        node = CommentedMap({k: _inline(v) for k, v in value.items()})
    else:
        return value
    node.fa.set_flow_style()
    return node


def render_params(text: str, changes: Sequence[Change]) -> str:
    """``text`` (params.yaml) with ``changes`` applied; every other byte is kept."""
    from ruamel.yaml.comments import CommentedMap

    rt = _yaml()
    doc = rt.load(text) if text.strip() else CommentedMap()
    for change in changes:
        *parents, leaf = change.key.split(".")
        node = doc
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = CommentedMap()
            node = node[part]
        node[leaf] = _inline(change.new)
    out = io.StringIO()
    rt.dump(doc, out)
    return out.getvalue()


def update_params(
    path: str | os.PathLike,
    sections: Mapping[str, BaseModel | None],
    baseline: Mapping[str, Any] | None = None,
) -> list[Change]:
    """Write the changed keys of ``sections`` into params.yaml (comments kept); return them.

    The result is validated as a whole before anything is written, so a bad mix
    (``dpo.max_prompt_length`` >= ``dpo.max_length``) leaves params.yaml untouched.
    """
    path = Path(path)
    changes = plan_changes(sections, current_sections(path), baseline)
    if not changes:
        return []
    text = render_params(path.read_text(), changes)
    validate(Params, parse_yaml(text), where=f"{path} (with the flow's changes)")
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return changes


# ---------------------------------------------------------------- processes


def run_streaming(
    cmd: Sequence[str], cwd: str | os.PathLike, env: Mapping[str, str], on_line: Callable[[str, str], None]
) -> ProcessResult:
    """Run ``cmd``, calling ``on_line(stream, line)`` for each stdout/stderr line as it comes.

    Lines are handed over on the calling thread (Prefect's run logger stays in its
    context). If the caller is interrupted (cancel, Ctrl-C) the process is stopped.
    """
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, bufsize=1, errors="replace",
    )  # fmt: skip
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()

    def pump(stream: Any, name: str) -> None:
        for line in stream:
            lines.put((name, line.rstrip("\n")))
        lines.put((name, None))

    for stream, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
        threading.Thread(target=pump, args=(stream, name), daemon=True).start()
    result = ProcessResult(returncode=-1)
    try:
        open_streams = 2
        while open_streams:
            name, line = lines.get()
            if line is None:
                open_streams -= 1
                continue
            if _DVC_STATUS.match(line):
                result.dvc_lines.append(line)
            if name == "stderr":
                result.stderr_tail.append(line)
            on_line(name, line)
        result.returncode = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return result


def shard_devices(shard: int, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment for generate shard ``shard``: one of the GPUs in ``CUDA_VISIBLE_DEVICES``.

    Shards spread round robin over the devices the flow process sees
    (``CUDA_VISIBLE_DEVICES=0,1,2,3``: shard 5 gets GPU 1); without that variable
    the environment is left as it is.
    """
    devices = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return {"CUDA_VISIBLE_DEVICES": devices[shard % len(devices)]} if devices else {}
