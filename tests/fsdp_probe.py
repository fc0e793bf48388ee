"""FSDP2 on CPU (gloo), run by tests/test_fsdp.py under ``torchrun --nproc_per_node 2``.

accelerate 1.15 applies FSDP only to GPU processes (its MULTI_CPU state skips the FSDP plugin), so this
probe does what ``accelerator.prepare`` does under configs/accelerate/fsdp.yaml: accelerate's own
TRANSFORMER_BASED_WRAP policy picks the units of the dpo scorer, ``fully_shard`` shards them and the
root. It checks one forward and backward against the unsharded model, and saves the gathered full state
dict the way the dpo stage does (``training.loop.save_model``). Writes ``<out>/probe.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from alignpipe.core.logprobs import CompletionScorer
from alignpipe.testing import tiny_model, tiny_tokenizer
from alignpipe.training.launch import fsdp_units
from alignpipe.training.loop import save_model


def loss_and_grads(scorer: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    n = ids.shape[1]
    logps, _ = scorer(ids, torch.arange(n)[None], None, torch.arange(n - 1), ids[0, 1:])
    logps.sum().backward()
    grads = {}
    for name, p in scorer.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.detach().clone()
    return logps.sum().item(), grads


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tokenizer = tiny_tokenizer()
    ids = torch.randint(0, len(tokenizer), (1, 24), generator=torch.Generator().manual_seed(0))
    expected, expected_grads = loss_and_grads(CompletionScorer(tiny_model(tokenizer, seed=1)), ids)

    scorer = CompletionScorer(tiny_model(tokenizer, seed=1))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, scorer)
    for module in [m for m in scorer.modules() if policy(m)]:
        fully_shard(module, mesh=mesh)
    fully_shard(scorer, mesh=mesh)
    sharded = [n for n, p in scorer.named_parameters() if p.to_local().shape != p.shape]  # DTensor shards
    loss, grads = loss_and_grads(scorer, ids)
    worst = max((grads[k] - expected_grads[k]).abs().max().item() for k in grads)

    state = get_model_state_dict(scorer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        full = {k.removeprefix("model."): v for k, v in state.items()}
        save_model(scorer.model, full, tokenizer, out / "model")
        report = {
            "units": dict(fsdp_units(scorer)),
            "fsdp_modules": sum(isinstance(m, FSDPModule) for m in scorer.modules()),
            "sharded_params": len(sharded),
            "params": len(grads),
            "loss": loss,
            "expected_loss": expected,
            "max_grad_diff": worst,
        }
        (out / "probe.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
