"""What trains on a VLM (``sft.vlm_trainable``, ``dpo.vlm_trainable``), on the tiny LLaVA: for each value,
full or LoRA, exactly the intended parameter groups require grad and exactly those move over a few
AdamW steps; and the dpo stage with LoRA and with a live reference on a VLM (step-1 loss ln 2, the
live reference's losses those of the precomputed one)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from vlm_helpers import COLOURS, QUESTION, write_dpo_inputs

from alignpipe.artifacts import schema
from alignpipe.artifacts.schema import with_images
from alignpipe.params import DpoParams, ParamsError, PeftParams
from alignpipe.testing_vlm import save_tiny_vlm, square_png, tiny_vlm, tiny_vlm_processor
from alignpipe.vision.models import apply_vision_lora, fully_trained_modules, set_trainable
from alignpipe.vision.sft import collate_vision_sft, encode_vision_sft

VALUES = ("language_model", "language_model+projector", "all")
# the groups each value trains (LLaVA's module names: model.vision_tower, model.multi_modal_projector)
TRAINED = {"language_model": {"lm"}, "language_model+projector": {"lm", "projector"},
           "all": {"lm", "projector", "tower"}}  # fmt: skip


def group(name: str) -> str:
    if "vision_tower" in name:
        return "tower"
    return "projector" if "multi_modal_projector" in name else "lm"


def sft_batch(processor):
    rows = [{"id": c, "prompt": QUESTION, "completion": [{"role": "assistant", "content": c}],
             "images": [{"bytes": square_png(rgb), "path": None}]} for c, rgb in COLOURS.items()]  # fmt: skip
    return collate_vision_sft(encode_vision_sft(processor, rows, 64), processor.tokenizer.pad_token_id)


def steps(model, batch, n: int = 3) -> set[str]:
    """``n`` AdamW steps on the SFT loss of ``batch``; the names of the weights that got a gradient."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    got: set[str] = set()
    for _ in range(n):
        model(**batch).loss.backward()
        got |= {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        optimizer.step()
        optimizer.zero_grad()
    return got


@pytest.mark.parametrize("trainable", VALUES)
def test_full_fine_tuning_trains_and_moves_exactly_the_chosen_groups(trainable):
    processor = tiny_vlm_processor()
    model = tiny_vlm(processor, seed=1)
    counts = set_trainable(model, trainable)
    grads = {group(n) for n, p in model.named_parameters() if p.requires_grad}
    assert grads == TRAINED[trainable]
    assert all(p.requires_grad == (group(n) in grads) for n, p in model.named_parameters())
    assert counts["trained"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = steps(model, sft_batch(processor))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {group(n) for n in moved} == TRAINED[trainable]
    assert moved == got  # each weight with a gradient moved, no other one did


@pytest.mark.parametrize("trainable", VALUES)
def test_lora_adapts_the_language_model_and_trains_the_rest_in_full(trainable):
    """LoRA targets only the language model's linear layers; the projector (and the tower, with all) is
    peft's modules_to_save, trained in full; the merged model moved exactly those groups, never the
    embeddings or the LM head."""
    processor = tiny_vlm_processor()
    model = tiny_vlm(processor, seed=1)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    set_trainable(model, trainable)
    saved = fully_trained_modules(model, trainable)
    assert saved == {"language_model": [], "language_model+projector": ["model.multi_modal_projector"],
                     "all": ["model.vision_tower", "model.multi_modal_projector"]}[trainable]  # fmt: skip
    peft_model = apply_vision_lora(model, PeftParams(enabled=True, r=2, alpha=4), trainable)
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    lora = {n for n in trained if "lora_" in n}
    assert lora and all(".language_model." in n for n in lora)
    copies = trained - lora
    assert all(".modules_to_save.default." in n for n in copies)
    assert {group(n) for n in copies} == TRAINED[trainable] - {"lm"}
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    got = steps(peft_model, sft_batch(processor))
    moved = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == got and moved <= trained and any("lora_B" in n for n in moved)
    assert {group(n) for n in moved & copies} == TRAINED[trainable] - {"lm"}
    merged = dict(peft_model.merge_and_unload().named_parameters())
    assert merged.keys() == original.keys()
    changed = {n for n in merged if not torch.equal(merged[n], original[n])}
    assert {group(n) for n in changed} == TRAINED[trainable]
    # in the language model only the LoRA-adapted linears (not its embeddings, norms or LM head)
    assert all(n.endswith("_proj.weight") for n in changed if group(n) == "lm")


def test_a_bad_value_is_one_line_and_text_models_ignore_the_key(tmp_path):
    import yaml

    from alignpipe.params import load_section

    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["dpo"]["vlm_trainable"] = "tower"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError) as err:
        load_section("dpo", tmp_path / "params.yaml")
    assert str(err.value) == (
        f"{tmp_path / 'params.yaml'}: dpo.vlm_trainable: Input should be 'language_model', "
        "'language_model+projector' or 'all'"
    )
    with pytest.raises(ValueError, match="vlm_trainable: 'tower' is none of language_model, "):
        set_trainable(tiny_vlm(tiny_vlm_processor()), "tower")  # type: ignore[arg-type]


def test_merged_weights_of_a_lora_vlm_with_a_trained_projector_equal_merge_and_unload():
    """TR-DPO's sync reads the policy's effective weights: LoRA deltas added, the projector's trained copy
    (modules_to_save) in place of the original."""
    from alignpipe.dpo.tr_dpo import merged_weights

    model = tiny_vlm(tiny_vlm_processor(), seed=2)
    peft_model = apply_vision_lora(model, PeftParams(enabled=True, r=2, alpha=4), "language_model+projector")
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.add_(torch.randn_like(p))
    got = {k: v.detach().clone() for k, v in merged_weights(peft_model).items()}
    plain = dict(peft_model.merge_and_unload().named_parameters())
    assert got.keys() == plain.keys()
    for key, value in plain.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5)


# --- the dpo stage on the VLM: LoRA, a live reference ---


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "vlm")


@pytest.fixture(scope="module")
def dpo_inputs(vlm_dir, tmp_path_factory):
    """data/pairs (6 train colour pairs, 1 eval) with images and their ref_logps (float32)."""
    return write_dpo_inputs(vlm_dir, tmp_path_factory.mktemp("vlm_dpo"))


def _dpo(vlm_dir, inputs, run, **kw):
    from alignpipe.dpo.stage import run_dpo

    settings = dict(loss_type="sigmoid", max_length=64, max_prompt_length=32, batch_size=2, learning_rate=1e-2,
                    lr_scheduler="constant", dtype="float32", logging_steps=1, eval_steps=100, save_steps=100,
                    max_steps=3, gradient_checkpointing=False)  # fmt: skip
    return run_dpo(vlm_dir, inputs / "pairs", inputs / "ref.parquet", run / "dpo", run / "checkpoints",
                   run / "reports", DpoParams(**{**settings, **kw}))  # fmt: skip


def _losses(run) -> list[float]:
    with (run / "reports/plots/metrics/loss.tsv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f, delimiter="\t")]


def test_dpo_lora_on_a_vlm_moves_only_the_adapted_linears_and_the_projector(vlm_dir, dpo_inputs, tmp_path):
    """dpo.peft on a VLM with vlm_trainable language_model+projector (activation checkpointing on, as by
    default): step-1 loss ln 2 (LoRA adds exact zeros), the adapter keeps the projector as
    modules_to_save, and the merged folder (loaded through the Auto classes) differs from the SFT model
    only in the language model's adapted linears and the projector."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run = tmp_path / "lora"
    peft = {"enabled": True, "r": 2, "alpha": 4, "dropout": 0.0}
    summary = _dpo(
        vlm_dir,
        dpo_inputs,
        run,
        peft=peft,
        vlm_trainable="language_model+projector",
        gradient_checkpointing=True,
    )  # dpo's default
    assert summary["steps"] == 3 and _losses(run)[0] == pytest.approx(math.log(2), abs=1e-6)
    config = json.loads((run / "dpo/adapter/adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.multi_modal_projector"]
    before, after = (
        load_file(str(vlm_dir / "model.safetensors")),
        load_file(str(run / "dpo/model.safetensors")),
    )
    assert before.keys() == after.keys()  # merged: no lora_ or modules_to_save names
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k.split(".")[0] for k in moved} == {"language_model", "multi_modal_projector"}
    assert all(k.endswith("_proj.weight") for k in moved if k.startswith("language_model."))
    AutoProcessor.from_pretrained(run / "dpo")
    loaded = AutoModelForImageTextToText.from_pretrained(run / "dpo")
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"


@pytest.mark.parametrize(
    "peft", [{}, {"enabled": True, "r": 2, "alpha": 4, "dropout": 0.0}], ids=["full", "lora"]
)
def test_dpo_live_reference_on_a_vlm_gives_the_precomputed_losses(vlm_dir, dpo_inputs, tmp_path, peft):
    """dpo.reference: live on a VLM (a frozen VLM scorer, the pairs' images through its own tower): step-1
    loss ln 2, the same losses as the precomputed reference over 3 steps and the same weights."""
    pre, live = tmp_path / "pre", tmp_path / "live"
    _dpo(vlm_dir, dpo_inputs, pre, peft=peft)
    _dpo(vlm_dir, dpo_inputs, live, peft=peft, reference="live")
    assert _losses(live)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(_losses(pre)[-1] - math.log(2)) > 1e-3  # the policy moved off the reference
    torch.testing.assert_close(torch.tensor(_losses(live)), torch.tensor(_losses(pre)), atol=1e-5, rtol=0)
    a, b = load_file(str(pre / "dpo/model.safetensors")), load_file(str(live / "dpo/model.safetensors"))
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], atol=1e-5, rtol=0)


def test_tr_dpo_on_a_lora_vlm_moves_the_live_reference(vlm_dir, dpo_inputs, tmp_path):
    """TR-DPO (ref_sync_steps: 1) with LoRA and a trained projector on a VLM: step 1 is ln 2; after the
    sync the reference is no longer the SFT model, so the losses part from a run without sync."""
    kw = dict(peft={"enabled": True, "r": 2, "alpha": 4, "dropout": 0.0}, vlm_trainable="language_model+projector",
              reference="live")  # fmt: skip
    _dpo(vlm_dir, dpo_inputs, tmp_path / "plain", **kw)
    _dpo(vlm_dir, dpo_inputs, tmp_path / "sync", ref_sync_steps=1, ref_sync_alpha=0.5, **kw)
    plain, synced = _losses(tmp_path / "plain"), _losses(tmp_path / "sync")
    assert synced[0] == pytest.approx(math.log(2), abs=1e-6) and plain[0] == pytest.approx(
        synced[0], abs=1e-7
    )
    assert abs(synced[1] - plain[1]) > 1e-4


@pytest.mark.parametrize("trainable,prefixes", [
    ("language_model+projector", {"language_model", "multi_modal_projector"}),
    ("all", {"language_model", "multi_modal_projector", "vision_tower"}),
])  # fmt: skip
def test_the_stages_read_vlm_trainable(vlm_dir, dpo_inputs, tmp_path, trainable, prefixes):
    """sft and dpo (full fine-tuning) move exactly the parts vlm_trainable names."""
    from sft_helpers import quick, sft_paths

    from alignpipe.sft.stage import run_sft

    rows = [{"id": f"s-{c}", "prompt": QUESTION, "completion": [{"role": "assistant", "content": c}],
             "meta": None, "images": [{"bytes": square_png(rgb), "path": None}]} for c, rgb in COLOURS.items()]  # fmt: skip
    paths = sft_paths(tmp_path / "sft", vlm_dir, rows + rows, with_images(schema.SFT))
    run_sft(quick(max_steps=2, batch_size=3, vlm_trainable=trainable), paths)
    _dpo(vlm_dir, dpo_inputs, tmp_path / "dpo", vlm_trainable=trainable)
    before = load_file(str(vlm_dir / "model.safetensors"))
    for out in (paths.out, tmp_path / "dpo/dpo"):
        after = load_file(str(out / "model.safetensors"))
        moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
        assert moved == prefixes, out
