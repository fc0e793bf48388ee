"""fp32 vs bf16 autocast vs pure bf16 on this CPU: SmolLM2-135M-shaped forward + backward, and matmul peaks.

    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/dtype_cpu.py --batch 2 --seq 128 --repeats 3 \\
        --json-out bench/results/DATE-MACHINE-dtype.json

The model is the ``smollm2-135m`` shape of bench/dpo_throughput.py, random-initialised; the loss is
the LM loss on random token ids. Each repeat runs the three modes back to back (interleaved, so a
load change hits all three alike); a warm-up step per mode is not timed. ``matmul`` gives the
measured matmul peak (GFLOP/s) of each dtype on the same cores (bench/dpo_throughput.py
``--fraction-of-peak`` uses it). Output: one JSON object with medians, min and max.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
MODES = ("fp32", "bf16_autocast", "bf16_pure")


def _bench_module() -> Any:
    spec = importlib.util.spec_from_file_location("dpo_throughput", HERE / "dpo_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dpo_throughput"] = module
    spec.loader.exec_module(module)
    return module


def step_seconds(model: Any, ids: torch.Tensor, mode: str) -> float:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16_autocast" else contextlib.nullcontext()
    start = time.perf_counter()
    with ctx:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a shape of bench/dpo_throughput.py")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    bench = _bench_module()
    tokenizer = bench.bench_tokenizer(args.model)
    models = {}
    for mode in modes:
        model = bench.build_model(args.model, tokenizer, seed=0)
        models[mode] = model.to(torch.bfloat16) if mode == "bf16_pure" else model
    torch.manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (args.batch, args.seq))
    for mode in modes:
        step_seconds(models[mode], ids, mode)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    load = [os.getloadavg()]
    for _ in range(args.repeats):
        for mode in modes:
            times[mode].append(step_seconds(models[mode], ids, mode))
    load.append(os.getloadavg())
    peak = {str(d).removeprefix("torch."): bench.matmul_gflops(d) for d in (torch.float32, torch.bfloat16)}
    fp32 = statistics.median(times["fp32"]) if "fp32" in times else None
    result = dict(
        date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00"), machine=platform.node(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__,
        threads=torch.get_num_threads(), shape=args.model, batch=args.batch, seq=args.seq,
        repeats=args.repeats, load_average=load, matmul_gflops_1024=peak,
        modes={m: dict(median_s=statistics.median(t), min_s=min(t), max_s=max(t), runs=t,
                       speedup_vs_fp32=(fp32 / statistics.median(t)) if fp32 else None)
               for m, t in times.items()},
    )  # fmt: skip
    print(json.dumps(result), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
