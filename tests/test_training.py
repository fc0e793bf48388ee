"""The training package shared by sft and dpo: one fingerprint, one precision policy, one metrics log."""

from __future__ import annotations

import json

import pytest
import torch

from alignpipe.params import DpoParams, PeftParams, SftParams
from alignpipe.training.checkpoints import checkpoint_history, complete_checkpoints
from alignpipe.training.fingerprint import describe_change, fingerprint, sha256_tree
from alignpipe.training.metrics import MetricsLog
from alignpipe.training.peft import lora_config
from alignpipe.training.precision import weights_dtype


@pytest.fixture()
def inputs(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"weights")
    (tmp_path / "data.parquet").write_bytes(b"rows")
    return {"data": tmp_path / "data.parquet", "base model": tmp_path / "model"}


@pytest.mark.parametrize("params", [SftParams(), DpoParams()])
def test_the_fingerprint_changes_with_the_process_count_params_and_inputs(params, inputs):
    one = fingerprint(params, inputs, world_size=1)
    assert fingerprint(params, inputs, world_size=1) == one
    assert fingerprint(params, inputs, world_size=2) != one  # data order and batch split differ
    assert fingerprint(params.model_copy(update={"seed": 7}), inputs, 1) != one
    (inputs["base model"] / "w.bin").write_bytes(b"other weights")
    assert fingerprint(params, inputs, 1) != one


@pytest.mark.parametrize("params", [SftParams(), DpoParams()])
def test_observation_keys_keep_the_fingerprint(params, inputs):
    one = fingerprint(params, inputs, 1)
    for key, value in (("launcher", "accelerate launch"), ("logging_steps", 99), ("save_steps", 99)):
        assert fingerprint(params.model_copy(update={key: value}), inputs, 1) == one, key
    if isinstance(params, DpoParams):
        assert fingerprint(params.model_copy(update={"eval_steps": 99}), inputs, 1) == one


def test_sha256_tree_names_files_relative_to_the_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_bytes(b"1")
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b")
    (tmp_path / "b" / "y").write_bytes(b"")
    assert sha256_tree(tmp_path / "a") != sha256_tree(tmp_path / "b")


def test_describe_change_names_what_changed():
    old = {
        "params": {"learning_rate": 1e-4, "seed": 0},
        "inputs": {"data": "a", "base model": "m"},
        "world_size": 1,
    }
    new = {**old, "params": {"learning_rate": 1e-4, "seed": 1}, "inputs": {"data": "b", "base model": "m"}}
    assert describe_change(old, new, "sft") == "sft.seed changed (0 -> 1); data changed"
    assert describe_change(old, {**old, "world_size": 2}, "dpo") == "process count changed (1 -> 2)"
    assert describe_change(None, new, "sft") == "no fingerprint next to the checkpoints"


def test_incomplete_checkpoints_are_not_resume_points(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
@pytest.mark.parametrize("stage", [SftParams, DpoParams])
def test_one_master_weight_policy_for_both_stages(stage):
    lora = PeftParams(enabled=True)
    assert weights_dtype(stage(dtype="auto")) == "float32"  # CPU: float32 compute
    assert weights_dtype(stage(dtype="float16")) == "float32"  # fp16 autocast over fp32 weights
    assert weights_dtype(stage(dtype="bfloat16")) == "float32"  # full FT: fp32 master weights
    assert weights_dtype(stage(dtype="bfloat16", peft=lora)) == "bfloat16"  # frozen LoRA base in bf16
    assert weights_dtype(stage(dtype="float16", peft=lora)) == "float32"
    if stage is SftParams:  # QLoRA: sft only (the params refuse dpo.peft.load_in_4bit)
        assert weights_dtype(stage(peft=PeftParams(enabled=True, load_in_4bit=True))) == "bfloat16"


def test_lora_config_follows_the_params():
    config = lora_config(PeftParams(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"]))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.0)
    assert set(config.target_modules) == {"q_proj"} and config.task_type == "CAUSAL_LM"


def test_metrics_history_round_trips_through_a_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "live", enabled=False)
    log.log(2, {"loss": 0.5, "rewards/margins": 1})
    (tmp_path / "step-2").mkdir()
    state = {"step": 2, "fingerprint": {}, "scheduler": {}, "log_history": log.history}
    (tmp_path / "step-2" / "trainer_state.json").write_text(json.dumps(state))
    assert checkpoint_history(tmp_path / "step-2") == [(2, {"loss": 0.5, "rewards/margins": 1.0})]
    resumed = MetricsLog(tmp_path / "live", enabled=True, history=checkpoint_history(tmp_path / "step-2"))
    resumed.log(3, {"loss": 0.25})
    curve = (tmp_path / "live/plots/metrics/loss.tsv").read_text()
    assert curve == "step\tloss\n2\t0.5\n3\t0.25\n"
