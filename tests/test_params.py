"""params.yaml loads into every model; typos and bad values get named errors."""

from __future__ import annotations

import re
import typing
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


def test_model_defaults_equal_params_yaml():
    """params.yaml is the embedded default users run: every model default equals its value there."""
    data = yaml.safe_load(PARAMS.read_text())
    diffs: list[str] = []

    def walk(model: BaseModel, values: dict, prefix: str) -> None:
        if set(values) != set(type(model).model_fields):
            diffs.append(f"{prefix}: keys {sorted(values)} != fields {sorted(type(model).model_fields)}")
        for name in type(model).model_fields:
            default, key = getattr(model, name), f"{prefix}.{name}"
            if isinstance(default, BaseModel):
                walk(default, values.get(name) or {}, key)
            elif name in values and (values[name] != default or type(values[name]) is not type(default)):
                diffs.append(f"{key}: params.py {default!r} != params.yaml {values[name]!r}")

    walk(Params(), data, "params")
    assert not diffs, "\n".join(diffs)


def _section_models(model: type[BaseModel] = Params) -> set[type[BaseModel]]:
    found = {model}
    for field in model.model_fields.values():
        for candidate in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                found |= _section_models(candidate)
    return found


def test_every_field_has_a_description():
    """The Prefect form and the stages' --help show these; a bare key tells a user nothing."""
    models = _section_models()
    assert (
        len(models) == 19
    )  # Params, 10 sections, BuiltinSizes, Source, Peft, EarlyStopping, GateParams, UnpairedParams, RoundsParams, RoundItem
    missing = [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items()
               if not f.description or len(f.description) < 15]  # fmt: skip
    assert not missing, missing


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


def _stage_help(stage: str) -> str:
    import subprocess
    import sys

    argv = [sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--help"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def test_stage_help_lists_every_key_of_its_sections_with_its_description():
    """`stages/<name>.py --help` shows the params keys (default and description) the stage reads."""
    from alignpipe.params import Params, section_help

    for name, info in Params.model_fields.items():
        text = section_help(name)
        for field, sub in info.annotation.model_fields.items():
            if sub.description:  # a nested model lists its own keys (checked below for dpo.peft)
                assert f"{name}.{field} " in text or f"{name}.{field}." in text, (name, field)
    help_text = _stage_help("dpo")
    beta = Params.model_fields["dpo"].annotation.model_fields["beta"].description
    assert f"dpo.beta (0.1): {beta}" in help_text
    assert "dpo.peft.r (16): " in help_text and "--ref-logps" in help_text


def test_params_read_as_dvc_writes_them(tmp_path):
    """`dvc exp run -S evaluate.n=2` rewrites params.yaml with ruamel (YAML 1.2): the committed
    `metric: "off"` comes back unquoted and a float may come back as `5e-05`. PyYAML (YAML 1.1) reads
    those as false and as a string, which stopped every stage after the first `dvc exp run -S`."""
    text = (
        PARAMS.read_text()
        .replace('metric: "off"', "metric: off")
        .replace("learning_rate: 3.0e-5", "learning_rate: 3e-05")
    )
    assert "metric: off " in text and "learning_rate: 3e-05" in text
    assert yaml.safe_load(text)["dpo"]["early_stopping"]["metric"] is False  # the 1.1 reading
    path = tmp_path / "params.yaml"
    path.write_text(text)
    params = load_params(path)
    assert params.dpo.early_stopping.metric == "off"
    assert params.dpo.learning_rate == 3e-05


def test_stage_help_shows_the_value_of_a_default_factory():
    """A key whose default comes from a ``default_factory`` (dpo.loss_type, rounds.extra) showed
    ``PydanticUndefined`` in ``--help``: every section's text shows the value the stage would read."""
    from alignpipe.params import Params, section_help

    text = section_help(*Params.model_fields)
    assert "PydanticUndefined" not in text
    assert "  dpo.loss_type (['sigmoid', 'sft']): The preference loss" in text
    assert "  rounds.extra ([]): Rounds after the first" in text
    assert "  generate.stop ([]): " in text and "  dpo.loss_options ({}): " in text
    help_text = _stage_help("dpo")
    assert "dpo.loss_type (['sigmoid', 'sft']): " in help_text and "PydanticUndefined" not in help_text
