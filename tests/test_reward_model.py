"""The reward_model stage: Bradley-Terry loss (parity with TRL), verifier pairs, checks, training with
resume after a kill, the marker when reward.kind is not trained, and the output read by reward.kind hf."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import write_parquet
from alignpipe.data.builtin import verify
from alignpipe.params import RewardModelParams, RewardParams
from alignpipe.prepare import builtin_rows
from alignpipe.reward_model import stage as rm_stage
from alignpipe.reward_model import train as rm_train
from alignpipe.reward_model.checks import calibration, pair_checks, ranks, spearman, verifier_agreement
from alignpipe.reward_model.data import corruptions, held_out, verifier_pairs
from alignpipe.reward_model.stage import MARKER, RewardModelPaths, run
from alignpipe.reward_model.train import bradley_terry_loss, step_batches

# --- the loss -------------------------------------------------------------------------------------


def test_bradley_terry_loss_by_hand():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-1) = log(1 + e)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    assert bradley_terry_loss(c, r).item() == pytest.approx(expected, rel=1e-6)
    m = torch.tensor([1.0, 0.0])  # the first pair now sits at the margin: -log sigmoid(0) = log 2
    assert bradley_terry_loss(c, r, m).item() == pytest.approx((math.log(2) + math.log1p(math.e)) / 2, 1e-6)
    centered = bradley_terry_loss(c, r, center=0.5).item()
    assert centered == pytest.approx(expected + 0.5 * (9 + 1) / 2, rel=1e-6)


def trl_reward_loss(logits: torch.Tensor, margin: torch.Tensor | None, center: float | None) -> torch.Tensor:
    """TRL's own ``RewardTrainer.compute_loss`` (TRL 1.16) on a stub trainer whose model returns ``logits``."""
    reward_trainer = pytest.importorskip("trl.trainer.reward_trainer")
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(center_rewards_coefficient=center),
        accelerator=SimpleNamespace(gather_for_metrics=lambda t: t, gather=lambda t: t),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(len(logits), 3, dtype=torch.long),
        "attention_mask": torch.ones(len(logits), 3),
    }
    if margin is not None:
        inputs["margin"] = margin
    model = lambda **_: SimpleNamespace(logits=logits[:, None])  # noqa: E731
    return reward_trainer.RewardTrainer.compute_loss(stub, model, inputs)


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_loss_equals_trl_reward_trainer_on_fixed_logits(with_margin, center):
    torch.manual_seed(0)
    logits = torch.randn(8, dtype=torch.float64) * 3  # chosen rows first, as TRL's collator lays them out
    margin = torch.rand(4, dtype=torch.float64) if with_margin else None
    ours = bradley_terry_loss(logits[:4], logits[4:], margin, center)
    theirs = trl_reward_loss(logits, margin, center)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


# --- pairs ----------------------------------------------------------------------------------------


def test_verifier_pairs_prefer_the_demonstration_by_the_verifier_gap():
    rows = builtin_rows("sft", 40, 0)
    params = RewardModelParams(max_pairs_per_prompt=3)
    pairs, samples = verifier_pairs(rows, params)
    specs = {r["id"]: json.loads(r["meta"]) for r in rows}
    assert len(pairs) >= 2 * len(rows)  # the corruptions break every family often enough
    per_prompt = defaultdict(int)
    for p in pairs:
        spec = specs[p.prompt_id]
        c, r = verify(spec, p.chosen[0]["content"]).score, verify(spec, p.rejected[0]["content"]).score
        assert c > r and p.margin == pytest.approx(c - r)
        per_prompt[p.prompt_id] += 1
    assert max(per_prompt.values()) <= 3
    demos = [s for s in samples if s.completion[0]["content"] == next(
        r["completion"][0]["content"] for r in rows if r["id"] == s.prompt_id)]  # fmt: skip
    assert len(demos) == len(rows) and all(s.score == 1.0 for s in demos)  # demonstrations pass


def test_corruptions_break_the_constraint_they_aim_at():
    spec = {"constraints": [{"family": "lowercase"}]}
    assert corruptions("all lowercase here.", spec)[0] == "ALL LOWERCASE HERE."
    assert "," in corruptions("no commas at all", spec)[1]


def test_held_out_split_is_seeded_and_never_empty_or_everything():
    ids = {f"p{i}" for i in range(10)}
    assert held_out(ids, 0.2, 0) == held_out(ids, 0.2, 0) and len(held_out(ids, 0.2, 0)) == 2
    assert len(held_out({"a", "b"}, 0.9, 0)) == 1


def test_step_batches_cover_each_epoch_once_and_max_steps_cuts_or_repeats():
    p = RewardModelParams(batch_size=2, grad_accum=2, epochs=2)
    steps = step_batches(10, p)
    flat = [i for s in steps for m in s for i in m]
    assert len(steps) == 6 and sorted(flat) == sorted(list(range(10)) * 2)
    assert step_batches(10, p) == steps  # seeded
    assert len(step_batches(10, RewardModelParams(batch_size=2, max_steps=7))) == 7  # past one epoch


# --- checks ---------------------------------------------------------------------------------------


def test_pair_checks_and_calibration_by_hand():
    assert pair_checks([1.0, 0.0, 2.0, 1.0], [0.0, 1.0, 2.0, -1.0]) == {
        "pairs": 4, "accuracy": 0.625, "mean_margin": 0.5}  # fmt: skip
    rows = calibration([0.1, -0.2, 3.0, 4.0], bins=2)
    assert [r["pairs"] for r in rows] == [2, 2]
    assert rows[0]["fraction_correct"] == 0.5 and rows[1]["fraction_correct"] == 1.0
    assert rows[1]["abs_diff"] == 3.5
    assert rows[1]["predicted"] == pytest.approx((1 / (1 + math.exp(-3)) + 1 / (1 + math.exp(-4))) / 2, 1e-3)


def test_spearman_and_pairwise_agreement():
    assert ranks([3.0, 1.0, 1.0, 2.0]) == [4.0, 1.5, 1.5, 3.0]
    assert spearman([1, 2, 3], [10, 20, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    got = verifier_agreement(["a", "a", "a", "b", "b"], [1.0, 0.5, 0.0, 1.0, 0.0], [3.0, 1.0, 2.0, 0.0, 1.0])
    # prompt a: (1>0.5 ok) (1>0 ok) (0.5>0 wrong); prompt b: (1>0 wrong) -> 2 of 4
    assert got["pairwise_pairs"] == 4 and got["pairwise_accuracy"] == 0.5


# --- the stage on a tiny model --------------------------------------------------------------------


def _paths(tmp_path, model_dir, n_sft=24):
    prepared = tmp_path / "prepared"
    write_parquet(builtin_rows("sft", n_sft, 0), prepared / "sft.parquet", schema.SFT)
    return RewardModelPaths(
        sft=model_dir, base=model_dir, prepared=prepared, out=tmp_path / "reward",
        checkpoints=tmp_path / "ckpt", metrics_dir=tmp_path / "reports" / "reward_model",
        report=tmp_path / "reports" / "reward_model.json",
    )  # fmt: skip


TINY = dict(batch_size=4, max_steps=4, save_steps=2, logging_steps=1, learning_rate=1e-3, max_length=128)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_trains_writes_a_reward_model_that_hf_loads_and_resumes_after_a_kill(
    tmp_path, tiny_model_dir, monkeypatch
):
    from transformers import AutoModelForSequenceClassification

    from alignpipe.rewards.load import get_reward

    params = RewardModelParams(**TINY)
    whole = _paths(tmp_path / "whole", tiny_model_dir)
    summary = run(params, whole)
    assert summary["trained"] and summary["steps"] == 4 and summary["pairs_source"] == "verifier"
    report = json.loads(whole.report.read_text())
    assert 0.0 <= report["heldout"]["accuracy"] <= 1.0 and report["heldout"]["pairs"] > 0
    assert report["verifier_agreement"]["samples"] > 0 and report["calibration"]
    assert (whole.metrics_dir / "calibration.csv").read_text().startswith("bin,abs_diff,predicted")
    assert (whole.metrics_dir / "plots" / "metrics" / "train" / "loss.tsv").exists()
    model = AutoModelForSequenceClassification.from_pretrained(str(whole.out))
    assert model.config.num_labels == 1
    reward = get_reward(RewardParams(kind="trained"), whole.out)
    prompt = [{"role": "user", "content": "Describe the ocean."}]
    a, b = reward.score([prompt, prompt], ["the sea is wide.", "THE SEA, IS WIDE."], [None, None])
    assert math.isfinite(a.reward) and a.reward != b.reward

    # killed after the checkpoint of step 2, then rerun: resumes at step 2 and ends as the whole run
    killed = _paths(tmp_path / "killed", tiny_model_dir)
    real_step = rm_train.train_step

    def dies_at_step_3(run_, step, micros):
        if step == 2:
            raise KeyboardInterrupt("killed")
        return real_step(run_, step, micros)

    monkeypatch.setattr(rm_train, "train_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(params, killed)
    assert (killed.checkpoints / "step-2").is_dir() and not killed.out.exists()
    monkeypatch.setattr(rm_train, "train_step", real_step)
    resumed = run(params, killed)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    a, b = _weights(whole.out), _weights(killed.out)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # a changed param leaves the checkpoint stale: a fresh start
    fresh = run(RewardModelParams(**{**TINY, "learning_rate": 2e-3}), killed)
    assert fresh["resumed_from_step"] is None


def test_lora_reward_model_merges_with_its_trained_head(tmp_path, tiny_model_dir):
    from alignpipe.rewards.hf import load_reward_model

    params = RewardModelParams(**{**TINY, "max_steps": 2, "peft": {"enabled": True, "r": 4, "alpha": 8}})
    paths = _paths(tmp_path, tiny_model_dir, n_sft=12)
    run(params, paths)
    model = load_reward_model(str(paths.out), torch.float32)  # refuses missing weights (a random head)
    assert model.config.num_labels == 1 and (paths.out / "adapter").is_dir()
    assert not any("lora" in k for k in _weights(paths.out))


def test_not_trained_writes_a_constant_marker(tmp_path, tiny_model_dir):
    paths = _paths(tmp_path, tiny_model_dir, n_sft=4)
    assert run(RewardModelParams(), paths, reward_kind="builtin") == {
        "trained": False,
        "reward_kind": "builtin",
    }
    first = (paths.out / MARKER).read_bytes()
    run(RewardModelParams(learning_rate=1.0), paths, reward_kind="python")
    assert (
        sorted(p.name for p in paths.out.iterdir()) == [MARKER] and (paths.out / MARKER).read_bytes() == first
    )
    assert not rm_stage.CALIBRATION.startswith("/")


# --- end to end -----------------------------------------------------------------------------------

TRAINED_PIPELINE = {
    "data": {"builtin": {"n_sft": 16, "n_prompts": 12, "n_eval": 6}},
    "sft": {"batch_size": 4, "save_steps": 2},
    "reward_model": {"batch_size": 4, "max_steps": 4, "save_steps": 2, "max_length": 128},
    "generate": {"n": 4, "max_new_tokens": 8, "chunk_prompts": 4},
    "reward": {"kind": "trained", "max_length": 128},
    "pairs": {"allow_truncated": True, "eval_fraction": 0.25, "drop_ties": False, "max_similarity": 1.0},
    "dpo": {"batch_size": 4, "eval_steps": 2, "save_steps": 2, "max_length": 64, "max_prompt_length": 48},
    "evaluate": {"max_new_tokens": 8, "n_examples": 2},
}


@pytest.mark.slow
def test_dvc_repro_with_a_trained_reward_model_then_a_reward_model_param_reruns_only_downstream(
    tmp_path, tiny_model_dir
):
    from workspace import dvc, make_workspace, ran_stages, set_params

    from alignpipe.training.fingerprint import sha256_tree

    ws = make_workspace(tmp_path / "ws", {"base_model": {"source": str(tiny_model_dir)}, **TRAINED_PIPELINE})
    first = dvc(ws, "repro")
    assert "reward_model" in ran_stages(first.stdout) and "evaluate" in ran_stages(first.stdout)
    report = json.loads((ws / "reports/reward_model.json").read_text())
    assert (
        report["trained"]
        and report["pairs_source"] == "verifier"
        and "spearman" in report["verifier_agreement"]
    )
    scored = json.loads((ws / "reports/score.json").read_text())
    assert scored["reward"] == "hf:models/reward"
    assert scored["reward_hash"] == sha256_tree(ws / "models/reward")
    pairs = json.loads((ws / "reports/pairs.json").read_text())
    assert (pairs["reward_name"], pairs["reward_hash"]) == (scored["reward"], scored["reward_hash"])
    evaluated = json.loads((ws / "reports/eval.json").read_text())
    assert "builtin" in json.dumps(evaluated)  # built-in prompts: the answers are judged by the verifier

    set_params(ws, {"reward_model": {"learning_rate": 1e-3}})
    again = dvc(ws, "repro")
    ran = set(ran_stages(again.stdout))
    assert (
        {"reward_model", "score"} <= ran <= {"reward_model", "score", "pairs", "ref_logps", "dpo", "evaluate"}
    )
    assert json.loads((ws / "reports/score.json").read_text())["reward_hash"] != scored["reward_hash"]


@pytest.mark.slow
def test_with_another_reward_kind_a_reward_model_param_reruns_only_the_marker(tmp_path, tiny_model_dir):
    from workspace import dvc, make_workspace, ran_stages, set_params

    overrides = {**TRAINED_PIPELINE, "reward": {"kind": "builtin"}}
    ws = make_workspace(tmp_path / "ws", {"base_model": {"source": str(tiny_model_dir)}, **overrides})
    dvc(ws, "repro", "score")
    assert json.loads((ws / "reports/reward_model.json").read_text())["trained"] is False
    set_params(ws, {"reward_model": {"learning_rate": 1e-3}})
    assert ran_stages(dvc(ws, "repro", "score").stdout) == ["reward_model"]
