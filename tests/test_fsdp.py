"""FSDP: the dpo scorer's decoder layers become FSDP units (accelerate's TRANSFORMER_BASED_WRAP policy),
and FSDP2 ``fully_shard`` runs on 2 CPU processes over gloo (tests/fsdp_probe.py under torchrun)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from launch import env, free_port
from transformers import AutoModelForCausalLM

from alignpipe.core.logprobs import CompletionScorer
from alignpipe.testing import tiny_model

PROBE = Path(__file__).with_name("fsdp_probe.py")


def test_the_wrap_policy_picks_every_decoder_layer_of_the_scorer(tokenizer):
    """accelerate reads ``_no_split_modules`` from the module it prepares: the scorer passes on the
    inner model's (without it no layer was wrapped and every forward gathered the whole model)."""
    scorer = CompletionScorer(tiny_model(tokenizer, num_hidden_layers=3))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, scorer)
    picked = [type(m).__name__ for m in scorer.modules() if policy(m)]
    assert picked == ["LlamaDecoderLayer"] * 3


def test_fsdp2_shards_the_scorer_on_two_cpu_processes(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    done = subprocess.run(
        [*cmd, str(PROBE), str(tmp_path)], env=env(2), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "probe.json").read_text())
    assert report["units"] == {"LlamaDecoderLayer": 2, "CompletionScorer": 1}  # 2 layers + the root
    assert report["sharded_params"] == report["params"] == 20  # every parameter is a DTensor shard
    assert report["loss"] == report["expected_loss"] and report["max_grad_diff"] < 1e-6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # the gathered full state dict
    assert sum(p.numel() for p in model.parameters()) > 0 and not list((tmp_path / "model").glob("*.bin"))
