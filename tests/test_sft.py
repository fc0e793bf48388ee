"""Tests of the sft stage: tokens and labels, batching, packing parity, training, LoRA, resume, bad input.

Training runs use the tiny 2-layer Llama of ``alignpipe.testing`` on CPU (fp32, one thread):
a run of a few steps takes about a second.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from sft_helpers import StopAt, quick, sft_paths, weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignpipe.artifacts.io import ArtifactError
from alignpipe.core.chat import ChatTemplateError
from alignpipe.params import PeftParams, SftParams
from alignpipe.sft.data import (
    IGNORE_INDEX,
    LengthGroupedSampler,
    SftDataError,
    SftDataset,
    collate_packed,
    collate_padded,
    encode_rows,
)
from alignpipe.sft.stage import SftPaths, check_settings, run_sft
from alignpipe.training.checkpoints import complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def row(i: int, user: str, answer: str) -> dict:
    return {
        "id": f"sft-{i}",
        "prompt": [{"role": "user", "content": user}],
        "completion": [{"role": "assistant", "content": answer}],
        "meta": None,
    }


ROWS = [
    row(i, "Describe the ocean" + " in words" * (i % 4), "The ocean is vast." + " Waves." * i)
    for i in range(10)
]


def paths_for(tmp_path: Path, model_dir: Path, rows: list[dict] = ROWS) -> SftPaths:
    """The stage's paths over ``rows`` (ROWS: 10 rows, 3 steps an epoch of quick()'s batch 4)."""
    return sft_paths(tmp_path, model_dir, rows)


# --- tokens and labels ---------------------------------------------------------------------------


def test_chat_example_ids_one_bos_one_eos_and_labels(tokenizer):
    """ChatML, built by hand: special tokens around each segment, segments tokenized alone."""
    data = encode_rows(tokenizer, [row(0, "Hi", "Hello")], max_length=64)
    (example,) = data.examples
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (start, end) == (tokenizer.bos_token_id, tokenizer.eos_token_id)

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = [start, *ids("user\nHi"), end, *ids("\n"), start, *ids("assistant\n")]
    completion = [*ids("Hello"), end]
    assert example.input_ids == prompt + completion
    assert example.input_ids[:2].count(start) == 1  # no doubled BOS
    assert example.input_ids[example.prompt_len :].count(end) == 1 and example.input_ids[-1] == end
    assert example.labels == [IGNORE_INDEX] * len(prompt) + completion
    assert data.completion_tokens == len(completion) and data.tokens == len(prompt) + len(completion)


def test_collate_padded_masks_prompt_and_padding():
    features = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [5, 9], "labels": [-100, 9]},
    ]
    batch = collate_padded(features, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, -100, -100]]
    # logits only where a label is predicted: position p predicts labels[p + 1] (row 0: 1, 2; row 1: 0)
    assert batch["logits_to_keep"].tolist() == [0, 1, 2]
    assert batch["shift_labels"].tolist() == [[-100, 7, 8], [9, -100, -100]]
    assert set(collate_padded(features, pad_token_id=0, trim_logits=False)) == {
        "input_ids",
        "attention_mask",
        "labels",
    }


def test_collate_packed_restarts_positions_and_masks_each_first_token():
    features = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = collate_packed(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert batch["logits_to_keep"].tolist() == [0, 1, 3] and batch["shift_labels"].tolist() == [[6, 7, 9]]
    assert "attention_mask" not in batch  # a mask would hide the packing from transformers


def test_packed_and_padded_batches_give_the_same_loss(tokenizer, model):
    examples = SftDataset(encode_rows(tokenizer, ROWS[:3], max_length=256).examples)
    features = [examples[i] for i in range(3)]
    model.eval()
    with torch.no_grad():  # use_cache=False as in training: with a KV cache transformers ignores packing
        padded = model(
            **collate_padded(features, tokenizer.pad_token_id, trim_logits=False), use_cache=False
        ).loss
        padded_trimmed = model(**collate_padded(features, tokenizer.pad_token_id), use_cache=False).loss
        packed_batch = collate_packed(features)
        packed = model(**packed_batch, use_cache=False).loss
        del packed_batch["position_ids"]  # control: without restarts the sequences attend to each other
        leaky = model(**packed_batch, use_cache=False).loss
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_trimmed, padded, rtol=1e-6, atol=1e-6)  # same loss from fewer logits
    assert abs(leaky.item() - padded.item()) > 1e-4


def test_length_grouped_sampler_batches():
    lengths = [9, 1, 8, 2, 7, 3, 6, 4, 5, 10]
    sampler = LengthGroupedSampler(lengths, batch_size=3, seed=0)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(10)) and list(sampler) == sum(batches, [])
    assert [len(b) for b in batches] == [3, 3, 3, 1]  # the short batch last keeps BatchSampler aligned
    assert sorted(sorted(lengths[i] for i in b) for b in batches[:3]) == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert batches[-1] == [9]  # the longest sequence is left over
    again = LengthGroupedSampler(lengths, batch_size=3, seed=0).batches()
    assert again == batches  # the order depends only on (seed, epoch): a resumed run sees the same batches
    orders = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        orders.add(tuple(map(tuple, sampler.batches())))
    assert len(orders) > 1


def test_truncate_and_drop_are_counted(tokenizer):
    rows = [row(0, "Hi", "Hello"), row(1, "Hi", "Hello there " * 20)]
    short = len(encode_rows(tokenizer, rows[:1], max_length=512).examples[0].input_ids)
    cut = encode_rows(tokenizer, rows, max_length=short + 2, truncation="truncate")
    assert (cut.truncated, cut.dropped, len(cut.examples)) == (1, 0, 2)
    assert len(cut.examples[1].input_ids) == short + 2
    assert cut.examples[1].input_ids[-1] != tokenizer.eos_token_id  # a cut answer did not end
    dropped = encode_rows(tokenizer, rows, max_length=short + 2, truncation="drop")
    assert (dropped.truncated, dropped.dropped, len(dropped.examples)) == (0, 1, 1)


def test_bad_data_errors_name_the_file_and_row(tokenizer):
    with pytest.raises(SftDataError, match="sft.parquet: no rows"):
        encode_rows(tokenizer, [], max_length=64, where="sft.parquet")
    bad = [row(0, "Hi", "Hello"), {**row(1, "Hi", "x"), "completion": []}]
    with pytest.raises(SftDataError, match="row 1 \\(id 'sft-1'\\): field 'completion' is empty"):
        encode_rows(tokenizer, bad, max_length=64)
    with pytest.raises(SftDataError, match="all 1 rows are longer than sft.max_length=4"):
        encode_rows(tokenizer, bad[:1], max_length=4, truncation="drop")


# --- training runs on the tiny model --------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_a_loadable_folder(tmp_path, tiny_model_dir, tokenizer):
    rows = [row(i, "Give a tip about sleep.", "Sleep well.") for i in range(8)]
    paths = paths_for(tmp_path, tiny_model_dir, rows)
    features = [SftDataset(encode_rows(tokenizer, rows[:1], max_length=64).examples)[0]]
    batch = collate_padded(features, tokenizer.pad_token_id)

    def loss_of(folder):
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(folder).eval()(**batch).loss.item()

    summary = run_sft(quick(max_steps=8), paths)
    before, after = loss_of(tiny_model_dir), loss_of(paths.out)
    assert after < before - 1.0, (before, after)
    assert summary["steps"] == 8 and summary["sequences"] == 8 and summary["truncated"] == 0
    assert json.loads((paths.metrics_dir / "metrics.json").read_text()) == summary
    loss_plot = (paths.metrics_dir / "plots/metrics/train/loss.tsv").read_text().splitlines()
    assert loss_plot[0] == "step\tloss" and [r.split("\t")[0] for r in loss_plot[1:]] == [
        "1",
        "2",
        "4",
        "6",
        "8",
    ]
    for name in ("learning_rate", "grad_norm", "tokens_per_second"):
        assert (paths.metrics_dir / f"plots/metrics/train/{name}.tsv").exists()
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in paths.out.iterdir()
    }
    assert AutoTokenizer.from_pretrained(paths.out).chat_template
    assert json.loads((paths.out / "config.json").read_text())["use_cache"] is True
    assert not list(tmp_path.glob(".out.*"))  # no temporary left behind


def test_packed_training_matches_padded_training(tmp_path, tiny_model_dir):
    """Same batches through the Trainer: same losses, same tokens counted, (nearly) the same weights."""
    padded = run_sft(quick(max_steps=3, logging_steps=1), paths_for(tmp_path / "padded", tiny_model_dir))
    packed = run_sft(
        quick(max_steps=3, logging_steps=1, packing=True), paths_for(tmp_path / "packed", tiny_model_dir)
    )
    assert packed["tokens"] == padded["tokens"] > 0
    assert packed["final_loss"] == pytest.approx(padded["final_loss"], abs=1e-3)
    a, b = weights(tmp_path / "padded/out"), weights(tmp_path / "packed/out")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_gradient_checkpointing_gives_the_same_weights(tmp_path, tiny_model_dir):
    plain = run_sft(quick(max_steps=2), paths_for(tmp_path / "plain", tiny_model_dir))
    saved = run_sft(
        quick(max_steps=2, gradient_checkpointing=True), paths_for(tmp_path / "gc", tiny_model_dir)
    )
    assert saved["final_loss"] == plain["final_loss"]
    a, b = weights(tmp_path / "plain/out"), weights(tmp_path / "gc/out")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_lora_writes_a_merged_folder_without_peft_keys(tmp_path, tiny_model_dir):
    paths = paths_for(tmp_path, tiny_model_dir)
    lora = PeftParams(enabled=True, r=4, alpha=8, dropout=0.0)
    params = quick(max_steps=3, peft=lora, gradient_checkpointing=True)
    run_sft(params, paths)
    base, merged = weights(tiny_model_dir), weights(paths.out)
    assert set(merged) == set(base) and not any("lora" in k or "base_model" in k for k in merged)
    assert not (paths.out / "adapter_config.json").exists()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert "model.layers.0.self_attn.q_proj.weight" in changed  # adapters trained and merged
    assert "model.embed_tokens.weight" not in changed and "model.norm.weight" not in changed  # frozen
    assert AutoModelForCausalLM.from_pretrained(paths.out) is not None


def test_disabled_copies_the_base_model_unchanged(tmp_path, tiny_model_dir):
    paths = paths_for(tmp_path, tiny_model_dir)
    summary = run_sft(SftParams(enabled=False), paths)
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert sorted(p.name for p in paths.out.iterdir()) == names
    assert filecmp.cmpfiles(tiny_model_dir, paths.out, names, shallow=False)[0] == names
    assert summary["enabled"] is False and summary["steps"] == 0
    assert (
        paths.metrics_dir / "plots/metrics/train/loss.tsv"
    ).read_text() == "step\tloss\n"  # dvc outs exist
    assert paths.checkpoints.is_dir()


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_model_dir, capsys):
    """6 steps over 2 epochs, checkpoints every 2; killed after step 5 (epoch 2), resumed from 4."""
    params = quick(max_steps=6, save_steps=2)
    straight = paths_for(tmp_path / "a", tiny_model_dir)
    run_sft(params, straight)

    resumed = paths_for(tmp_path / "b", tiny_model_dir)
    with pytest.raises(KeyboardInterrupt):
        run_sft(params, resumed, callbacks=[StopAt(5)])
    assert not resumed.out.exists()
    assert [p.name for p in complete_checkpoints(resumed.checkpoints)] == ["checkpoint-4"]
    summary = run_sft(params, resumed)
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 6
    a, b = weights(straight.out), weights(resumed.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plot = "plots/metrics/train/loss.tsv"  # curves before the checkpoint are replayed from its state
    assert (straight.metrics_dir / plot).read_text() == (resumed.metrics_dir / plot).read_text()
    assert summary["tokens"] == json.loads((straight.metrics_dir / "metrics.json").read_text())["tokens"]

    again = run_sft(params, resumed)  # e.g. models/sft deleted: the last checkpoint is the final step
    assert again["resumed_from_step"] == 6 and all(torch.equal(a[k], weights(resumed.out)[k]) for k in a)
    capsys.readouterr()
    changed = run_sft(quick(max_steps=6, save_steps=2, learning_rate=5e-3), resumed)
    assert changed["resumed_from_step"] is None
    assert (
        "sft.learning_rate changed (0.01 -> 0.005): deleting 1 stale checkpoint(s)" in capsys.readouterr().out
    )


# --- bad input and settings -----------------------------------------------------------------------


def test_empty_dataset_and_missing_file_fail_clearly(tmp_path, tiny_model_dir):
    paths = paths_for(tmp_path, tiny_model_dir, rows=[])
    with pytest.raises(SftDataError, match="sft.parquet: no rows"):
        run_sft(quick(), paths)
    with pytest.raises(ArtifactError, match="missing"):
        run_sft(quick(), dataclasses.replace(paths, data=tmp_path / "nope.parquet"))
    assert not paths.out.exists()


def test_tokenizer_without_chat_template(tmp_path, tiny_model_dir):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    paths = paths_for(tmp_path, bare)
    with pytest.raises(ChatTemplateError, match="no chat template; set sft.chat_template"):
        run_sft(quick(max_steps=1), paths)
    template = AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    run_sft(quick(max_steps=1, chat_template=template), paths)
    assert AutoTokenizer.from_pretrained(paths.out).chat_template == template  # later stages render with it


def test_qlora_runs_on_cpu_too():  # tests/test_qlora.py trains it
    check_settings(quick(peft=PeftParams(enabled=True, load_in_4bit=True)))
    # QLoRA without LoRA is refused at params time (tests/test_params_checks.py)


# --- launch configs and the stage ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero3"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert config.compute_environment == "LOCAL_MACHINE" and config.num_machines == 1
    assert config.mixed_precision == "no"  # the dtype comes from params.yaml (sft.dtype), not the launcher
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}[name]
    assert config.distributed_type == expected
    if name == "fsdp":
        assert raw["fsdp_config"]["fsdp_version"] == 2
        assert raw["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name == "deepspeed_zero3":
        assert raw["deepspeed_config"]["zero_stage"] == 3
        assert (
            raw["deepspeed_config"]["zero3_save_16bit_model"] is True
        )  # the merged folder needs full weights


def test_dvc_sft_stage_runs_under_the_launcher():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["sft"]
    assert stage["cmd"].startswith("${sft.launcher} stages/sft.py")
    assert stage["params"] == ["sft"]  # its deps: tests/test_architecture.py checks them against the imports
    assert stage["outs"] == ["models/sft"]  # checkpoints/sft is resume state, not an out (dvc.yaml)


@pytest.mark.slow
def test_stage_script_end_to_end(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    paths = paths_for(tmp_path, tiny_model_dir)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sft": {"max_steps": 2, "batch_size": 4}}))
    cmd = [
        sys.executable,
        str(ROOT / "stages/sft.py"),
        "--model",
        str(tiny_model_dir),
        "--data",
        str(paths.data),
    ]
    cmd += [
        "--out",
        str(paths.out),
        "--checkpoints",
        str(paths.checkpoints),
        "--metrics-dir",
        str(paths.metrics_dir),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sft: 2 steps in" in done.stdout
    assert json.loads((paths.metrics_dir / "metrics.json").read_text())["steps"] == 2
