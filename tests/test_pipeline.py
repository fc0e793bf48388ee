"""End-to-end: `dvc repro` in a throwaway copy of the repository, on a tiny model."""

from __future__ import annotations

import json

import pytest
from test_architecture import uncovered_reads
from workspace import ROOT, dvc, make_workspace, ran_stages, set_params

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet
from alignpipe.evaluate.preferences import FIGURES
from alignpipe.params import TRACE_ENV

pytestmark = pytest.mark.slow

SMALL_DATA = {"builtin": {"n_sft": 16, "n_prompts": 12, "n_eval": 8}}


@pytest.fixture()
def workspace(tmp_path, tiny_model_dir):
    return make_workspace(
        tmp_path / "ws", {"base_model": {"source": str(tiny_model_dir)}, "data": SMALL_DATA}
    )


def test_base_model_and_prepare_run_offline_and_incrementally(workspace):
    first = dvc(workspace, "repro", "base_model", "prepare")
    assert sorted(ran_stages(first.stdout)) == ["base_model", "prepare"]
    assert (workspace / "models/base/model.safetensors").exists()
    assert len(read_parquet(workspace / "data/prepared/sft.parquet", schema.SFT)) == 16
    assert ran_stages(dvc(workspace, "repro", "base_model", "prepare").stdout) == []
    set_params(workspace, {"data": {"builtin": {"n_sft": 20}}})
    assert ran_stages(dvc(workspace, "repro", "base_model", "prepare").stdout) == ["prepare"]
    assert len(read_parquet(workspace / "data/prepared/sft.parquet", schema.SFT)) == 20


def test_a_failing_stage_loses_no_artifact(workspace):
    """Upstream artifacts stay; the failed stage's last good output comes back with `dvc checkout`."""
    dvc(workspace, "repro", "base_model", "prepare")
    base = (workspace / "models/base/model.safetensors").read_bytes()
    before = (workspace / "data/prepared/sft.parquet").read_bytes()
    set_params(workspace, {"data": {"sft": {"source": "missing.jsonl"}}})
    proc = dvc(workspace, "repro", "prepare", check=False)
    assert proc.returncode != 0
    assert "error: missing.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    assert (workspace / "models/base/model.safetensors").read_bytes() == base
    assert not list((workspace / "data").glob("**/.*.tmp")), "a temporary file was left behind"
    dvc(workspace, "checkout", "prepare")
    assert (workspace / "data/prepared/sft.parquet").read_bytes() == before


REWARD_MODULE = '''
def score(prompts, completions):
    """A deterministic toy reward with spread: distinct characters of the answer."""
    return [float(len(set(c)) % 5) for c in completions]
'''

TINY_PIPELINE = {
    "data": {"builtin": {"n_sft": 16, "n_prompts": 16, "n_eval": 6}},
    "sft": {"batch_size": 4, "save_steps": 2},
    "generate": {"n": 4, "max_new_tokens": 8, "chunk_prompts": 4},
    "reward": {"kind": "python", "function": "toy_reward:score"},
    "pairs": {"allow_truncated": True, "eval_fraction": 0.25},
    "dpo": {"batch_size": 4, "eval_steps": 2, "save_steps": 2, "max_length": 64, "max_prompt_length": 48},
    # a held-out preference split in Anthropic HH text (evaluate.preferences): its three figures in eval.json
    "evaluate": {"max_new_tokens": 8, "n_examples": 2,
                 "preferences": {"source": str(ROOT / "tests/fixtures/formats/hh_test.jsonl")}},
}  # fmt: skip


def test_full_pipeline_then_a_beta_sweep_then_kto(tmp_path, tiny_model_dir, monkeypatch):
    """The whole DAG; a beta sweep reruns only dpo and evaluate; switching to KTO adds the unpaired
    reference pass, and a KTO weight then reruns only dpo and evaluate again."""
    ws = make_workspace(tmp_path / "ws", {"base_model": {"source": str(tiny_model_dir)}, **TINY_PIPELINE})
    (ws / "toy_reward.py").write_text(REWARD_MODULE)
    trace = tmp_path / "params_read.jsonl"
    monkeypatch.setenv(TRACE_ENV, str(trace))  # each stage records the params keys it reads
    first = dvc(ws, "repro")
    monkeypatch.delenv(TRACE_ENV)
    assert sorted(ran_stages(first.stdout)) == sorted(
        ["base_model", "prepare", "sft", "reward_model", "generate", "score", "pairs", "ref_logps", "dpo",
         "evaluate"]
    )  # fmt: skip
    lines = trace.read_text().splitlines()
    assert len(lines) == 10, lines  # one record per stage process
    gaps, extras = uncovered_reads(lines)
    assert not gaps and not extras, "dvc.yaml params vs the keys each stage read:\n" + "\n".join(
        gaps + extras
    )
    for path in (
        "models/dpo/model.safetensors",
        "reports/eval.json",
        "reports/eval.md",
        "data/ref_logps.parquet",
    ):
        assert (ws / path).exists(), path
    assert dvc(ws, "status").stdout.strip().endswith("up to date.")
    split = json.loads((ws / "reports/eval.json").read_text())["preferences"]
    assert split["pairs"] == 4 and set(split["sft"]) == set(split["dpo"]) == set(FIGURES)
    assert 0 <= split["dpo"]["preference_accuracy"] <= 1 and split["sft"]["reward_margin"] == 0.0

    set_params(ws, {"dpo": {"beta": 0.3}})
    dry = dvc(ws, "repro", "--dry")
    assert sorted(ran_stages(dry.stdout)) == ["dpo", "evaluate"]
    ref_before = (ws / "data/ref_logps.parquet").read_bytes()
    again = dvc(ws, "repro")
    assert sorted(ran_stages(again.stdout)) == ["dpo", "evaluate"]
    assert (ws / "data/ref_logps.parquet").read_bytes() == ref_before

    # KTO: the unpaired examples pairs already wrote get their reference log-probs, dpo trains on them
    set_params(ws, {"dpo": {"loss_type": "kto"}, "ref_logps": {"unpaired": True}})
    kto = dvc(ws, "repro")
    assert sorted(ran_stages(kto.stdout)) == ["dpo", "evaluate", "ref_logps"]
    unpaired = read_parquet(ws / "data/unpaired/train.parquet", schema.UNPAIRED)
    ref_unpaired = read_parquet(ws / "data/ref_logps_unpaired.parquet", schema.REF_LOGPS_UNPAIRED)
    assert unpaired and {r["example_id"] for r in unpaired} <= {r["example_id"] for r in ref_unpaired}
    assert all(r["kl_example_id"] != r["example_id"] for r in ref_unpaired)
    logged = json.loads((ws / "reports/dpo/metrics.json").read_text())
    assert "kl" in logged and {"chosen", "rejected"} <= set(logged["rewards"]) & set(logged["logps"])
    assert (ws / "models/dpo/model.safetensors").exists()
    ref_unpaired_before = (ws / "data/ref_logps_unpaired.parquet").read_bytes()
    set_params(ws, {"dpo": {"desirable_weight": 1.33}})
    weighted = dvc(ws, "repro")
    assert sorted(ran_stages(weighted.stdout)) == ["dpo", "evaluate"]
    assert (ws / "data/ref_logps_unpaired.parquet").read_bytes() == ref_unpaired_before
