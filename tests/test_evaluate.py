"""The evaluate stage: metrics on hand-built tables, log-probs against a direct computation, reports, end to end."""

from __future__ import annotations

import json
import math
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet, write_parquet
from alignpipe.artifacts.pairs import encode_pairs
from alignpipe.core.chat import encode_completion
from alignpipe.core.logprobs import load_reference, pair_scores, sequence_logps
from alignpipe.data.builtin import FAMILIES, make_items, primary_family
from alignpipe.evaluate.compare import kl_estimate, pairs_metrics
from alignpipe.evaluate.logps import encode_answers, loaded_scorer, policy_logps
from alignpipe.evaluate.report import (
    eval_metrics,
    md_cell,
    model_summary,
    pass_rates,
    reward_histogram,
    write_reports,
)
from alignpipe.evaluate.results import Answer, Estimate, EvalPrompt, EvalResult, PairsResult
from alignpipe.evaluate.stage import run_evaluate, win_rate
from alignpipe.params import DpoParams, EvaluateParams, RewardParams
from alignpipe.testing import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "Describe the ocean."}]
DPO = DpoParams(max_length=384, max_prompt_length=256, beta=0.5)  # nothing is cut in these tests


def answers(rewards: list[float], model_tokens: int = 5, passed: bool | None = None) -> list[Answer]:
    return [Answer(f"p{i}", 0, f"answer {i}", model_tokens, "stop", r, passed) for i, r in enumerate(rewards)]


# ---- metrics on hand-built tables -----------------------------------------------------------


def test_win_rate_counts_ties_as_half():
    dpo, sft = answers([1.0, 0.5, 0.0, 1.0]), answers([0.0, 0.5, 1.0, 0.5])
    win = win_rate(dpo, sft)
    assert (win.wins, win.ties, win.losses) == (2, 1, 1)
    assert win.rate == pytest.approx((2 + 0.5) / 4)
    assert win_rate(sft, sft).rate == 0.5  # a model against itself: all ties


def test_win_rate_needs_the_same_prompts_and_samples():
    with pytest.raises(ValueError, match="different"):
        win_rate(answers([1.0, 0.0]), answers([1.0]))


def test_pass_rates_per_primary_family():
    families = ["lowercase", "bullets", "lowercase", "arithmetic", None]
    overall, by_family, counts = pass_rates(families, [True, True, False, False, True], FAMILIES)
    assert overall == pytest.approx(3 / 5)
    assert by_family == {"lowercase": 0.5, "bullets": 1.0, "arithmetic": 0.0, "other": 1.0}
    assert list(by_family) == ["lowercase", "bullets", "arithmetic", "other"]  # the task's order, then others
    assert list(pass_rates(families, [True] * 5)[1]) == ["arithmetic", "bullets", "lowercase", "other"]
    assert counts == {"lowercase": 2, "bullets": 1, "arithmetic": 1, "other": 1}


def test_primary_family_is_the_first_constraint():
    meta = json.dumps({"constraints": [{"family": "bullets", "n": 3}, {"family": "no_commas"}], "topic": "x"})
    assert primary_family(meta) == "bullets"
    assert primary_family(None) is None and primary_family("not json") is None


def test_model_summary_pass_rate_is_null_without_the_builtin_reward():
    rows = [Answer("p0", 0, "a", 4, "stop", 1.0, True), Answer("p1", 0, "b", 8, "length", 0.5, False)]
    families = {"p0": "lowercase", "p1": "bullets"}
    builtin = model_summary(rows, families, builtin=True)
    assert builtin["pass_rate"] == 0.5 and builtin["pass_rate_by_family"] == {
        "lowercase": 1.0,
        "bullets": 0.0,
    }
    assert (
        builtin["reward_mean"] == 0.75
        and builtin["length_mean"] == 6.0
        and builtin["finish_length_rate"] == 0.5
    )
    other = model_summary(rows, families, builtin=False)
    assert other["pass_rate"] is None and other["pass_rate_by_family"] is None


def test_kl_estimate_mean_and_stderr_over_prompts():
    """Differences 0.5, 0.5 (prompt a) and -1 (prompt b): prompt means 0.5, -1.

    mean = -0.25; stdev([0.5, -1]) = 1.5 / sqrt(2); stderr = that / sqrt(2) = 0.75.
    """
    est = kl_estimate([-1.0, -2.0, -3.0], [-1.5, -2.5, -2.0], ["a", "a", "b"])
    assert est.mean == pytest.approx(-0.25) and est.stderr == pytest.approx(0.75) and est.n == 3
    assert kl_estimate([-1.0], [-2.0], ["a"]).stderr is None


def test_pairs_accuracy_and_margin_on_hand_built_logps():
    """beta 0.5; margins 0.5 [(-1+1.5) - (-2+1.5)] = 0.5, 0.5 [0 - 0] = 0 (a miss), 0.5 [(-1) - (1)] = -1."""
    t = torch.tensor
    res = pairs_metrics(
        t([-1.0, -2.0, -3.0]), t([-2.0, -2.0, -1.0]), t([-1.5, -2.0, -2.0]), t([-1.5, -2.0, -2.0]), 0.5
    )
    assert res.accuracy == pytest.approx(1 / 3) and res.margin_mean == pytest.approx(-0.5 / 3) and res.n == 3
    noise = pairs_metrics(t([-1.0]), t([-2.0]), t([-1.0]), t([-2.0 + 1e-6]), 0.5)  # margin +5e-7: a tie
    assert noise.accuracy == 0.0
    empty = pairs_metrics(t([]), t([]), t([]), t([]), 0.5)
    assert (empty.accuracy, empty.margin_mean, empty.n) == (None, None, 0)


def test_reward_histogram_bins():
    exact = reward_histogram({"sft": [0.0, 0.5, 0.5], "dpo": [1.0, 1.0, 0.0]})
    table = {(r["model"], r["bin"]): r["count"] for r in exact}
    assert table == {("sft", "0"): 1, ("sft", "0.5"): 2, ("sft", "1"): 0, ("dpo", "0"): 1, ("dpo", "0.5"): 0,
                     ("dpo", "1"): 2}  # fmt: skip
    continuous = reward_histogram({"sft": [i / 10 for i in range(30)], "dpo": [0.0]})
    assert len(continuous) == 2 * 20 and sum(r["count"] for r in continuous if r["model"] == "sft") == 30
    assert [r["count"] for r in continuous if r["model"] == "dpo"][0] == 1  # the minimum lands in bin 0


def test_md_cell_escapes_pipes_newlines_and_html():
    assert md_cell("a | b\nc <d> & e") == "a \\| b<br>c &lt;d&gt; &amp; e"
    assert md_cell("  ") == "*(empty)*"
    assert md_cell('{\n  "a": 1\n}') == '{<br>&nbsp;&nbsp;"a": 1<br>}'


# ---- log-probs through the shared path ------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny_model(root / "sft", seed=0), save_tiny_model(root / "dpo", seed=1)


def direct_logp(model_dir: Path, prompt, completion: str, ended: bool) -> float:
    """log p(completion | prompt) by a full forward and a full log_softmax."""
    from alignpipe.core.models import load_causal_lm, load_tokenizer

    tok, model = (
        load_tokenizer(model_dir),
        load_causal_lm(model_dir, dtype="float32", device=torch.device("cpu")),
    )
    enc = encode_completion(tok, prompt, [{"role": "assistant", "content": completion}])
    target = enc.completion_ids if ended else enc.completion_ids[:-1]  # a cut answer sampled no EOS
    ids = torch.tensor([enc.prompt_ids + target])
    with torch.no_grad():
        logps = model(ids).logits[0].log_softmax(-1)
    p = len(enc.prompt_ids)
    return sum(logps[p - 1 + t, tok_id].item() for t, tok_id in enumerate(target))


def test_sequence_logps_match_a_direct_computation(two_models):
    sft_dir, _ = two_models
    rows = [Answer("p0", 0, "The ocean is vast.", 6, "stop"), Answer("p1", 0, "hello world", 3, "length"),
            Answer("p2", 0, "- one\n- two", 5, "stop")]  # fmt: skip
    with loaded_scorer(sft_dir, "float32") as (tok, scorer):
        seqs = encode_answers(tok, [USER] * 3, rows, 64, 32)
        assert (
            seqs[0].completion_ids[-1] == tok.eos_token_id and seqs[1].completion_ids[-1] != tok.eos_token_id
        )
        got = sequence_logps(scorer, seqs, batch_size=2, pad_token_id=tok.pad_token_id, desc="t").tolist()
    want = [direct_logp(sft_dir, USER, a.completion, a.finish_reason == "stop") for a in rows]
    assert got == pytest.approx(want, abs=1e-4)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory, two_models):
    """Three built-in eval prompts, two eval pairs and their reference log-probs under the sft model."""
    root = tmp_path_factory.mktemp("data")
    items = make_items("eval", 3, 0)
    prompts = [{"prompt_id": it.id, "prompt": [{"role": "user", "content": it.instruction}],
                "meta": json.dumps(it.spec, sort_keys=True)} for it in items]  # fmt: skip
    write_parquet(prompts, root / "eval_prompts.parquet", schema.PROMPTS)
    pairs = [
        {"pair_id": f"pair-{i}", "prompt_id": p["prompt_id"], "prompt": p["prompt"],
         "chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": r}],
         "chosen_reward": 1.0, "rejected_reward": 0.0, "margin": 1.0, "source": "generated"}
        for i, (p, c, r) in enumerate(zip(prompts[:2], ["the ocean is wide", "12"], ["The Ocean, Vast.", "twelve"], strict=True))
    ]  # fmt: skip
    write_parquet(pairs, root / "eval.parquet", schema.PAIRS)
    from alignpipe.core.models import load_tokenizer

    tok = load_tokenizer(two_models[0])
    encoded = encode_pairs(tok, pairs, DPO.max_length, DPO.max_prompt_length, "t")
    scorer = load_reference(two_models[0], "float32", torch.device("cpu"))
    pair_scores(scorer, encoded, 4, tok.pad_token_id).write(root / "ref_logps.parquet")
    return root


def test_kl_is_zero_for_the_same_model_and_matches_a_direct_computation(two_models, eval_data):
    sft_dir, dpo_dir = two_models
    prompts = [EvalPrompt(r["prompt_id"], r["prompt"], r["meta"], None)
               for r in read_parquet(eval_data / "eval_prompts.parquet")]  # fmt: skip
    rows = [
        Answer(p.prompt_id, 0, text, 4, "stop")
        for p, text in zip(prompts, ["a b c", "12", "- x"], strict=True)
    ]
    args = (
        prompts,
        rows,
        eval_data / "eval.parquet",
        eval_data / "ref_logps.parquet",
        EvaluateParams(dtype="float32"),
    )
    same_kl, same_pairs = policy_logps(sft_dir, sft_dir, *args, DPO)
    assert same_kl.mean == 0.0 and same_kl.stderr == 0.0
    # policy == reference: every implicit-reward margin is 0, so no pair counts as accurate
    assert same_pairs == PairsResult(0.0, 0.0, 2)
    kl, pairs = policy_logps(dpo_dir, sft_dir, *args, DPO)
    diffs = [direct_logp(dpo_dir, p.prompt, a.completion, True) - direct_logp(sft_dir, p.prompt, a.completion, True)
             for p, a in zip(prompts, rows, strict=True)]  # fmt: skip
    assert kl.mean == pytest.approx(sum(diffs) / 3, abs=1e-4) and kl.n == 3
    assert pairs.n == 2 and pairs.margin_mean != 0.0


# ---- reports --------------------------------------------------------------------------------


def hand_result(builtin: bool) -> EvalResult:
    prompts = [EvalPrompt("p0", USER, None, "lowercase"), EvalPrompt("p1", USER, None, "bullets")]
    rows = {
        "sft": [Answer("p0", 0, "SFT says | this\nand that", 7, "stop", 0.5, False),
                Answer("p1", 0, "- a", 3, "stop", 1.0, True)],
        "dpo": [Answer("p0", 0, "dpo answer", 5, "length", 1.0, True),
                Answer("p1", 0, "- b", 3, "stop", 1.0, True)],
    }  # fmt: skip
    if not builtin:
        rows = {m: [Answer(a.prompt_id, 0, a.completion, a.n_tokens, a.finish_reason, a.reward) for a in r]
                for m, r in rows.items()}  # fmt: skip
    return EvalResult(
        params=EvaluateParams(n_examples=1), reward_name="builtin" if builtin else "python:m:f", builtin=builtin,
        backend="hf", prompts=prompts, answers=rows, win=win_rate(rows["dpo"], rows["sft"]),
        kl=Estimate(0.25, 0.05, 2), pairs=PairsResult(0.5, 0.1, 2), beta=0.1, seconds={"total": 1.0},
        family_order=FAMILIES,
    )  # fmt: skip


def test_eval_json_keys_and_files(tmp_path):
    result = hand_result(builtin=True)
    metrics = eval_metrics(result)
    write_reports(result, metrics, tmp_path, {})
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == metrics
    for model in ("sft", "dpo"):
        assert {"reward_mean", "pass_rate", "length_mean", "pass_rate_by_family"} <= set(saved[model])
    assert saved["sft"]["pass_rate"] == 0.5 and saved["dpo"]["pass_rate"] == 1.0
    assert saved["win_rate"] == 0.75 and saved["kl"] == 0.25 and saved["pairs_accuracy"] == 0.5
    assert saved["family_counts"] == {"lowercase": 1, "bullets": 1} and "base" not in saved
    for name in ("rewards.csv", "pass_rate.csv", "reward_hist.png", "pass_rate.png", "training_curves.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert (tmp_path / "eval" / "pass_rate.csv").read_text().splitlines() == [
        "family,model,pass_rate,samples", "lowercase,sft,0.0,1", "lowercase,dpo,1.0,1",
        "bullets,sft,1.0,1", "bullets,dpo,1.0,1",
    ]  # fmt: skip


def test_pass_rate_is_null_for_a_non_builtin_reward(tmp_path):
    result = hand_result(builtin=False)
    metrics = eval_metrics(result)
    write_reports(result, metrics, tmp_path, {}, pngs=False)
    assert metrics["sft"]["pass_rate"] is None and metrics["dpo"]["pass_rate"] is None
    assert "family_counts" not in metrics
    assert (tmp_path / "eval" / "pass_rate.csv").read_text() == "family,model,pass_rate,samples\n"


def test_eval_md_has_the_table_plots_and_examples(tmp_path):
    result = hand_result(builtin=True)
    write_reports(result, eval_metrics(result), tmp_path, {}, pngs=False)
    md = (tmp_path / "eval.md").read_text()
    assert "| metric | SFT | DPO |" in md and "| pass rate: lowercase (n=1) | 0.000 | 1.000 |" in md
    assert "| win rate (ties count 1/2) | 0.750 (1 wins, 1 ties, 0 losses) |" in md
    assert "Monte-Carlo estimate of KL(DPO ‖ SFT)" in md and "0.25 ± 0.05" in md
    assert "![Reward distribution](eval/reward_hist.png)" in md
    assert (
        "| SFT says \\| this<br>and that | dpo answer … |" in md
    )  # side by side, escaped; … marks a cut answer
    assert "### p1" not in md  # n_examples = 1


def test_training_curves_read_dvclive_files(tmp_path):
    from alignpipe.evaluate.plots import read_curve

    tsv = tmp_path / "train" / "loss.tsv"
    tsv.parent.mkdir()
    tsv.write_text("timestamp\tstep\tloss\n1\t5\t2.0\n2\t10\t1.5\n")
    assert read_curve(tsv) == ([5.0, 10.0], [2.0, 1.5])
    assert read_curve(tmp_path / "missing.tsv") == ([], [])


# ---- end to end -----------------------------------------------------------------------------


def test_stage_end_to_end_on_the_tiny_model(tmp_path, two_models, eval_data, monkeypatch):
    sft_dir, dpo_dir = two_models
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"].update(backend="hf", max_new_tokens=6, max_prompts=2, include_base=True, n=2, n_examples=2,
                              dtype="float32")  # fmt: skip
    params["dpo"].update(max_length=DPO.max_length, max_prompt_length=DPO.max_prompt_length)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    curves = tmp_path / "dpo_plots"
    (curves / "eval").mkdir(parents=True)
    (curves / "loss.tsv").write_text("step\tloss\n1\t0.69\n2\t0.6\n")
    argv = ["evaluate.py", "--sft", str(sft_dir), "--dpo", str(dpo_dir), "--base", str(sft_dir),
            "--prompts", str(eval_data / "eval_prompts.parquet"), "--pairs", str(eval_data / "eval.parquet"),
            "--ref-logps", str(eval_data / "ref_logps.parquet"), "--out-dir", str(tmp_path / "reports"),
            "--dpo-curves", str(curves), "--params", str(tmp_path / "params.yaml")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "stages" / "evaluate.py"), run_name="__main__")
    saved = json.loads((tmp_path / "reports" / "eval.json").read_text())
    assert saved["prompts"] == 2 and saved["n"] == 2 and saved["kl_samples"] == 4 and saved["pairs"] == 2
    for model in ("base", "sft", "dpo"):
        assert saved[model]["samples"] == 4 and 0 <= saved[model]["pass_rate"] <= 1
        assert 1 <= saved[model]["length_mean"] <= 6
    assert 0 <= saved["win_rate"] <= 1 and saved["wins"] + saved["ties"] + saved["losses"] == 4
    assert math.isfinite(saved["kl"]) and 0 <= saved["pairs_accuracy"] <= 1
    md = (tmp_path / "reports" / "eval.md").read_text()
    assert "| metric | base | SFT | DPO |" in md and md.count("### bi-eval-") == 2


def test_base_model_answers_equal_sft_answers_when_the_folder_is_the_same(two_models, eval_data, tmp_path):
    """Same settings and per-prompt seeds: the same model gives the same answers, so all ties."""
    sft_dir, dpo_dir = two_models
    params = EvaluateParams(backend="hf", max_new_tokens=4, max_prompts=2, dtype="float32", include_base=True)
    metrics = run_evaluate({"sft": sft_dir, "dpo": sft_dir, "base": sft_dir}, eval_data / "eval_prompts.parquet",
                           eval_data / "eval.parquet", eval_data / "ref_logps.parquet", tmp_path, params,
                           RewardParams(), DPO)  # fmt: skip
    assert metrics["ties"] == 2 and metrics["win_rate"] == 0.5 and metrics["kl"] == 0.0
    assert metrics["sft"] == metrics["dpo"] == metrics["base"]


@pytest.mark.slow
def test_dvc_plots_render_from_dvc_yaml(tmp_path):
    """`dvc plots show` accepts the evaluate plots, their templates (configs/plots) and the top-level plots."""
    for name in ("dvc.yaml", "params.yaml", "configs"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / name)
    result = hand_result(builtin=True)
    write_reports(result, eval_metrics(result), tmp_path / "reports", {}, pngs=False)
    for stage, name in (("sft", "train/loss.tsv"), ("dpo", "loss.tsv"), ("dpo", "eval/loss.tsv")):
        path = tmp_path / "reports" / stage / "plots" / "metrics" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("step\tloss\n1\t1.0\n2\t0.5\n")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=tmp_path,
                          capture_output=True, text=True, check=True)  # fmt: skip
    shown = json.loads(proc.stdout)
    mine = (
        "reports/eval/rewards.csv",
        "reports/eval/pass_rate.csv",
        "reports/eval/models.csv",
        "reports/eval/rounds.csv",
        "training_loss",
        "rounds",
    )
    assert not [e for e in shown.get("errors", []) if e["name"] in mine]
    rounds = shown["data"]["rounds"][0]["content"]["data"]["values"]  # SFT (round 0) and round 1's policy
    assert {(v["round"], v["model"]) for v in rounds} == {("0", "sft"), ("1", "dpo")}
    bars = shown["data"]["reports/eval/pass_rate.csv"][0]["content"]
    assert bars["encoding"]["xOffset"]["field"] == "series" and len(bars["data"]["values"]) == 4
    by_model = shown["data"]["reports/eval/models.csv"][0]["content"]["data"]["values"]
    assert {(v["metric"], v["model"]) for v in by_model} >= {("win_rate", "dpo"), ("lc_win_rate", "sft")}
    curves = shown["data"]["training_loss"][0]["content"]
    assert {v["filename"] for v in curves["data"]["values"]} == {
        "sft/plots/metrics/train/loss.tsv", "dpo/plots/metrics/loss.tsv", "dpo/plots/metrics/eval/loss.tsv",
    }  # fmt: skip


def test_the_builtin_verifier_scores_image_prompts_by_their_text():
    """VLM prompts with the built-in verifier: evaluate, like score, gives the verifier the text only
    (before, the images went to it and scoring failed); the rewards equal the text-only run."""
    from alignpipe.evaluate.stage import score_answers
    from alignpipe.testing_vlm import square_png

    items = make_items("eval", 3, 0)
    prompts = [EvalPrompt(it.id, [{"role": "user", "content": it.instruction}], json.dumps(it.spec), it.family)
               for it in items]  # fmt: skip
    answers = {
        "sft": [
            Answer(it.id, 0, text, 3, "stop") for it, text in zip(items, ["12", "ok", "the end"], strict=True)
        ]
    }
    images = {it.id: [square_png((255, 0, 0))] for it in items}
    params = RewardParams(kind="builtin")
    with_images, _ = score_answers(params, prompts, answers, images=images)
    text_only, _ = score_answers(params, prompts, answers)
    assert [a.reward for a in with_images["sft"]] == [a.reward for a in text_only["sft"]]
    assert all(a.passed is not None for a in with_images["sft"])
