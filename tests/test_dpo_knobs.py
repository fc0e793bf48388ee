"""Issue 16's training knobs: resume points by time on the default params, dpo.reference_free, the MoE
router loss, early stopping (resume keeps its state) and the DPO diagnostics (tiny models, CPU, fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from faults import kill_at
from safetensors.torch import load_file
from transformers import MixtralConfig, MixtralForCausalLM, TrainerCallback

import alignpipe.dpo.stage as dpo_module
import alignpipe.ref_logps as ref_module
from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet, write_parquet
from alignpipe.artifacts.pairs import read_pairs
from alignpipe.core.logprobs import CompletionScorer, collate_pairs
from alignpipe.core.router import router_weight
from alignpipe.dpo.diagnostics import PairTracker, diagnose
from alignpipe.dpo.early_stop import EarlyStopper
from alignpipe.dpo.stage import run_dpo
from alignpipe.params import DpoParams, EarlyStopping, RefLogpsParams, SftParams
from alignpipe.ref_logps import run_ref_logps
from alignpipe.sft.stage import SftPaths, run_sft
from alignpipe.testing import pair_row as _pair_row
from alignpipe.testing import tiny_tokenizer
from alignpipe.training import timed_save
from alignpipe.training.checkpoints import complete_checkpoints

STEP_SECONDS = 25.0  # the fake clock: 6 dpo steps (5 sft) take as long as the embedded default's ~2 min


def make_pairs(root: Path, model: Path, n_train: int = 16, n_eval: int = 4) -> tuple[Path, Path]:
    """pairs/{train,eval}.parquet and their reference log-probs at the default dpo lengths."""
    write_parquet([pair_row(i, "t") for i in range(n_train)], root / "pairs" / "train.parquet", schema.PAIRS)
    write_parquet([pair_row(i, "e") for i in range(n_eval)], root / "pairs" / "eval.parquet", schema.PAIRS)
    d = DpoParams()
    ref = root / "ref_logps.parquet"
    run_ref_logps(
        model, root / "pairs", ref, RefLogpsParams(dtype="float32"), d.max_length, d.max_prompt_length
    )
    return root / "pairs", ref


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    return make_pairs(tmp_path_factory.mktemp("knobs"), tiny_model_dir)


@pytest.fixture()
def fake_clock(monkeypatch):
    """timed_save's clock, moving STEP_SECONDS per reading (it reads once a step, and at start/save)."""
    now = [0.0]

    def clock() -> float:
        now[0] += STEP_SECONDS
        return now[0]

    monkeypatch.setattr(timed_save, "clock", clock)


def dpo(model: Path, data: tuple[Path, Path], run: Path, params: DpoParams, ref: Path | None = None) -> dict:
    pairs, table = data
    return run_dpo(model, pairs, ref or table, run / "out", run / "ckpt", run / "reports", params)


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# --- resume points by time, on the default params ------------------------------------------------


def test_default_save_settings_leave_a_dpo_resume_point_and_a_kill_resumes_past_step_0(
    data, tiny_model_dir, tmp_path, monkeypatch, fake_clock
):
    """DpoParams() as params.yaml (save_steps 50 > the 6 steps here): only the time trigger can save."""
    params = DpoParams()
    assert params.save_steps == 50 and params.save_minutes == 1.0
    whole = dpo(tiny_model_dir, data, tmp_path / "whole", params)
    assert whole["steps"] == 6
    with monkeypatch.context() as m:
        kill_at(m, dpo_module, 5)
        with pytest.raises(KeyboardInterrupt):
            dpo(tiny_model_dir, data, tmp_path / "killed", params)
    assert sorted(p.name for p in (tmp_path / "killed" / "ckpt").iterdir()) == ["step-3"]  # 75 s in
    resumed = dpo(tiny_model_dir, data, tmp_path / "killed", params)
    assert resumed["resumed_from"] == 3
    assert same_weights(tmp_path / "whole" / "out", tmp_path / "killed" / "out")


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_default_save_settings_leave_an_sft_resume_point_and_a_kill_resumes_past_step_0(
    tiny_model_dir, tmp_path, fake_clock
):
    """SftParams() as params.yaml; 40 rows / batch 8 = 5 steps, never a save_steps multiple."""
    rows = [
        {"id": f"s{i}", "prompt": [{"role": "user", "content": "say it" + " again" * (i % 3)}],
         "completion": [{"role": "assistant", "content": "it" + " is" * (i % 5)}], "meta": None}
        for i in range(40)
    ]  # fmt: skip
    params = SftParams()
    runs = {}
    for name in ("whole", "killed"):
        folder = tmp_path / name
        write_parquet(rows, folder / "sft.parquet", schema.SFT)
        runs[name] = SftPaths(
            tiny_model_dir, folder / "sft.parquet", folder / "out", folder / "ckpt", folder / "r"
        )
    assert run_sft(params, runs["whole"])["steps"] == 5
    with pytest.raises(KeyboardInterrupt):
        run_sft(params, runs["killed"], callbacks=[StopAt(4)])
    assert [p.name for p in complete_checkpoints(runs["killed"].checkpoints)] == ["checkpoint-3"]
    summary = run_sft(params, runs["killed"])
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 5
    assert same_weights(runs["whole"].out, runs["killed"].out)


def test_the_save_timer_fires_after_its_minutes_and_never_when_off(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(timed_save, "clock", lambda: now[0])
    timer, off = timed_save.SaveTimer(1.5), timed_save.SaveTimer(None)
    now[0] = 89.0
    assert not timer.due()
    now[0] = 90.0
    assert timer.due() and not off.due()
    timer.restart()
    assert not timer.due()


# --- reference-free -------------------------------------------------------------------------------


def test_reference_free_ref_logps_runs_no_model_and_writes_zeros(data, tiny_model_dir, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a reference-free ref_logps must not load the model")

    monkeypatch.setattr(ref_module, "reference_scorer", no_model)
    out = tmp_path / "ref0.parquet"
    d = DpoParams(reference_free=True)
    summary = run_ref_logps(tiny_model_dir, data[0], out, RefLogpsParams(), d.max_length, d.max_prompt_length,
                            reference_free=True)  # fmt: skip
    rows = read_parquet(out, schema.REF_LOGPS)
    real = {r["pair_id"]: r for r in read_parquet(data[1], schema.REF_LOGPS)}
    assert summary["reference_free"] and len(rows) == 20
    assert all(r["ref_chosen_logps"] == 0.0 and r["ref_rejected_logps"] == 0.0 for r in rows)
    assert all(r["chosen_tokens"] == real[r["pair_id"]]["chosen_tokens"] for r in rows)


def test_reference_free_dpo_is_dpo_against_zero_reference_log_probs(data, tiny_model_dir, tmp_path):
    """reference_free ignores the table's log-probs: the same run as plain DPO on a table of zeros."""
    rows = read_parquet(data[1], schema.REF_LOGPS)
    zeros = tmp_path / "zeros.parquet"
    write_parquet([r | {"ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0} for r in rows], zeros,
                  schema.REF_LOGPS)  # fmt: skip
    quick = dict(max_steps=2, save_minutes=None, learning_rate=1e-3)
    free = dpo(tiny_model_dir, data, tmp_path / "free", DpoParams(reference_free=True, **quick))
    plain = dpo(tiny_model_dir, data, tmp_path / "plain", DpoParams(**quick), ref=zeros)
    assert same_weights(tmp_path / "free" / "out", tmp_path / "plain" / "out")
    other = dpo(tiny_model_dir, data, tmp_path / "other", DpoParams(**quick))
    assert not same_weights(tmp_path / "free" / "out", tmp_path / "other" / "out")
    assert free["steps"] == plain["steps"] == other["steps"] == 2


# --- MoE router loss ------------------------------------------------------------------------------


def tiny_mixtral(tokenizer, **overrides) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=True,
                           pad_token_id=tokenizer.pad_token_id, **overrides)  # fmt: skip
    return MixtralForCausalLM(config)


def test_router_weight_follows_the_model_config_as_trl_and_the_override():
    tok = tiny_tokenizer()
    on = tiny_mixtral(tok, output_router_logits=True, router_aux_loss_coef=0.02).config
    off = tiny_mixtral(tok, router_aux_loss_coef=0.02).config
    assert router_weight(on, None) == 0.02 and router_weight(off, None) == 0.0
    assert router_weight(off, 0.5) == 0.5 and router_weight(on, 0.0) == 0.0
    from alignpipe.testing import tiny_model

    assert router_weight(tiny_model(tok).config, 0.5) == 0.0  # dense: no router


def test_the_scorer_returns_the_router_loss_transformers_computes(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_mixtral(tok)
    write_parquet([pair_row(i, "m") for i in range(3)], tmp_path / "p.parquet", schema.PAIRS)
    pairs = read_pairs(tmp_path / "p.parquet", tok, 64, 32)
    batch = collate_pairs(pairs, False, tok.pad_token_id, None, False)  # padded, a 2-D mask
    scorer = CompletionScorer(model)
    scorer.route = True
    scorer(batch.input_ids, batch.position_ids, batch.attention_mask, batch.predict_index, batch.target_ids)
    expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, output_router_logits=True).aux_loss  # fmt: skip
    assert scorer.aux_loss is not None and scorer.aux_loss.requires_grad
    torch.testing.assert_close(scorer.aux_loss, expected)
    scorer.route = False
    scorer(batch.input_ids, batch.position_ids, batch.attention_mask, batch.predict_index, batch.target_ids)
    assert scorer.aux_loss is None


def test_dpo_on_a_moe_model_adds_the_router_loss(tmp_path):
    """The router weights move differently once the aux loss is added (3 steps: Adam's first step is
    about lr x sign(gradient), the same for both)."""
    tok = tiny_tokenizer()
    folder = tmp_path / "moe"
    tiny_mixtral(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    data = make_pairs(tmp_path, folder, n_train=8, n_eval=2)
    quick = dict(
        max_steps=3, batch_size=4, save_minutes=None, learning_rate=1e-2, gradient_checkpointing=False
    )
    dpo(folder, data, tmp_path / "plain", DpoParams(router_aux_loss_coef=0.0, **quick))
    dpo(folder, data, tmp_path / "aux", DpoParams(router_aux_loss_coef=1.0, **quick))
    plain, aux = (load_file(str(tmp_path / r / "out" / "model.safetensors")) for r in ("plain", "aux"))
    gates = [k for k in plain if k.endswith("moe.gate.weight")]  # the routers (saved in the legacy names)
    assert gates and any(not torch.equal(plain[k], aux[k]) for k in gates)


# --- early stopping -------------------------------------------------------------------------------


def test_early_stopper_counts_evaluations_without_improvement():
    stop = EarlyStopper(EarlyStopping(metric="loss", patience=2, min_delta=0.1))
    points = [0.70, 0.65, 0.50, 0.45, 0.46]  # 0.65 and 0.45 improve by < 0.1: not improvements
    assert [stop.update(i + 1, {"eval/loss": v}) for i, v in enumerate(points)] == [
        False, False, False, False, True,
    ]  # fmt: skip
    assert stop.summary() == {"metric": "eval/loss", "best": 0.50, "best_step": 3, "stopped_at": 5}
    acc = EarlyStopper(EarlyStopping(metric="accuracy", patience=1))
    assert [acc.update(s, {"eval/rewards/accuracies": v}) for s, v in ((1, 0.5), (2, 0.75), (3, 0.75))] == [
        False, False, True,
    ]  # fmt: skip


def test_early_stopping_survives_a_kill(data, tiny_model_dir, tmp_path, monkeypatch):
    """Accuracy cannot improve by 1.0: evaluation 1 is the best, 2 and 3 are not, the run stops at 3.
    Killed at step 3 (checkpoint at 2), the resumed run still stops at 3."""
    params = DpoParams(max_steps=5, eval_steps=1, save_steps=1, save_minutes=None, batch_size=4,
                       early_stopping=EarlyStopping(metric="accuracy", patience=2, min_delta=1.0))  # fmt: skip
    whole = dpo(tiny_model_dir, data, tmp_path / "whole", params)
    assert whole["steps"] == 3 and whole["early_stopping"]["stopped_at"] == 3
    with monkeypatch.context() as m:
        kill_at(m, dpo_module, 3)
        with pytest.raises(KeyboardInterrupt):
            dpo(tiny_model_dir, data, tmp_path / "killed", params)
    resumed = dpo(tiny_model_dir, data, tmp_path / "killed", params)
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 3
    assert resumed["early_stopping"] == whole["early_stopping"]
    assert same_weights(tmp_path / "whole" / "out", tmp_path / "killed" / "out")
    saved = json.loads((tmp_path / "killed" / "reports" / "metrics.json").read_text())
    assert saved["early_stopping"]["stopped_at"] == 3


def test_early_stopping_without_eval_pairs_fails_before_training(tiny_model_dir, tmp_path):
    root = tmp_path / "noeval"
    write_parquet([pair_row(i, "t") for i in range(8)], root / "pairs" / "train.parquet", schema.PAIRS)
    ref = root / "ref.parquet"
    run_ref_logps(tiny_model_dir, root / "pairs", ref, RefLogpsParams(), 256, 128)
    with pytest.raises(ValueError, match="early_stopping watches the eval pairs"):
        dpo(
            tiny_model_dir,
            (root / "pairs", ref),
            root,
            DpoParams(early_stopping=EarlyStopping(metric="loss")),
        )


# --- diagnostics ----------------------------------------------------------------------------------


def curve(chosen: float, rejected: float) -> list:
    start = {
        "rewards/chosen": 0.0,
        "rewards/rejected": 0.0,
        "rewards/margins": 0.0,
        "rewards/accuracies": 0.0,
    }
    end = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
           "rewards/accuracies": 0.9}  # fmt: skip
    return [(1, start), (2, {"eval/loss": 0.6}), (30, end)]


@pytest.mark.parametrize(
    "chosen,rejected,verdict,advice",
    [
        (0.3, -0.4, "chosen up, rejected down", "healthy"),
        (-0.2, -0.9, "both falling", "beta is likely too low"),
        (0.004, 0.0, "flat margin", "the learning rate is likely too low, or the pairs are bad"),
    ],
)
def test_diagnostics_in_the_words_of_the_dpo_derivation(chosen, rejected, verdict, advice):
    d = diagnose(curve(chosen, rejected), beta=0.1, never_learned=["p3"])
    assert d["verdict"] == verdict and d["advice"].startswith(advice)
    assert d["margin_change"] == pytest.approx(chosen - rejected) and d["never_learned"] == ["p3"]


def test_unpaired_diagnostics_read_both_falling_before_the_margin():
    """KTO's chosen/rejected rewards are different examples of each batch. The embedded default's KTO
    run moved them by -0.642 and -0.602 (margin -0.040 at beta 0.1): for pairs that reads "margin
    falling: check the labels", for unpaired examples "both falling"."""
    history = curve(-0.642, -0.602)
    paired = diagnose(history, beta=0.1, never_learned=[])
    unpaired = diagnose(history, beta=0.1, never_learned=[], unpaired=True)
    assert paired["verdict"] == "margin falling" and "labels" in paired["advice"]
    assert unpaired["verdict"] == "both falling" and "desirable and undesirable" in unpaired["advice"]
    # a real fall of the desirable examples below the undesirable ones still points at the labels
    falling = diagnose(curve(-0.5, 0.2), beta=0.1, never_learned=[], unpaired=True)
    assert falling["verdict"] == "margin falling" and falling["advice"].endswith("check the labels")


def test_a_pair_is_never_learned_when_its_margin_is_never_positive():
    tracker = PairTracker()
    tracker.see({"a": 0.0, "b": -0.1, "c": 0.2})
    tracker.see({"a": -0.3, "b": 0.05})  # b learned at the second visit
    tracker.merge([{"d": False, "c": False}])  # another process: c stays learned
    assert tracker.never_learned() == ["a", "d"]


def test_the_dpo_report_has_the_diagnostics_and_the_unlearned_pair_ids(
    data, tiny_model_dir, tmp_path, capsys
):
    summary = dpo(tiny_model_dir, data, tmp_path / "d", DpoParams(max_steps=4, save_minutes=None,
                                                                    learning_rate=1e-3))  # fmt: skip
    saved = json.loads((tmp_path / "d" / "reports" / "metrics.json").read_text())["diagnostics"]
    assert saved == summary["diagnostics"]
    assert saved["verdict"] in {"chosen up, rejected down", "both falling", "flat margin", "margin falling",
                                "both rising"}  # fmt: skip
    assert set(saved["never_learned"]) <= {f"t{i}" for i in range(16)}
    assert f"dpo: diagnostics: {saved['verdict']}" in capsys.readouterr().out


def pair_row(i: int, prefix: str) -> dict:
    return _pair_row(i, prefix, prompt_id=f"q{prefix}{i}")  # prompt ids distinct across splits
