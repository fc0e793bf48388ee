"""Settings that cannot work fail at params time, with one line naming the key, before any stage runs.

Each check has a bad input here; the good neighbours next to it show that the check refuses only
what it must. The loss names and options that params.py spells out (it must not import torch) are
checked against the registry in alignpipe.core.losses, case by case.
"""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from alignpipe.core import losses, objective
from alignpipe.orchestration.flow_support import update_params
from alignpipe.params import (
    LOSS_OPTION_NAMES,
    LOSS_OPTIONS,
    REFERENCE_FREE_LOSSES,
    SORTED_ROW_LOSSES,
    DpoParams,
    LossName,
    Params,
    ParamsError,
    load_params,
    load_section,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
PREFS = {"data": {"preferences": {"source": "prefs.jsonl"}}}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # loss names and their options
        (
            {"dpo": {"loss_type": "sigmoidd"}},
            "dpo.loss_type: unknown loss_type 'sigmoidd' (did you mean 'sigmoid'?)",
        ),
        (
            {"dpo": {"loss_type": ["sigmoid", "sfft"]}},
            "dpo.loss_type: unknown loss_type 'sfft' (did you mean 'sft'?)",
        ),
        ({"dpo": {"loss_type": "zzz"}}, "dpo.loss_type: unknown loss_type 'zzz' (valid: sigmoid, hinge,"),
        ({"dpo": {"loss_type": []}}, "dpo.loss_type: name at least one loss"),
        (
            {"dpo": {"loss_options": {"gamma": 1.0}}},
            "dpo.loss_options: unknown loss option 'gamma' (did you mean 'simpo_gamma'?)",
        ),
        (
            {"dpo": {"loss_options": {"simpo_gamma": 1.0}}},
            "dpo.loss_options: option 'simpo_gamma' is not read by loss_type ['sigmoid', 'sft']",
        ),
        (
            {"dpo": {"loss_options": {"label_smoothing": 0.1}}},
            "dpo.loss_options: set label_smoothing as dpo.label_smoothing",
        ),
        (
            {"dpo": {"loss_type": "discopop", "loss_options": {"discopop_tau": 0.0}}},
            "dpo.loss_options: discopop_tau must be > 0",
        ),
        (
            {"dpo": {"loss_type": "orpo", "loss_options": {"orpo_lambda": -0.1}}},
            "dpo.loss_options: orpo_lambda must be >= 0",
        ),
        (
            {"dpo": {"loss_type": "hinge", "label_smoothing": 0.1}},
            "dpo.label_smoothing: not read by loss_type ['hinge']",
        ),
        ({"dpo": {"loss_type": "exo_pair"}}, "dpo.label_smoothing: exo_pair needs 0 < label_smoothing < 0.5"),
        (
            {"dpo": {"loss_type": "robust", "label_smoothing": 0.5}},
            "dpo.label_smoothing: Input should be less than 0.5",
        ),
        ({"dpo": {"loss_type": "aot", "wpo": True}}, "dpo.wpo: WPO weights pairs, but aot rows are sorted"),
        (
            {"dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}},
            "dpo.loss_weights: needs one weight per entry of dpo.loss_type (2), got 1",
        ),
        (
            {"dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [0.0, 0.0]}},
            "dpo.loss_weights: weights must be >= 0 with at least one > 0",
        ),
        (
            {"dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, -1.0]}},
            "dpo.loss_weights: weights must be >= 0",
        ),
        # steps
        ({"dpo": {"max_steps": 0}}, "dpo.max_steps: must be >= 1, or -1 to let the epochs decide (got 0)"),
        (
            {"dpo": {"loss_type": "simpo"}},
            "loss_type ['simpo'] reads no reference log-probs; set dpo.reference_free: true",
        ),
        (
            {"dpo": {"reference_free": True, "reference": "live"}},
            "dpo.reference_free needs no reference model; set dpo.reference: precomputed",
        ),
        ({"dpo": {"early_stopping": {"metric": "margin"}}}, "dpo.early_stopping.metric: Input should be"),
        (
            {"dpo": {"early_stopping": {"patience": 0}}},
            "dpo.early_stopping.patience: Input should be greater",
        ),
        ({"sft": {"save_minutes": 0}}, "sft.save_minutes: Input should be greater than 0"),
        ({"dpo": {"router_aux_loss_coef": -0.01}}, "dpo.router_aux_loss_coef: Input should be greater"),
        ({"sft": {"max_steps": 0}}, "sft.max_steps: must be >= 1, or -1"),
        ({"sft": {"max_steps": -2}}, "sft.max_steps: must be >= 1, or -1 to let the epochs decide (got -2)"),
        # sampling
        (
            {"generate": {"n": 1}},
            "generate.n: 1 sample per prompt gives no pairs to compare; set generate.n >= 2 or "
            "bring your own pairs (data.preferences.source)",
        ),
        (
            {"generate": {"temperature": 0}},
            "generate.n: 4 samples at temperature 0 (greedy) are 4 copies of one answer",
        ),
        ({"evaluate": {"n": 2, "temperature": 0.0}}, "evaluate.n: 2 samples at temperature 0 (greedy)"),
        ({**PREFS, "generate": {"n": 2, "temperature": 0}}, "generate.n: 2 samples at temperature 0"),
        ({"generate": {"stop": ["\n\n", ""]}}, "generate.stop: an empty stop string would end every sample"),
        # floats: YAML's .inf / .nan
        ({"dpo": {"beta": float("inf")}}, "dpo.beta: Input should be a finite number"),
        ({"sft": {"learning_rate": float("nan")}}, "sft.learning_rate: Input should be a finite number"),
        (
            {"pairs": {"min_chosen_reward": float("-inf")}},
            "pairs.min_chosen_reward: Input should be a finite number",
        ),
        # keys that a setting makes dead
        (
            {"sft": {"peft": {"load_in_4bit": True}}},
            "sft.peft.load_in_4bit: QLoRA trains LoRA adapters: it needs peft.enabled: true",
        ),
        (
            {"dpo": {"peft": {"load_in_4bit": True}}},
            "dpo.peft.load_in_4bit: QLoRA trains LoRA adapters: it needs peft.enabled: true",
        ),
        (
            {"reward": {"model": "some/rm"}},
            "reward.model: read only by reward.kind 'hf' (kind is 'builtin'); set it to null",
        ),
        (
            {"reward": {"kind": "hf", "model": "rm", "function": "m:f"}},
            "reward.function: read only by reward.kind 'python'",
        ),
        # empty strings and lists
        ({"sft": {"launcher": ""}}, "sft.launcher: String should have at least 1 character"),
        ({"dpo": {"peft": {"target_modules": []}}}, "dpo.peft.target_modules: name at least one module"),
    ],
)
def test_bad_setting_fails_with_one_line_naming_the_key(data, expected):
    with pytest.raises(ParamsError) as err:
        validate(Params, data)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "data",
    [
        {"dpo": {"loss_type": "exo_pair", "label_smoothing": 1e-3}},
        {"dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.0]}},
        {
            "dpo": {
                "loss_type": ["simpo", "orpo"],
                "loss_options": {"simpo_gamma": -0.5, "orpo_lambda": 0.0},
                "reference_free": True,
            }
        },
        {"dpo": {"loss_type": ["sigmoid", "simpo"]}},  # sigmoid reads the reference
        {"dpo": {"reference_free": True}},  # reference-free DPO (TRL's reference_free)
        {"dpo": {"early_stopping": {"metric": "accuracy", "patience": 1, "min_delta": 0.01}}},
        {"sft": {"save_minutes": None}, "dpo": {"save_minutes": 0.5}},
        {"dpo": {"loss_type": "bco_pair", "loss_options": {"bco_delta": -1.0}}},
        {"dpo": {"loss_type": "robust", "label_smoothing": 0.49, "wpo": True}},
        {"dpo": {"max_steps": 1}, "sft": {"max_steps": -1}},
        {**PREFS, "generate": {"n": 1, "temperature": 0}},  # user pairs only: one greedy sample is fine
        {"evaluate": {"n": 1, "temperature": 0}},
        {"generate": {"n": 2, "stop": ["\n\n"]}},
        {"reward": {"kind": "hf", "model": "some/rm"}},
        {"sft": {"peft": {"enabled": True, "load_in_4bit": True}}},
        {"dpo": {"peft": {"enabled": True, "load_in_4bit": True}}},  # QLoRA for dpo too (tests/test_qlora.py)
    ],
)
def test_good_neighbours_pass(data):
    validate(Params, data)


def test_params_loss_names_and_options_equal_the_loss_registry():
    assert typing.get_args(LossName) == tuple(LOSS_OPTIONS)
    assert set(LOSS_OPTIONS) == set(losses.LOSSES)
    assert {name: LOSS_OPTIONS[name] for name in losses.LOSSES} == {
        n: s.options for n, s in losses.LOSSES.items()
    }
    assert {n for n, s in losses.LOSSES.items() if s.sorted_rows} == SORTED_ROW_LOSSES
    assert {n for n, s in losses.LOSSES.items() if s.reference_free} == REFERENCE_FREE_LOSSES
    assert set(LOSS_OPTION_NAMES) == {f.name for f in fields(losses.LossOptions)} - {"label_smoothing"}
    description = DpoParams.model_fields["loss_type"].description or ""
    assert all(name in description for name in LOSS_OPTIONS)


def _losses_accept(loss_type: str, label_smoothing: float, options: dict[str, float], wpo: bool) -> bool:
    b = 3
    logps = [-torch.rand(b) - 1 for _ in range(4)]
    lengths = torch.tensor([3, 5, 7])
    try:
        objective.preference_loss(loss_type, *logps, beta=0.1, label_smoothing=label_smoothing,
                               chosen_lengths=lengths, rejected_lengths=lengths,
                               wpo_weights=torch.ones(b) if wpo else None, **options)  # fmt: skip
    except ValueError:
        return False
    return True


def test_params_refuse_exactly_what_the_losses_refuse():
    """Every loss x label_smoothing x one option x wpo: params time and loss time agree."""
    disagree = []
    for name, ls, option, wpo in itertools.product(
        LOSS_OPTIONS, (0.0, 0.1), (None, *LOSS_OPTION_NAMES), (0, 1)
    ):
        options = {option: 1.0} if option else {}
        data = {"dpo": {"loss_type": name, "label_smoothing": ls, "loss_options": options, "wpo": bool(wpo),
                        "reference_free": name in REFERENCE_FREE_LOSSES}}  # fmt: skip
        try:
            validate(Params, data)
            params_ok = True
        except ParamsError:
            params_ok = False
        if params_ok != _losses_accept(name, ls, options, bool(wpo)):
            disagree.append((name, ls, option, wpo, params_ok))
    assert not disagree


def test_a_stage_loading_its_section_gets_the_check(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("dpo:\n  loss_type: ipoo\n  max_steps: 0\n")
    with pytest.raises(ParamsError) as err:
        load_section("dpo", path)
    assert str(err.value) == (
        f"{path}: dpo.max_steps: must be >= 1, or -1 to let the epochs decide (got 0); "
        "dpo.loss_type: unknown loss_type 'ipoo' (did you mean 'ipo'?)"
    )


def test_cross_section_check_fires_on_the_whole_file_and_the_flows_write(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("generate:\n  n: 1\n")
    with pytest.raises(ParamsError, match=r"generate\.n: 1 sample per prompt gives no pairs"):
        load_params(path)
    path.write_text("generate:\n  n: 4\n")
    with pytest.raises(ParamsError, match=r"with the flow's changes\): generate\.n: 1 sample per prompt"):
        update_params(path, {"generate": Params().generate.model_copy(update={"n": 1})})
    assert path.read_text() == "generate:\n  n: 4\n"  # nothing written


def test_params_do_not_import_torch():
    """Every stage imports params.py: the loss names live there so that it stays light."""
    code = (
        "import sys, alignpipe.params; print(sorted(m for m in sys.modules if 'torch' in m or 'losses' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_flow_form_refuses_a_bad_loss_name():
    """Both checks a Prefect run meets: the server's JSON schema (the form) and the flow's pydantic models."""
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.schema_tools import validate as validate_schema

    spec = importlib.util.spec_from_file_location("alignpipe_flow", ROOT / "flows" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pipeline = module.pipeline
    schema = pipeline.parameters.model_dump()
    dpo = schema["definitions"]["DpoParams"]["properties"]
    assert dpo["beta"]["description"].startswith("KL strength")  # the form shows the descriptions
    assert validate_schema({"dpo": {"loss_type": ["sigmoid", "sft"]}}, schema) == []
    assert validate_schema({"dpo": {"loss_type": "sigmoidd"}}, schema) != []
    assert isinstance(pipeline.validate_parameters({"dpo": {"loss_type": "ipo"}})["dpo"], DpoParams)
    with pytest.raises(ParameterTypeError, match=r"dpo\.loss_type: .*unknown loss_type 'sigmoidd'"):
        pipeline.validate_parameters({"dpo": {"loss_type": "sigmoidd"}})
    with pytest.raises(ParameterTypeError, match=r"generate\.n: .*temperature 0"):
        pipeline.validate_parameters({"generate": {"n": 4, "temperature": 0}})
