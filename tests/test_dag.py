"""dvc.yaml matches the code: each stage's deps and params are what its script reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from alignpipe.params import Params

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", list(DVC))
def test_stage_deps_name_its_script_and_module(name):
    stage = DVC[name]
    assert f"stages/{name}.py" in stage["cmd"]
    assert f"stages/{name}.py" in stage["deps"]
    module = f"src/alignpipe/{name}"  # a module, or a package where the stage has helpers
    assert any(d in (module, f"{module}.py") or d.startswith(f"{module}/") for d in stage["deps"]), name
    for dep in stage["deps"]:
        if dep.startswith(("src/", "stages/")):
            assert (ROOT / dep).exists(), f"{name}: dep {dep} does not exist"


@pytest.mark.parametrize("name", list(DVC))
def test_stage_params_are_the_sections_its_script_loads(name):
    script = (ROOT / "stages" / f"{name}.py").read_text()
    loaded = set(re.findall(r"load_section\(\s*\"(\w+)\"", script))
    declared = DVC[name].get("params", [])
    whole = {p for p in declared if isinstance(p, str) and "." not in p}
    dotted = {p for p in declared if isinstance(p, str) and "." in p}
    assert whole <= loaded, f"{name} declares sections its script never loads: {whole - loaded}"
    assert loaded <= whole | {d.split(".")[0] for d in dotted}, f"{name} loads undeclared sections"
    for key in dotted:
        section, *parents, field = key.split(".")
        model = Params.model_fields[section].annotation
        for part in parents:  # nested sections, e.g. dpo.peft.load_in_4bit
            model = model.model_fields[part].annotation
        assert field in model.model_fields, key


def test_a_dpo_sweep_leaves_ref_logps_alone():
    """dpo.beta / dpo.loss_type reach dpo and evaluate only: cached reference log-probs stay valid."""
    for key in ("dpo.beta", "dpo.loss_type"):
        touched = {n for n, s in DVC.items() for p in s.get("params", []) if p in (key, key.split(".")[0])}
        assert touched <= {"dpo", "evaluate"} and "dpo" in touched, (key, touched)
