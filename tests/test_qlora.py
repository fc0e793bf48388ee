"""QLoRA on CPU: LoRA on an NF4 4-bit base (bitsandbytes' CPU backend) for the sft and dpo stages,
with dpo's reference log-probs computed from the same 4-bit numerics (step-1 loss ln 2)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from launch import metrics, run_stage, save_model, tsv, write_data
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignpipe.artifacts.io import read_parquet

PEFT = {"enabled": True, "load_in_4bit": True, "r": 4, "alpha": 8, "dropout": 0.0}
DPO = dict(
    max_length=64, max_prompt_length=32, batch_size=8, learning_rate=5e-3, lr_scheduler="constant",
    logging_steps=1, eval_steps=100, save_steps=100, max_steps=2, gradient_checkpointing=False, peft=PEFT,
    loss_type="sigmoid",  # ln 2 at step 1 is the sigmoid loss (the default adds the chosen NLL)
)  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("qlora")
    model = save_model(root / "model", hidden_size=64, intermediate_size=128)
    write_data(root, n_train=8, n_eval=0, n_sft=8)
    (root / "pairs" / "eval.parquet").unlink()
    return SimpleNamespace(root=root, model=model, pairs=root / "pairs")


def test_the_4bit_base_has_nf4_linear_layers_on_cpu(ws):
    import bitsandbytes as bnb

    from alignpipe.core.models import load_causal_lm_4bit

    model = load_causal_lm_4bit(ws.model, torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q k v o gate up down in each of the 2 decoder layers
    assert {m.weight.quant_type for m in layers} == {"nf4"} and not any(
        p.requires_grad for p in model.parameters()
    )


def merged_and_plain(folder) -> dict[str, torch.Tensor]:
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # plain merged weights, not a bitsandbytes checkpoint
    AutoModelForCausalLM.from_pretrained(folder)
    return load_file(str(folder / "model.safetensors"))


def test_sft_qlora_trains_and_writes_a_plain_merged_model(ws):
    run = ws.root / "sft"
    section = {"sft": {"max_steps": 3, "batch_size": 4, "learning_rate": 2e-2, "logging_steps": 1, "save_steps": 100,
                       "max_length": 64, "peft": PEFT}}  # fmt: skip
    paths = {"model": ws.model, "data": ws.root / "sft.parquet", "out": run / "out",
             "checkpoints": run / "ckpt", "metrics_dir": run / "reports"}  # fmt: skip
    run_stage(run, "sft", section, paths)
    losses = tsv(run / "reports/plots/metrics/train/loss.tsv")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    merged, base = merged_and_plain(run / "out"), load_file(str(ws.model / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert merged[q].dtype == torch.bfloat16 and not torch.equal(
        merged[q].float(), base[q].bfloat16().float()
    )


def ref_logps(ws, name: str, dtype: str) -> list[dict]:
    out = ws.root / f"{name}.parquet"
    section = {"ref_logps": {"batch_size": 4, "dtype": dtype}, "dpo": DPO}
    run_stage(ws.root / name, "ref_logps", section, {"model": ws.model, "pairs": ws.pairs, "out": out})
    return read_parquet(out)


def test_dpo_qlora_reference_from_the_4bit_base_gives_ln2_and_it_trains(ws):
    four_bit, full = ref_logps(ws, "ref-auto", "auto"), ref_logps(ws, "ref-fp32", "float32")
    gaps = [abs(a["ref_chosen_logps"] - b["ref_chosen_logps"]) for a, b in zip(four_bit, full, strict=True)]
    assert max(gaps) > 1e-2  # auto follows dpo.peft.load_in_4bit: the reference is the 4-bit base's
    run = ws.root / "dpo"
    paths = {"model": ws.model, "pairs": ws.pairs, "ref_logps": ws.root / "ref-auto.parquet", "out": run / "out",
             "checkpoints": run / "ckpt", "metrics_dir": run / "reports"}  # fmt: skip
    run_stage(run, "dpo", {"dpo": DPO}, paths)
    losses = tsv(run / "reports/plots/metrics/loss.tsv")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference, computed alike
    assert losses[1] < losses[0]
    assert metrics(run / "reports")["steps"] == 2 and (run / "out" / "adapter").is_dir()
    merged_and_plain(run / "out")
