"""The dtype policy: what ``dtype: auto`` means on this machine, and the master-weight dtype of training.

``auto`` is decided here once for every stage (training, reference log-probs, generation, scoring):

- on a GPU: bfloat16;
- on a CPU: bfloat16 only where the CPU has AMX (``amx_bf16`` in ``/proc/cpuinfo``, or torch's AMX
  tile check), or, when ``ALIGNPIPE_CPU_BF16_PROBE=1`` asks for it, where a start-up matmul
  micro-benchmark finds bf16 at least :data:`PROBE_MIN_SPEEDUP` times faster than fp32; float32
  otherwise. The decision is logged once per process.

Why AMX and not just "bf16 instructions": on AVX2-only CPUs bf16 is emulated (a bf16 matmul ran at
0.96 GFLOP/s against 26 in fp32, bench/NOTES.md), and AMX machines gained 1.8-2.6x (issue 21).
CPUs with ``avx512_bf16`` but no AMX (AMD EPYC Zen 4/5) sit in between: bf16 was measured faster
there too (bench/results/2026-12-01-amd-epyc-2c-dtype.json), so the probe can take it, but it stays
opt-in: a probe timed under load could decide differently in ``ref_logps`` and in ``dpo``, and the
reference log-probs must be computed as the policy computes (step-1 loss ln 2).

Tolerances of bf16 against fp32 (tests/test_precision.py: a tiny llama, 8 AdamW steps of the LM loss
on one fixed batch, fp32 master weights): bf16 autocast within 2e-3 of the fp32 loss at every step,
pure bf16 weights within 1e-2, while the loss moves by more than 0.2 (measured 1e-4 and 3.5e-3).
bf16 is another numeric path: losses are close, never bitwise equal.

Full fine-tuning keeps float32 master weights and computes under autocast (bf16 or fp16 from
``<stage>.dtype``), so small updates are not rounded away. LoRA keeps the frozen base in bf16 when
the compute dtype is bf16 (the adapters stay float32, as peft makes them); QLoRA's 4-bit base
computes in bf16. fp16 never stores weights: its range is too small for them.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from alignpipe.params import TrainParams

PROBE_ENV = "ALIGNPIPE_CPU_BF16_PROBE"
PROBE_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 clearly: a probe inside the noise keeps fp32
NAMED = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CpuFacts:
    """What the CPU decision reads: AMX (cpuinfo flag or torch's check), and a probe's bf16 speedup."""

    amx_bf16: bool
    probe_speedup: float | None = None  # fp32 seconds / bf16 seconds of the probe; None: not run


def cpu_auto_dtype(facts: CpuFacts) -> tuple[torch.dtype, str]:
    """``auto`` on a CPU: the dtype and the reason (logged)."""
    if facts.amx_bf16:
        return torch.bfloat16, "the CPU has AMX (amx_bf16)"
    if facts.probe_speedup is not None and facts.probe_speedup >= PROBE_MIN_SPEEDUP:
        return torch.bfloat16, f"no AMX, but the start-up probe found bf16 {facts.probe_speedup:.2f}x fp32"
    if facts.probe_speedup is not None:
        return (
            torch.float32,
            f"no AMX, and the start-up probe found bf16 only {facts.probe_speedup:.2f}x fp32",
        )
    return torch.float32, f"no AMX (set {PROBE_ENV}=1 to let a start-up matmul probe decide)"


def cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first ``flags`` line of ``/proc/cpuinfo`` (empty where there is none: not Linux)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def has_amx(flags: set[str], torch_amx: bool) -> bool:
    return "amx_bf16" in flags or torch_amx


def probe_bf16_speedup(n: int = 512, repeats: int = 5) -> float:
    """fp32 seconds / bf16 seconds of the best of ``repeats`` n x n matmuls (about 0.1 s in all)."""
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


def _torch_amx() -> bool:
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else False


@cache
def cpu_facts() -> CpuFacts:
    amx = has_amx(cpuinfo_flags(), _torch_amx())
    probe = probe_bf16_speedup() if not amx and os.environ.get(PROBE_ENV) == "1" else None
    return CpuFacts(amx, probe)


@cache
def _cpu_auto() -> torch.dtype:
    dtype, reason = cpu_auto_dtype(cpu_facts())
    print(f"alignpipe: dtype auto on CPU is {str(dtype).removeprefix('torch.')}: {reason}", file=sys.stderr)
    return dtype


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """``auto``: bf16 on a GPU, on a CPU as :func:`cpu_auto_dtype` decides; otherwise the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else _cpu_auto()
    return NAMED[dtype]


def compute_dtype(params: TrainParams, device: torch.device | str | None = None) -> torch.dtype:
    """The autocast dtype of the forward and backward passes (``auto``: see :func:`resolve_dtype`)."""
    return resolve_dtype(params.dtype, device if device is not None else default_device())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def weights_dtype(params: TrainParams, device: torch.device | str | None = None) -> str:
    """The dtype the trained model is loaded (and saved) in."""
    if params.peft.load_in_4bit:
        return "bfloat16"
    if params.peft.enabled and compute_dtype(params, device) == torch.bfloat16:
        return "bfloat16"
    return "float32"
