"""The dpo stage on the tiny model (fp32, CPU): loss identities, equivalences, resume, failures, LoRA."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from faults import kill_at
from safetensors.torch import load_file

import alignpipe.dpo.stage as dpo_module
from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet, write_parquet
from alignpipe.core.logprobs import CompletionScorer, PairLogps
from alignpipe.core.models import load_tokenizer
from alignpipe.dpo.data import epoch_batches, load_split, micro_batches, steps_per_epoch
from alignpipe.dpo.stage import pair_losses, run_dpo
from alignpipe.dpo.tr_dpo import merged_weights, sync_reference
from alignpipe.params import DpoParams, RefLogpsParams
from alignpipe.ref_logps import run_ref_logps
from alignpipe.testing import pair_row, tiny_model
from alignpipe.training.loop import NonFiniteError

N_TRAIN = 8
LENGTHS = {"max_length": 64, "max_prompt_length": 32}


@dataclass(frozen=True)
class Env:
    root: Path
    model: Path
    pairs: Path
    ref: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir) -> Env:
    """models/sft (the tiny model), data/pairs with 8 train and 2 eval pairs, data/ref_logps.parquet."""
    root = tmp_path_factory.mktemp("dpo")
    write_parquet([pair_row(i, "t") for i in range(N_TRAIN)], root / "pairs" / "train.parquet", schema.PAIRS)
    write_parquet([pair_row(i, "e") for i in range(2)], root / "pairs" / "eval.parquet", schema.PAIRS)
    ref = root / "ref_logps.parquet"
    run_ref_logps(
        tiny_model_dir, root / "pairs", ref, RefLogpsParams(batch_size=3, dtype="float32"), **LENGTHS
    )
    return Env(root=root, model=tiny_model_dir, pairs=root / "pairs", ref=ref)


def train(env, tmp_path: Path, name: str, ref: Path | None = None, **overrides) -> tuple[dict, Path]:
    settings = dict(
        LENGTHS, loss_type="sigmoid", batch_size=2, learning_rate=1e-3, lr_scheduler="constant",
        dtype="float32", logging_steps=1, eval_steps=100, save_steps=100, max_steps=2,
    )  # fmt: skip
    params = DpoParams(**{**settings, **overrides})
    run = tmp_path / name
    out = run / "models" / "dpo"
    summary = run_dpo(env.model, env.pairs, ref or env.ref, out, run / "checkpoints", run / "reports", params)
    return summary, run


def history(run: Path, metric: str) -> list[float]:
    with (run / "reports" / "plots" / "metrics" / f"{metric}.tsv").open() as f:
        return [float(row[metric.split("/")[-1]]) for row in csv.DictReader(f, delimiter="\t")]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "models" / "dpo" / "model.safetensors"))


def test_first_loss_is_ln2_when_policy_equals_reference_and_metrics_are_logged(env, tmp_path):
    summary, run = train(env, tmp_path, "a", max_steps=2, eval_steps=2)
    assert history(run, "loss")[0] == pytest.approx(math.log(2), abs=1e-5)
    assert history(run, "rewards/margins")[0] == pytest.approx(0.0, abs=1e-5)
    metrics = json.loads((run / "reports" / "metrics.json").read_text())
    assert {"loss", "rewards", "logps", "grad_norm", "pairs_per_s", "tokens_per_s", "learning_rate"} <= set(
        metrics
    )
    assert set(metrics["eval"]) == {"loss", "rewards"} and metrics["step"] == 2
    assert summary["steps"] == 2 and (run / "models" / "dpo" / "chat_template.jinja").exists()
    assert weights(run).keys() == load_file(str(env.model / "model.safetensors")).keys()


def test_precomputed_and_live_reference_give_the_same_losses(env, tmp_path):
    _, pre = train(env, tmp_path, "pre", max_steps=3)
    _, live = train(env, tmp_path, "live", max_steps=3, reference="live")
    torch.testing.assert_close(
        torch.tensor(history(pre, "loss")), torch.tensor(history(live, "loss")), atol=1e-5, rtol=0
    )
    for key, value in weights(pre).items():
        torch.testing.assert_close(value, weights(live)[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "peft", [{}, {"enabled": True, "r": 2, "dropout": 0.5}], ids=["full", "lora-dropout"]
)
def test_gradient_checkpointing_gives_the_same_losses_and_weights(env, tmp_path, peft):
    """Recomputing activations in backward changes memory, not maths (dropout masks are replayed)."""
    _, plain = train(env, tmp_path, "plain", max_steps=3, peft=peft, gradient_checkpointing=False)
    _, saved = train(env, tmp_path, "gc", max_steps=3, peft=peft, gradient_checkpointing=True)
    assert history(saved, "loss") == pytest.approx(history(plain, "loss"), abs=1e-6)
    assert history(saved, "loss")[-1] != pytest.approx(math.log(2), abs=1e-3)  # it trained
    for key, value in weights(plain).items():
        torch.testing.assert_close(weights(saved)[key], value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("batch_size,grad_accum", [(1, 8), (3, 3)])  # (3, 3): micro-batches of 3, 3 and 2
def test_grad_accumulation_matches_one_big_batch(env, tmp_path, batch_size, grad_accum):
    """One step over the same 8 pairs: same loss, same pre-clip gradient norm, same weights."""
    _, big = train(env, tmp_path, "big", max_steps=1, batch_size=8, grad_accum=1)
    _, acc = train(env, tmp_path, "acc", max_steps=1, batch_size=batch_size, grad_accum=grad_accum)
    for metric in ("loss", "grad_norm", "rewards/accuracies"):
        assert history(acc, metric) == pytest.approx(history(big, metric), rel=1e-5)
    for key, value in weights(big).items():
        torch.testing.assert_close(weights(acc)[key], value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "peft", [{}, {"enabled": True, "r": 2, "dropout": 0.5}], ids=["full", "lora-dropout"]
)
def test_resume_after_a_kill_ends_at_the_same_weights(env, tmp_path, monkeypatch, peft):
    """Killed at step 4 of 5 (checkpoint at 2), rerun: steps 3-5 again, bit-identical to no kill
    (the scheduler, the optimizer and, for LoRA dropout, the RNG are restored)."""
    schedule = dict(max_steps=5, save_steps=2, lr_scheduler="cosine", warmup_ratio=0.2, peft=peft)
    _, whole = train(env, tmp_path, "whole", **schedule)
    with monkeypatch.context() as m:
        kill_at(m, dpo_module, 4)
        with pytest.raises(KeyboardInterrupt):
            train(env, tmp_path, "resumed", **schedule)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-2"]
    summary, resumed = train(env, tmp_path, "resumed", **schedule)
    assert summary["resumed_from"] == 2
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history(resumed, "loss") == history(whole, "loss")  # the history holds each step once


def test_a_checkpoint_from_other_params_is_discarded(env, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        kill_at(m, dpo_module, 3)
        with pytest.raises(KeyboardInterrupt):
            train(env, tmp_path, "run", max_steps=3, save_steps=2)
    summary, _ = train(env, tmp_path, "run", max_steps=3, save_steps=2, beta=0.2)
    assert summary["resumed_from"] == 0


def test_non_finite_loss_names_step_and_pair_and_keeps_the_last_checkpoint(env, tmp_path):
    data = load_split(env.pairs, "train", env.ref, load_tokenizer(env.model), **LENGTHS)
    third = epoch_batches([p.n_tokens for p in data.pairs], 2, 0, 0)[2]
    bad_id = data.pairs[third[0]].pair_id
    rows = read_parquet(env.ref, schema.REF_LOGPS)
    for row in rows:
        if row["pair_id"] == bad_id:
            row["ref_chosen_logps"] = float("nan")
    broken = tmp_path / "ref_nan.parquet"
    write_parquet(rows, broken, schema.REF_LOGPS)
    with pytest.raises(NonFiniteError, match=rf"non-finite loss at step 3; batch pairs: {bad_id}$"):
        train(env, tmp_path, "nan", ref=broken, max_steps=4, save_steps=1)
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()) == ["step-2"]
    assert not (tmp_path / "nan" / "models" / "dpo").exists()


def test_lora_writes_the_adapter_and_a_merged_model(env, tmp_path):
    _, run = train(
        env, tmp_path, "lora", max_steps=2, learning_rate=1e-2, peft={"enabled": True, "r": 2, "alpha": 4}
    )
    out = run / "models" / "dpo"
    assert (out / "adapter" / "adapter_config.json").exists()
    assert any("lora_B" in k for k in load_file(str(out / "adapter" / "adapter_model.safetensors")))
    merged, sft = weights(run), load_file(str(env.model / "model.safetensors"))
    assert not any("lora" in k for k in merged) and merged.keys() == sft.keys()
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], sft["model.layers.0.self_attn.q_proj.weight"]
    )


def test_tr_dpo_sync_mixes_policy_into_reference(tokenizer):
    policy, ref = (
        CompletionScorer(tiny_model(tokenizer, seed=1)),
        CompletionScorer(tiny_model(tokenizer, seed=2)),
    )
    before = {k: v.clone() for k, v in ref.model.named_parameters()}
    sync_reference(policy.model, ref.model, alpha=0.25)
    for name, value in ref.model.named_parameters():
        want = 0.25 * dict(policy.model.named_parameters())[name] + 0.75 * before[name]
        torch.testing.assert_close(value, want)


def test_merged_weights_of_a_lora_policy_equal_merge_and_unload(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(tokenizer), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    merged = {k: v.detach().clone() for k, v in merged_weights(model).items()}
    plain = dict(model.merge_and_unload().named_parameters())
    assert merged.keys() == plain.keys()
    for key, value in plain.items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=1e-5)


def test_pair_losses_weighted_mix_and_ln2_identity():
    zeros, ones = torch.zeros(2), torch.ones(2)
    policy = PairLogps(
        torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -5.0]), 2 * ones.long(), 2 * ones.long()
    )
    sigmoid = pair_losses(
        policy, policy.chosen_logps, policy.rejected_logps, DpoParams(beta=0.5, loss_type="sigmoid")
    )
    torch.testing.assert_close(sigmoid, torch.full((2,), math.log(2)))
    mix = DpoParams(beta=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    got = pair_losses(policy, zeros - 5, zeros - 5, mix)
    # sigmoid: -log sigmoid(0.5 * ((c + 5) - (r + 5))); sft: -c / 2
    want = -torch.nn.functional.logsigmoid(0.5 * torch.tensor([1.0, -1.0])) + 0.5 * torch.tensor([2.0, 3.0])
    torch.testing.assert_close(got, want)


def test_pair_losses_pass_rpo_and_wpo_weights():
    """sigmoid * w + rpo_alpha * (-c / Lc), w = min(1, exp(aligned_c / Lc + aligned_r / Lr))."""
    c, r, n = torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([2])
    policy = PairLogps(c, r, n, n, torch.tensor([-1.0]), torch.tensor([-0.5]))
    got = pair_losses(policy, c - 1, r + 1, DpoParams(beta=0.5, loss_type="sigmoid", rpo_alpha=0.3, wpo=True))
    w = math.exp(-1.0 / 2 - 0.5 / 2)
    want = -math.log(1 / (1 + math.exp(-0.5 * 2))) * w + 0.3 * 4.0 / 2
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_invalid_loss_settings_fail_before_training(env, tmp_path):
    with pytest.raises(ValueError, match="simpo_gamma"):
        train(env, tmp_path, "bad", loss_options={"simpo_gamma": 1.0})
    assert not (tmp_path / "bad").exists()


def test_epoch_order_is_a_function_of_seed_and_epoch():
    lengths = [5, 9, 1, 7, 3, 8, 2, 6, 4, 10, 11]
    a, b = epoch_batches(lengths, 4, seed=0, epoch=0), epoch_batches(lengths, 4, seed=0, epoch=0)
    assert a == b and sorted(i for batch in a for i in batch) == list(range(11))
    assert epoch_batches(lengths, 4, seed=0, epoch=1) != a and epoch_batches(lengths, 4, seed=1, epoch=0) != a
    assert all(batch == sorted(batch, key=lambda i: -lengths[i]) for batch in a)  # longest first
    assert [len(batch) for batch in a if len(batch) < 4] == [3]


def test_micro_batches_split_evenly_and_interleave_processes():
    batch = list(range(8))
    assert micro_batches(batch, 1, 0, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert micro_batches(batch, 2, 1, 2) == [[2, 3], [6, 7]]
    assert micro_batches([0, 1], 1, 0, 3) is None
    assert steps_per_epoch(10, 4, 3) == 2 + 0 and steps_per_epoch(11, 4, 3) == 3
