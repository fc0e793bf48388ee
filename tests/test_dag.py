"""dvc.yaml matches the code: each stage's deps and params are what its script reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from alignpipe.params import Params

ROOT = Path(__file__).resolve().parents[1]
# a matrix stage (the *_round stages of rounds 2+) is checked as its template: cmd, deps and params are
# the stage's own keys, with ${item.extra.*} left in
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def step(name: str) -> str:
    """The step a stage runs: ``generate`` and ``generate_round`` both run stages/generate.py."""
    return re.search(r"stages/(\w+)\.py", DVC[name]["cmd"]).group(1)


@pytest.mark.parametrize("name", list(DVC))
def test_stage_deps_name_its_script_and_module(name):
    stage, name = DVC[name], step(name)
    assert name in (n.removesuffix("_round") for n in DVC if step(n) == name)  # one name per step
    assert f"stages/{name}.py" in stage["cmd"]
    assert f"stages/{name}.py" in stage["deps"]
    module = f"src/alignpipe/{name}"  # a module, or a package where the stage has helpers
    assert any(d in (module, f"{module}.py") or d.startswith(f"{module}/") for d in stage["deps"]), name
    for dep in stage["deps"]:
        if dep.startswith(("src/", "stages/")):
            assert (ROOT / dep).exists(), f"{name}: dep {dep} does not exist"


@pytest.mark.parametrize("name", list(DVC))
def test_stage_params_are_the_sections_its_script_loads(name):
    script = (ROOT / "stages" / f"{step(name)}.py").read_text()
    loaded = set(re.findall(r"load_section\(\s*\"(\w+)\"", script))
    declared = DVC[name].get("params", [])
    whole = {p for p in declared if isinstance(p, str) and "." not in p}
    dotted = {p for p in declared if isinstance(p, str) and "." in p}
    assert whole <= loaded, f"{name} declares sections its script never loads: {whole - loaded}"
    # a script that runs round 1 and rounds 2+ loads `rounds` only for a round (--round): the stages
    # running it declare together what it loads
    runs = [p for n in DVC if step(n) == step(name) for p in DVC[n].get("params", []) if isinstance(p, str)]
    assert loaded <= {p.split(".")[0] for p in runs}, f"{name} loads undeclared sections"
    for key in (d for d in dotted if d != "rounds.extra"):  # a list of rounds: no field below it
        section, *parents, field = key.split(".")
        model = Params.model_fields[section].annotation
        for part in parents:  # nested sections, e.g. dpo.peft.load_in_4bit
            model = model.model_fields[part].annotation
        assert field in model.model_fields, key


def test_a_dpo_sweep_leaves_ref_logps_alone():
    """dpo.beta / dpo.loss_type reach dpo and evaluate only: cached reference log-probs stay valid."""
    for key in ("dpo.beta", "dpo.loss_type"):
        touched = {n for n, s in DVC.items() for p in s.get("params", []) if p in (key, key.split(".")[0])}
        assert touched <= {"dpo", "dpo_round", "evaluate"} and "dpo" in touched, (key, touched)
