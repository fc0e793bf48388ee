"""evaluate on tiny models: the forgetting NLL (identity and a direct computation), the new eval.json keys,
models.csv, and the gate failing and passing the stage script (exit code and its one line)."""

# ruff: noqa: F811 - the fixtures imported from test_evaluate are arguments here
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_evaluate import DPO, direct_logp, eval_data, two_models  # noqa: F401 - fixtures
from workspace import env

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import write_parquet
from alignpipe.evaluate.signals import forgetting
from alignpipe.params import EvaluateParams, RewardParams
from alignpipe.prepare import builtin_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("prepared") / "sft.parquet"
    write_parquet(builtin_rows("sft", 5, 0), path, schema.SFT)
    return path


def test_forgetting_is_zero_for_the_sft_model_and_matches_a_direct_nll(two_models, sft_data):
    """The same folder twice gives the same NLL (delta 0); the other model's NLL per token is
    -(sum of direct log-probs of the first 3 demonstrations) / (their completion tokens, EOS included)."""
    from alignpipe.core.chat import encode_completion
    from alignpipe.core.models import load_tokenizer

    sft_dir, dpo_dir = two_models
    params = EvaluateParams(dtype="float32", forgetting_rows=3)
    nll = forgetting({"sft": sft_dir, "dpo": sft_dir, "other": dpo_dir}, sft_data, params, DPO)
    assert nll["sft"].nll == nll["dpo"].nll and nll["sft"].rows == 3
    rows = builtin_rows("sft", 5, 0)[:3]
    tok = load_tokenizer(dpo_dir)
    tokens = sum(len(encode_completion(tok, r["prompt"], r["completion"]).completion_ids) for r in rows)
    direct = sum(direct_logp(dpo_dir, r["prompt"], r["completion"][0]["content"], True) for r in rows)
    assert nll["other"].tokens == tokens and nll["other"].nll == pytest.approx(-direct / tokens, abs=1e-5)
    assert forgetting({"sft": sft_dir}, sft_data, EvaluateParams(forgetting_rows=0), DPO) == {}


def stage(tmp_path: Path, sft_dir: Path, dpo_dir: Path, data: Path, sft_data: Path, gate: dict) -> tuple:
    """Run stages/evaluate.py as dvc would, on 2 prompts x 2 samples; (process, eval.json or None)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"].update(backend="hf", max_new_tokens=6, max_prompts=2, n=2, n_examples=2, dtype="float32",
                              bootstrap_resamples=200, forgetting_rows=2, gate=gate)  # fmt: skip
    params["dpo"].update(max_length=DPO.max_length, max_prompt_length=DPO.max_prompt_length)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = [sys.executable, str(ROOT / "stages" / "evaluate.py"), "--sft", str(sft_dir), "--dpo", str(dpo_dir),
            "--base", str(sft_dir), "--prompts", str(data / "eval_prompts.parquet"),
            "--pairs", str(data / "eval.parquet"), "--ref-logps", str(data / "ref_logps.parquet"),
            "--out-dir", str(tmp_path / "reports"), "--sft-data", str(sft_data),
            "--params", str(tmp_path / "params.yaml")]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=600)
    saved = tmp_path / "reports" / "eval.json"
    return proc, json.loads(saved.read_text()) if saved.exists() else None


def test_a_failing_gate_writes_every_report_then_exits_1_with_one_line(
    tmp_path, two_models, eval_data, sft_data
):
    """A win-rate lower bound of 1.0 is not met: the random tiny models fail every built-in check, so their
    answers tie (win rate 0.5, interval [0.5, 0.5])."""
    proc, saved = stage(
        tmp_path, *two_models, eval_data, sft_data, {"min_win_rate_lower": 1.0, "max_kl": 1e6}
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    low = saved["win_rate_ci"][0]
    assert low < 1.0
    assert last == (f"error: evaluate.gate failed: win_rate_ci low {low:.3f} < min_win_rate_lower 1.0 "
                    f"(win_rate {saved['win_rate']:.3f} [{low:.3f}, {saved['win_rate_ci'][1]:.3f}])")  # fmt: skip
    assert saved["gate"]["passed"] is False and [c["passed"] for c in saved["gate"]["checks"]] == [
        False,
        True,
    ]
    reports = tmp_path / "reports"
    assert "## Gate: **FAILED**" in (reports / "eval.md").read_text()
    for name in ("rewards.csv", "pass_rate.csv", "models.csv", "reward_hist.png", "pass_rate.png"):
        assert (reports / "eval" / name).stat().st_size > 0


def test_a_passing_gate_exits_0_and_reports_the_new_keys(tmp_path, two_models, eval_data, sft_data):
    proc, saved = stage(tmp_path, *two_models, eval_data, sft_data, {"min_win_rate_lower": 0.0, "max_kl": 1e6,
                                                                      "max_family_regression": 100})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert saved["gate"]["passed"] and len(saved["gate"]["checks"]) == 3
    assert saved["bootstrap"] == {"resamples": 200, "seed": 1234, "level": 0.95, "unit": "prompt"}
    assert saved["demo_rows"] == 2
    for key in ("win_rate_ci", "lc_win_rate", "lc_win_rate_ci", "pass_rate_diff", "pass_rate_diff_ci"):
        assert saved[key] == saved["dpo"][key]
    low, high = saved["win_rate_ci"]
    assert low <= saved["win_rate"] <= high and saved["dpo"]["win_rate"] == saved["win_rate"]
    assert saved["sft"]["win_rate"] == 0.5 and saved["sft"]["win_rate_ci"] == [0.5, 0.5]
    assert saved["sft"]["demo_nll_delta"] == 0.0 and saved["dpo"]["demo_nll"] > 0
    assert saved["dpo"]["demo_nll_delta"] == pytest.approx(
        saved["dpo"]["demo_nll"] - saved["sft"]["demo_nll"], abs=2e-4
    )
    for model in ("sft", "dpo"):
        assert 0 <= saved[model]["distinct_2"] <= 1 and 0 <= saved[model]["repeated_3gram_rate"] <= 1
    with (tmp_path / "reports" / "eval" / "models.csv").open() as f:
        rows = list(csv.DictReader(f))
    win = next(r for r in rows if r["metric"] == "win_rate" and r["model"] == "dpo")
    assert [float(win[k]) for k in ("value", "low", "high")] == [saved["win_rate"], low, high]
    md = (tmp_path / "reports" / "eval.md").read_text()
    assert f"| win rate (ties 1/2) | {saved['win_rate']:.3f} [{low:.3f}, {high:.3f}] |" in md
    assert "## Gate: passed" in md and "NLL change vs SFT (forgetting) | +0.0000 |" in md


def test_the_report_only_default_never_fails(two_models, eval_data, tmp_path):
    """Every threshold null: nothing is checked, whatever the figures (two unrelated random models here)."""
    from alignpipe.evaluate.stage import run_evaluate

    sft_dir, dpo_dir = two_models
    params = EvaluateParams(backend="hf", max_new_tokens=4, max_prompts=2, dtype="float32")
    metrics = run_evaluate({"sft": sft_dir, "dpo": dpo_dir}, eval_data / "eval_prompts.parquet",
                           eval_data / "eval.parquet", eval_data / "ref_logps.parquet", tmp_path, params,
                           RewardParams(), DPO)  # fmt: skip
    assert metrics["gate"] == {"passed": True, "checks": []}
    assert metrics["demo_rows"] == 0 and metrics["dpo"]["demo_nll"] is None  # no --sft-data: not measured
    assert "Gate: report only" in (tmp_path / "eval.md").read_text()
