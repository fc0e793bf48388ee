"""Fused against separate projections at SmolLM2-135M's widths: do fewer, larger matmuls help on CPU?

Issue 21 asks what would close the gap to 2.5x TRL tuned. One candidate is fusing a decoder layer's
q/k/v projections into one (576 -> 576 + 192 + 192) and gate/up into one (576 -> 2 x 1536), as
vLLM and Liger do. This times forward + backward (input and weight gradients) of both layouts on
``rows`` tokens, the median of ``--repeats`` after a warm-up, and reports each one's fraction of the
measured matmul peak (the 2048^3 matmul of ``bench/dpo_throughput.py --fraction-of-peak``):

    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/projection_fusion.py --results bench/results/DATE-MACHINE-fusion.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from dpo_throughput import cpu_name, head_commit, matmul_gflops

HIDDEN, Q, KV, INTERMEDIATE = 576, 576, 192, 1536  # SmolLM2-135M: 9 query heads, 3 key/value heads of 64
LAYOUTS = {"qkv": (Q, KV, KV), "gate_up": (INTERMEDIATE, INTERMEDIATE)}


def fwd_bwd_seconds(x: torch.Tensor, widths: tuple[int, ...], fused: bool, repeats: int) -> float:
    """Median seconds of y = x W^T for the output ``widths`` (one weight when ``fused``), then backward."""
    mods = [torch.nn.Linear(HIDDEN, sum(widths), bias=False)] if fused else [
        torch.nn.Linear(HIDDEN, w, bias=False) for w in widths
    ]  # fmt: skip

    def step() -> None:
        x.grad = None
        sum(m(x).sum() for m in mods).backward()

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1024,2048,3072", help="tokens per matmul (a packed batch's rows)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--results", help="write the results file here")
    args = p.parse_args()
    torch.manual_seed(0)
    peak = matmul_gflops(torch.float32, 2048)
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, HIDDEN, requires_grad=True)
        for name, widths in LAYOUTS.items():
            flop = 6 * rows * HIDDEN * sum(widths)  # forward 2, input grad 2, weight grad 2
            line = {"rows": rows, "projection": name}
            for layout in ("separate", "fused"):
                seconds = fwd_bwd_seconds(x, widths, layout == "fused", args.repeats)
                line[f"{layout}_ms"] = round(seconds * 1e3, 3)
                line[f"{layout}_fraction_of_peak"] = round(flop / seconds / 1e9 / peak, 3)
            line["speedup_fused"] = round(line["separate_ms"] / line["fused_ms"], 3)
            print(json.dumps(line), flush=True)
            results.append(line)
    if args.results:
        data = dict(date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00"), commit=head_commit(),
                    cpu=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads(),
                    command="bench/projection_fusion.py", peak_matmul_gflops={"float32": peak},
                    results=results)  # fmt: skip
        Path(args.results).write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
