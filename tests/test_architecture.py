"""The architecture holds: stage boundaries, an import graph without cycles, and dvc.yaml deps that are true.

The import graph is read from the source (``ast``), function-level imports included and
``if TYPE_CHECKING:`` blocks left out, with the rules of the workplace's DAG checker: importing
``alignpipe.a.b`` runs ``alignpipe/__init__.py``, ``alignpipe/a/__init__.py`` and ``alignpipe/a/b.py``.
"""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = SRC / "alignpipe"
# a matrix stage (the *_round stages of rounds 2+) is checked as its template: cmd, deps and params are
# the stage's own keys, with ${item.extra.*} left in
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
SIZE_EXEMPT = {
    # the params schema: nine sections, every field with its description and checks (the Prefect form
    # and --help read them); it is one concept, a split would put a section's fields and checks apart
    "src/alignpipe/params.py",
}
MAX_LINES = 420  # "about 400": a module that grows past it is split by concept


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_file(name: str, src: Path = SRC) -> Path | None:
    base = src.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_import_module(node: ast.Call) -> bool:
    """``importlib.import_module("alignpipe...")`` with a constant name."""
    name = getattr(node.func, "attr", getattr(node.func, "id", ""))
    arg = node.args[0] if node.args else None
    return name == "import_module" and isinstance(arg, ast.Constant) and isinstance(arg.value, str)


@cache
def imports_of(path: Path, src: Path = SRC) -> frozenset[Path]:
    """The alignpipe files that running ``path`` imports directly (parents packages included)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(m) for n in ast.walk(tree) if isinstance(n, ast.If) and _type_checking(n) for m in ast.walk(n)
    }
    here: list[str] | None = None
    if path.is_relative_to(src):
        parts = list(path.relative_to(src).with_suffix("").parts)
        here = parts[:-1]
    names: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                assert here is not None, f"{path}: relative import outside the package"
                anchor = here[: len(here) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names += [base, *(f"{base}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Call) and _is_import_module(node):
            names.append(node.args[0].value)
    out: set[Path] = set()
    for name in names:
        if name == "alignpipe" or name.startswith("alignpipe."):
            parts = name.split(".")
            for k in range(1, len(parts) + 1):
                found = module_file(".".join(parts[:k]), src)
                if found is not None:
                    out.add(found)
    out.discard(path)
    return frozenset(out)


def closure(start: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imports_of(path) - seen)
    return seen


def is_bare_marker(path: Path) -> bool:
    """``alignpipe/__init__.py`` when it only names the package (editing it changes no stage)."""
    return path == PKG / "__init__.py" and not imports_of(path) and len(path.read_text().splitlines()) <= 5


def library_files(src: Path = SRC) -> list[Path]:
    return sorted(p for p in (src / "alignpipe").rglob("*.py") if "__pycache__" not in p.parts)


def script_of(name: str) -> Path:
    match = re.search(r"(stages/\S+\.py)", DVC[name]["cmd"])
    assert match, f"{name}: no stages/<name>.py in its cmd"
    return ROOT / match.group(1)


def step(name: str) -> str:
    """The step a dvc stage runs: its script's name (``generate_round`` runs ``stages/generate.py``)."""
    return script_of(name).stem


def stage_module(name: str) -> Path | None:
    name = step(name) if name in DVC else name
    for candidate in (PKG / f"{name}.py", PKG / name):
        if candidate.exists():
            return candidate
    return None


def owner(path: Path) -> str | None:
    """The stage whose library module (or package) ``path`` belongs to."""
    for name in DVC:
        mod = stage_module(name)
        if mod is not None and (path == mod or (mod.is_dir() and path.is_relative_to(mod))):
            return name
    return None


def code_deps(name: str) -> list[str]:
    return [d for d in DVC[name].get("deps", []) if isinstance(d, str) and d.startswith(("src/", "stages/"))]


# --- (a) stage boundaries -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DVC))
def test_every_stage_has_its_library_module(name):
    assert stage_module(name) is not None, f"{name}: no src/alignpipe/{name}.py or src/alignpipe/{name}/"


def test_no_stage_module_imports_another_stage():
    crossings = []
    for path in library_files():
        mine = owner(path)
        if mine is None:
            continue
        for dep in imports_of(path):
            theirs = owner(dep)
            if theirs is not None and theirs != mine:
                crossings.append(f"{rel(path)} (stage {mine}) imports {rel(dep)} (stage {theirs})")
    assert not crossings, (
        "a stage imports another stage; move the shared part to a shared package:\n" + "\n".join(crossings)
    )


def test_shared_packages_import_no_stage():
    """A shared module that imports a stage would make that stage a dependency of all its users."""
    wrong = [
        f"{rel(path)} imports {rel(dep)} (stage {owner(dep)})"
        for path in library_files()
        if owner(path) is None
        for dep in imports_of(path)
        if owner(dep) is not None
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", list(DVC))
def test_every_stage_exposes_run_params_paths(name):
    """One shape for every stage: ``run(params, paths) -> summary``, paths a dataclass; its script calls it."""
    import dataclasses
    import importlib
    import inspect
    import typing

    mod = stage_module(name)
    assert mod is not None
    module = importlib.import_module(f"alignpipe.{step(name)}" + (".stage" if mod.is_dir() else ""))
    run = module.run
    first, second, *rest = inspect.signature(run).parameters.values()
    assert (first.name, second.name) == ("params", "paths"), name
    assert all(p.default is not inspect.Parameter.empty for p in rest), (
        f"{name}: extra run() options need defaults"
    )
    hints = typing.get_type_hints(run)
    assert dataclasses.is_dataclass(hints["paths"]) and hints["paths"].__name__.endswith("Paths"), hints[
        "paths"
    ]
    assert re.search(r"\brun\(", script_of(name).read_text()), f"stages/{name}.py does not call run()"


def test_orchestration_is_for_the_flows_only():
    """``alignpipe.orchestration`` drives dvc from the Prefect flows; no stage depends on it."""
    orchestration = PKG / "orchestration"
    users = [p for p in library_files() if not p.is_relative_to(orchestration)]
    users += sorted((ROOT / "stages").glob("*.py"))
    wrong = [
        f"{rel(p)} imports {rel(d)}" for p in users for d in imports_of(p) if d.is_relative_to(orchestration)
    ]
    assert not wrong, "\n".join(wrong)


# --- (b) dvc.yaml deps equal the imports ----------------------------------------------------------


@pytest.mark.parametrize("name", list(DVC))
def test_stage_deps_equal_the_scripts_import_closure(name):
    script = script_of(name)
    needed = {p for p in closure(script) if not is_bare_marker(p)}
    declared = code_deps(name)
    problems = []
    covered: set[Path] = set()
    for dep in declared:
        path = ROOT / dep
        if not path.exists():
            problems.append(f"remove {dep} (does not exist)")
        elif path.is_dir():
            inside = {p for p in path.rglob("*.py") if "__pycache__" not in p.parts}
            unused = sorted(rel(p) for p in inside - needed)
            if unused:
                problems.append(
                    f"replace folder {dep} by the files the stage imports "
                    f"({', '.join(sorted(rel(p) for p in inside & needed)) or 'none'}); it never imports "
                    f"{', '.join(unused)}"
                )
            covered |= inside & needed
        elif path in needed:
            covered.add(path)
        else:
            problems.append(f"remove {dep} (the stage never imports it)")
    problems += [f"add {rel(p)}" for p in sorted(needed - covered)]
    assert not problems, f"dvc.yaml stage {name} deps:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("name", list(DVC))
def test_stage_data_deps_are_not_code(name):
    """Code deps are exactly the closure above; every other dep is data a stage reads."""
    for dep in DVC[name].get("deps", []):
        dep = dep if isinstance(dep, str) else next(iter(dep))
        if not dep.startswith(("src/", "stages/")):
            assert not dep.endswith(".py"), f"{name}: {dep} is code outside src/ and stages/"


# --- (c) no import cycles -------------------------------------------------------------------------


def import_cycles(src: Path = SRC) -> list[list[str]]:
    """Strongly connected components with more than one file (Tarjan), as paths under ``src``."""
    graph = {p: imports_of(p, src) for p in library_files(src)}
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    on_stack: set[Path] = set()
    cycles: list[list[str]] = []

    def visit(v: Path) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(p.relative_to(src).as_posix() for p in component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, (
        "import cycles (a package __init__ that imports its own modules counts):\n"
        + "\n".join(" <-> ".join(c) for c in cycles)
    )


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    """The guard can fail: two modules that import each other are reported."""
    pkg = tmp_path / "alignpipe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""x"""\n')
    (pkg / "a.py").write_text("def f():\n    from alignpipe import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nfrom alignpipe.a import f\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from alignpipe import d\n"
    )
    (pkg / "d.py").write_text("from . import c\n")
    assert import_cycles(tmp_path) == [["alignpipe/a.py", "alignpipe/b.py"]]


# --- size -----------------------------------------------------------------------------------------


def test_no_library_module_is_over_about_400_lines():
    big = [
        f"{rel(p)}: {n}"
        for p in library_files()
        if (n := len(p.read_text().splitlines())) > MAX_LINES and rel(p) not in SIZE_EXEMPT
    ]
    assert not big, f"modules over {MAX_LINES} lines (split them by concept):\n" + "\n".join(big)


# --- (d) each stage reads only the params keys it lists -------------------------------------------


def uncovered_reads(trace_lines: list[str]) -> tuple[list[str], list[str]]:
    """From a params-read trace (alignpipe.params.TRACE_ENV): reads no dvc.yaml entry covers, and
    dotted entries no read touches."""
    read: dict[str, set[str]] = {}
    for line in trace_lines:
        record = json.loads(line)
        stage = Path(record["script"]).stem
        read.setdefault(stage, set()).update(record["keys"])
    gaps, extras = [], []
    for stage, keys in sorted(read.items()):
        declared = [p for p in DVC[stage].get("params", []) if isinstance(p, str)]
        for key in sorted(keys):
            if not any(key == d or key.startswith(d + ".") for d in declared):
                gaps.append(f"{stage} reads {key}: add it to its params in dvc.yaml")
        for d in declared:
            if "." in d and not any(k == d or k.startswith(d + ".") for k in keys):
                extras.append(f"{stage} lists {d} but never reads it: remove it from its params")
    return gaps, extras


def test_the_params_trace_catches_an_unlisted_key(tmp_path, monkeypatch):
    from alignpipe import params as P

    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv(P.TRACE_ENV, str(trace))
    monkeypatch.setattr(P, "_TRACE", P.ParamsTrace())
    (tmp_path / "params.yaml").write_text("dpo:\n  beta: 0.2\n  peft:\n    r: 4\n")
    dpo = P.load_section("dpo", tmp_path / "params.yaml")
    try:
        assert dpo.beta == 0.2 and dpo.peft.r == 4 and dpo.max_length > 0
    finally:
        del P.Section.__getattribute__  # the hook stays on for a traced process only
    P._TRACE.flush("stages/ref_logps.py")
    lines = trace.read_text().splitlines()
    assert set(json.loads(lines[0])["keys"]) == {"dpo.beta", "dpo.peft", "dpo.peft.r", "dpo.max_length"}
    gaps, extras = uncovered_reads(lines)
    assert gaps == ["ref_logps reads dpo.beta: add it to its params in dvc.yaml"]  # dpo.peft is listed
    assert extras == [
        "ref_logps lists dpo.max_prompt_length but never reads it: remove it from its params",
        "ref_logps lists dpo.dtype but never reads it: remove it from its params",
        "ref_logps lists dpo.reference_free but never reads it: remove it from its params",
    ]
