"""KTO end to end on the tiny model (fp32, CPU): reference log-probs of unpaired examples and their KL
mismatches, and the dpo stage training with ``dpo.loss_type: kto`` (metrics, resume, LoRA, evaluate)."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from faults import kill_at
from safetensors.torch import load_file

import alignpipe.dpo.kto as kto_module
from alignpipe.artifacts import schema
from alignpipe.artifacts.io import ArtifactError, read_parquet, write_parquet
from alignpipe.artifacts.pairs import PairDataError
from alignpipe.artifacts.unpaired import UnpairedScores, kl_partners
from alignpipe.core.chat import encode_completion
from alignpipe.core.logprobs import load_reference, sequence_logps, shares_prompt
from alignpipe.core.models import load_tokenizer
from alignpipe.dpo.stage import run_dpo
from alignpipe.params import (
    DpoParams,
    EvaluateParams,
    Params,
    ParamsError,
    RefLogpsParams,
    RewardParams,
    validate,
)
from alignpipe.ref_logps import RefLogpsPaths, RefLogpsSettings, run_ref_logps
from alignpipe.ref_logps import run as run_ref_logps_stage
from alignpipe.testing import pair_row, unpaired_row

LENGTHS = {"max_length": 64, "max_prompt_length": 32}


def write_data(root: Path, n_train: int = 8, n_eval: int = 4) -> None:
    write_parquet([pair_row(i, "t") for i in range(4)], root / "pairs" / "train.parquet", schema.PAIRS)
    rows = [unpaired_row(i, prefix="t") for i in range(n_train)]
    write_parquet(rows, root / "unpaired" / "train.parquet", schema.UNPAIRED)
    if n_eval:
        rows = [unpaired_row(i, prefix="e", prompt_id=f"e{i // 2}") for i in range(n_eval)]
        write_parquet(rows, root / "unpaired" / "eval.parquet", schema.UNPAIRED)


def ref_logps(model: Path, root: Path, batch_size: int = 3) -> Path:
    out = root / "ref_logps_unpaired.parquet"
    params = RefLogpsParams(batch_size=batch_size, dtype="float32")
    run_ref_logps(
        model, root / "pairs", root / "ref.parquet", params, **LENGTHS, unpaired=(root / "unpaired", out)
    )
    return out


def test_kl_partners_are_another_prompt_and_independent_of_file_order():
    rows = [unpaired_row(i) for i in range(10)]
    partner = kl_partners(rows, "t")
    assert all(rows[j]["prompt_id"] != rows[i]["prompt_id"] for i, j in enumerate(partner))
    assert len(set(partner)) > 2  # the mismatches spread over the examples, not one completion for all
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    again = kl_partners(shuffled, "t")
    assert {r["example_id"]: shuffled[j]["example_id"] for r, j in zip(shuffled, again, strict=True)} == {
        rows[i]["example_id"]: rows[j]["example_id"] for i, j in enumerate(partner)
    }
    with pytest.raises(PairDataError, match="at least two prompts"):
        kl_partners([unpaired_row(i, prompt_id="same") for i in range(3)], "f.parquet")


def test_ref_logps_of_examples_and_kl_mismatches_equal_separate_sequences(tiny_model_dir, tmp_path):
    """The shared-prompt pair path gives each example's and its mismatch's log-prob as if scored alone."""
    write_data(tmp_path)
    scores = UnpairedScores.read(ref_logps(tiny_model_dir, tmp_path))
    train = read_parquet(tmp_path / "unpaired" / "train.parquet", schema.UNPAIRED)
    evals = read_parquet(tmp_path / "unpaired" / "eval.parquet", schema.UNPAIRED)
    assert scores.example_ids == [r["example_id"] for r in train + evals]
    tokenizer = load_tokenizer(tiny_model_dir)
    by_id = {r["example_id"]: r for r in train + evals}
    seqs, kl_seqs = [], []
    for eid, kl_id in zip(scores.example_ids, scores.kl_ids, strict=True):
        row, other = by_id[eid], by_id[kl_id]
        assert other["prompt_id"] != row["prompt_id"]
        assert (eid[0], kl_id[0]) in {("t", "t"), ("e", "e")}  # mismatches stay within their split
        seqs.append(encode_completion(tokenizer, row["prompt"], row["completion"], **LENGTHS))
        kl_seqs.append(encode_completion(tokenizer, row["prompt"], other["completion"], **LENGTHS))
    scorer = load_reference(tiny_model_dir, "float32", torch.device("cpu"))
    assert shares_prompt(scorer)  # so ref_logps ran [prompt][completion][KL completion] rows
    alone = sequence_logps(scorer, seqs, 4, tokenizer.pad_token_id)
    kl_alone = sequence_logps(scorer, kl_seqs, 4, tokenizer.pad_token_id)
    torch.testing.assert_close(scores.logps, alone, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores.kl_logps, kl_alone, atol=1e-4, rtol=0)
    assert scores.tokens.tolist() == [len(s.completion_ids) for s in seqs]
    assert scores.kl_tokens.tolist() == [len(s.completion_ids) for s in kl_seqs]
    assert (scores.logps < 0).all() and not torch.equal(scores.logps, scores.kl_logps)


def test_ref_logps_without_unpaired_examples_writes_an_empty_file(tiny_model_dir, tmp_path):
    write_parquet([pair_row(i, "t") for i in range(4)], tmp_path / "pairs" / "train.parquet", schema.PAIRS)
    out = ref_logps(tiny_model_dir, tmp_path)  # no tmp_path/unpaired folder
    assert read_parquet(out, schema.REF_LOGPS_UNPAIRED) == []
    assert len(UnpairedScores.read(out)) == 0


@pytest.mark.parametrize("on", [False, True])
def test_the_stage_scores_data_unpaired_only_with_ref_logps_unpaired(tiny_model_dir, tmp_path, on):
    write_data(tmp_path, 4, 0)
    settings = RefLogpsSettings(RefLogpsParams(dtype="float32", unpaired=on), DpoParams(**LENGTHS))
    out = tmp_path / "out.parquet"
    paths = RefLogpsPaths(
        tiny_model_dir, tmp_path / "pairs", tmp_path / "ref.parquet", None, tmp_path / "unpaired", out
    )
    summary = run_ref_logps_stage(settings, paths)
    assert len(UnpairedScores.read(out)) == (4 if on else 0)
    assert summary.get("unpaired_examples") == (4 if on else None)


# --- training -----------------------------------------------------------------------------------

N_TRAIN = 8  # 4 prompts x 2: labels alternate, 4 desirable and 4 undesirable


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("kto")
    write_data(root, N_TRAIN, 4)
    ref = ref_logps(tiny_model_dir, root)
    return SimpleNamespace(root=root, model=tiny_model_dir, ref=ref)


def train(env, tmp_path: Path, name: str, **overrides) -> tuple[dict, Path]:
    settings = dict(
        LENGTHS, loss_type="kto", batch_size=4, learning_rate=1e-3, lr_scheduler="constant", dtype="float32",
        logging_steps=1, eval_steps=100, save_steps=100, max_steps=2,
    )  # fmt: skip
    params = DpoParams(**{**settings, **overrides})
    run = tmp_path / name
    summary = run_dpo(
        env.model, env.root / "pairs", env.root / "ref.parquet", run / "models" / "dpo", run / "checkpoints",
        run / "reports", params, unpaired=(env.root / "unpaired", env.ref),
    )  # fmt: skip
    return summary, run


def history(run: Path, metric: str) -> list[float]:
    with (run / "reports" / "plots" / "metrics" / f"{metric}.tsv").open() as f:
        return [float(row[metric.split("/")[-1]]) for row in csv.DictReader(f, delimiter="\t")]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "models" / "dpo" / "model.safetensors"))


def test_first_step_at_policy_equal_reference_and_trl_metric_names(env, tmp_path):
    """Step 1: every log-ratio and the KL point are 0, so the loss is half the mean weight; then the
    desirable rewards rise above the undesirable ones."""
    summary, run = train(env, tmp_path, "a", max_steps=6, batch_size=8, eval_steps=6,
                         desirable_weight=1.5, undesirable_weight=0.5)  # fmt: skip
    assert history(run, "loss")[0] == pytest.approx(0.5 * (1.5 * 4 + 0.5 * 4) / 8, abs=1e-6)
    assert history(run, "kl")[0] == pytest.approx(0.0, abs=1e-6)
    assert history(run, "rewards/chosen")[0] == pytest.approx(0.0, abs=1e-5)
    ref = UnpairedScores.read(env.ref)
    labels = [r["label"] for r in read_parquet(env.root / "unpaired" / "train.parquet", schema.UNPAIRED)]
    desirable = [v for v, lab in zip(ref.logps[:N_TRAIN].tolist(), labels, strict=True) if lab]
    assert history(run, "logps/chosen")[0] == pytest.approx(sum(desirable) / len(desirable), abs=1e-4)
    metrics = json.loads((run / "reports" / "metrics.json").read_text())
    assert {"loss", "kl", "rewards", "logps", "grad_norm", "examples_per_s", "tokens_per_s"} <= set(metrics)
    assert set(metrics["rewards"]) == {"chosen", "rejected", "margins"}
    assert set(metrics["eval"]) == {"loss", "kl", "rewards", "logps"}
    assert metrics["rewards"]["margins"] > 0 and metrics["eval"]["rewards"]["margins"] > 0  # it learned
    assert summary["train_examples"] == N_TRAIN and summary["steps"] == 6


def test_precomputed_and_live_reference_give_the_same_losses(env, tmp_path):
    _, pre = train(env, tmp_path, "pre", max_steps=3)
    _, live = train(env, tmp_path, "live", max_steps=3, reference="live")
    for metric in ("loss", "kl"):
        torch.testing.assert_close(torch.tensor(history(pre, metric)), torch.tensor(history(live, metric)),
                                   atol=1e-5, rtol=0)  # fmt: skip
    assert history(pre, "kl")[-1] > 0  # the KL point moved off 0 as the policy moved


@pytest.mark.parametrize(
    "peft", [{}, {"enabled": True, "r": 2, "dropout": 0.5}], ids=["full", "lora-dropout"]
)
def test_resume_after_a_kill_ends_at_the_same_weights(env, tmp_path, monkeypatch, peft):
    schedule = dict(max_steps=5, save_steps=2, lr_scheduler="cosine", warmup_ratio=0.2, peft=peft)
    _, whole = train(env, tmp_path, "whole", **schedule)
    with monkeypatch.context() as m:
        kill_at(m, kto_module, 4)
        with pytest.raises(KeyboardInterrupt):
            train(env, tmp_path, "resumed", **schedule)
    summary, resumed = train(env, tmp_path, "resumed", **schedule)
    assert summary["resumed_from"] == 2
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history(resumed, "loss") == history(whole, "loss")
    if peft:
        assert (resumed / "models" / "dpo" / "adapter" / "adapter_config.json").exists()


def test_apo_zero_unpaired_trains_without_a_kl_point(env, tmp_path):
    _, run = train(env, tmp_path, "apo", loss_type="apo_zero_unpaired", max_steps=2)
    assert history(run, "loss")[0] == pytest.approx(0.5, abs=1e-6)  # 1 - sig(0) and sig(0)
    assert history(run, "kl") == [0.0, 0.0]


def test_stale_or_missing_reference_log_probs_fail_with_one_line(env, tmp_path):
    with pytest.raises(ArtifactError, match="no reference log-probs for example 't0'"):
        UnpairedScores.empty().write(tmp_path / "empty.parquet")
        run_dpo(env.model, env.root / "pairs", env.root / "ref.parquet", tmp_path / "o", tmp_path / "c",
                tmp_path / "r", DpoParams(**LENGTHS, loss_type="kto", dtype="float32"),
                unpaired=(env.root / "unpaired", tmp_path / "empty.parquet"))  # fmt: skip


@pytest.mark.parametrize(
    ("dpo", "match"),
    [
        ({"loss_type": ["kto", "sigmoid"]}, "kto is an unpaired loss .* name it alone"),
        ({"loss_type": ["sigmoid", "apo_zero_unpaired"]}, "apo_zero_unpaired is an unpaired loss"),
        ({"loss_type": "sigmoid", "desirable_weight": 2.0}, "read by kto and apo_zero_unpaired"),
        ({"loss_type": "kto", "wpo": True}, "dpo.wpo is for pair losses"),
        ({"loss_type": "kto", "rpo_alpha": 1.0}, "dpo.rpo_alpha is for pair losses"),
        ({"loss_type": "kto", "desirable_weight": 0.0, "undesirable_weight": 0.0}, "both 0"),
        ({"loss_type": "kto", "label_smoothing": 0.1}, "not read by loss_type"),
    ],
)
def test_params_refuse_what_kto_does_not_read(dpo, match):
    with pytest.raises(ParamsError, match=match):
        validate(Params, {"dpo": dpo})


def test_params_accept_kto_with_weights():
    kto = {
        "dpo": {"loss_type": "kto", "desirable_weight": 1.33, "reference": "live"},
        "ref_logps": {"unpaired": True},
    }
    p = validate(Params, kto).dpo
    assert p.unpaired and p.desirable_weight == 1.33
    assert not validate(Params, {"dpo": {"loss_type": ["sigmoid", "sft"]}}).dpo.unpaired
    with pytest.raises(ParamsError, match="kto trains on unpaired examples: set ref_logps.unpaired: true"):
        validate(Params, {"dpo": {"loss_type": "kto"}})


def test_two_processes_equal_one_at_the_same_global_batch(tmp_path, tiny_model_dir):
    """accelerate launch, 2 CPU processes (gloo) of 4 examples against 1 of 8: the KL point is the mean
    over both processes' mismatched pairs, so losses, KL points and weights agree (tolerance as
    tests/test_multiprocess.py: rounding of the gradient all-reduce)."""
    from launch import run_stage, tsv

    write_data(tmp_path, 16, 4)
    ref = ref_logps(tiny_model_dir, tmp_path)
    section = dict(LENGTHS, loss_type="kto", learning_rate=1e-3, lr_scheduler="constant", dtype="float32",
                   logging_steps=1, eval_steps=3, save_steps=100, max_steps=3, gradient_checkpointing=False,
                   desirable_weight=1.2)  # fmt: skip
    runs = {}
    for nproc in (1, 2):
        run = tmp_path / f"run-{nproc}"
        paths = {"model": tiny_model_dir, "pairs": tmp_path / "pairs", "ref_logps": tmp_path / "ref.parquet",
                 "unpaired": tmp_path / "unpaired", "ref_logps_unpaired": ref, "out": run / "out",
                 "checkpoints": run / "ckpt", "metrics_dir": run / "reports"}  # fmt: skip
        params = {"dpo": {**section, "batch_size": 8 // nproc}, "ref_logps": {"unpaired": True}}
        run_stage(run, "dpo", params, paths, nproc)
        runs[nproc] = run
    for key in ("loss", "kl", "grad_norm", "rewards/chosen", "rewards/rejected"):
        one, two = (tsv(runs[n] / "reports/plots/metrics" / f"{key}.tsv") for n in (1, 2))
        assert two == pytest.approx(one, rel=1e-5, abs=1e-7), key
    kl = tsv(runs[1] / "reports/plots/metrics/kl.tsv")
    assert kl[0] == 0.0 and kl[-1] > 1e-4  # the comparison covers a KL point off its clamp
    m1, m2 = (json.loads((runs[n] / "reports" / "metrics.json").read_text()) for n in (1, 2))
    assert m2["eval"]["loss"] == pytest.approx(m1["eval"]["loss"], rel=1e-5)
    assert m2["eval"]["kl"] == pytest.approx(m1["eval"]["kl"], rel=1e-5, abs=1e-7)
    w1, w2 = (load_file(str(runs[n] / "out" / "model.safetensors")) for n in (1, 2))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-5


def test_evaluate_runs_on_a_kto_policy(env, tmp_path):
    """evaluate reads data/pairs/eval for implicit-reward accuracy whatever the loss; the KTO run's
    curves have no rewards/accuracies (their panel stays empty)."""
    from alignpipe.data.builtin import make_items
    from alignpipe.evaluate.stage import run_evaluate

    _, run = train(env, tmp_path, "policy", max_steps=2)
    items = make_items("eval", 2, 0)
    prompts = [{"prompt_id": it.id, "prompt": [{"role": "user", "content": it.instruction}],
                "meta": json.dumps(it.spec, sort_keys=True)} for it in items]  # fmt: skip
    write_parquet(prompts, tmp_path / "eval_prompts.parquet", schema.PROMPTS)
    params = EvaluateParams(backend="hf", max_new_tokens=4, dtype="float32")
    dpo = DpoParams(**LENGTHS, loss_type="kto")
    metrics = run_evaluate({"sft": env.model, "dpo": run / "models" / "dpo"}, tmp_path / "eval_prompts.parquet",
                           env.root / "pairs" / "train.parquet", env.root / "ref.parquet", tmp_path / "reports",
                           params, RewardParams(), dpo, curves={"dpo": run / "reports" / "plots" / "metrics"})  # fmt: skip
    assert metrics["pairs"] == 4 and 0 <= metrics["pairs_accuracy"] <= 1 and math.isfinite(metrics["kl"])
    assert (tmp_path / "reports" / "eval" / "training_curves.png").exists()


def test_a_kto_weight_or_beta_change_leaves_ref_logps_alone():
    """dvc.yaml: ref_logps reads no KTO knob, so changing one reruns only dpo (and evaluate after it, and
    the extra rounds' dpo_round when rounds.extra has any);
    ref_logps writes the unpaired reference log-probs that dpo reads."""
    import yaml

    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]
    for key in ("dpo.desirable_weight", "dpo.undesirable_weight", "dpo.beta", "dpo.loss_type"):
        touched = {n for n, s in stages.items() for p in s.get("params", []) if p in (key, "dpo")}
        assert touched <= {"dpo", "dpo_round", "evaluate"} and "dpo" in touched, (key, touched)
    assert "data/ref_logps_unpaired.parquet" in stages["ref_logps"]["outs"]
    assert "data/ref_logps_unpaired.parquet" in stages["dpo"]["deps"]
