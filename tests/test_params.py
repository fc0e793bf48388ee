"""params.yaml loads into every model; typos and bad values get named errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from alignpipe.params import Params, ParamsError, load_params, load_section, validate

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def test_params_yaml_loads_into_every_section_model():
    params = load_params(PARAMS)
    for section in Params.model_fields:
        assert load_section(section, PARAMS) == getattr(params, section)


def test_params_yaml_covers_every_model_field():
    """Every key the models know is spelled out in params.yaml (nothing hidden in defaults)."""
    data = yaml.safe_load(PARAMS.read_text())

    def walk(model, values, prefix):
        assert set(values) == set(model.model_fields), prefix
        for name, field in model.model_fields.items():
            nested = field.annotation
            if isinstance(nested, type) and issubclass(nested, BaseModel):
                walk(nested, values[name], f"{prefix}.{name}")

    walk(Params, data, "params")


def test_every_params_yaml_key_has_a_comment():
    lines = [ln for ln in PARAMS.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    uncommented = [ln for ln in lines if "#" not in ln and not ln.rstrip().endswith(":")]
    assert not uncommented, uncommented


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"dpo": {"betta": 0.1}}, "dpo.betta: unknown key (did you mean 'beta'?)"),
        ({"sft": {"peft": {"rank": 8}}}, "sft.peft.rank: unknown key"),
        ({"generat": {}}, "generat: unknown key (did you mean 'generate'?)"),
        ({"dpo": {"beta": 0}}, "dpo.beta: Input should be greater than 0"),
        ({"generate": {"top_p": 1.5}}, "generate.top_p"),
        ({"generate": {"backend": "vlm"}}, "generate.backend: Input should be 'auto', 'vllm' or 'hf'"),
        ({"pairs": {"eval_fraction": 1.0}}, "pairs.eval_fraction"),
        ({"sft": {"batch_size": 0}}, "sft.batch_size: Input should be greater than 0"),
        ({"reward": {"kind": "hf"}}, "reward.kind 'hf' needs reward.model"),
        ({"reward": {"kind": "python", "function": "nocolon"}}, "module:function"),
        ({"dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}}, "one weight per entry"),
        ({"dpo": {"ref_sync_steps": 8}}, "needs dpo.reference: live"),
        ({"data": {"sft": {"source": None}}}, "data.sft.source must be set"),
    ],
)
def test_bad_params_name_the_key(data, expected):
    with pytest.raises(ParamsError) as err:
        validate(Params, data)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_load_section_reports_file_and_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("dpo:\n  beta: -1\n")
    with pytest.raises(ParamsError, match=re.escape(f"{path}: dpo.beta")):
        load_section("dpo", path)
    with pytest.raises(ParamsError, match="did you mean 'dpo'"):
        load_section("dop", path)


def test_broken_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("dpo: [\n")
    with pytest.raises(ParamsError, match="not valid YAML") as err:
        load_params(path)
    assert "\n" not in str(err.value)
