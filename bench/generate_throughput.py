"""Best-of-N generation throughput: alignpipe's hf and vllm backends next to HF ``generate``.

    python bench/generate_throughput.py --model models/sft --prompts 64 --n 8 --max-new-tokens 256

Prompts come from the built-in task (train split), rendered with the model's chat
template; every engine samples the same token ids at temperature 0.8. Engines:
``hf`` (alignpipe's loop), ``hf_generate`` (the anchor: ``model.generate`` with
``num_return_sequences=n``, left padding, same batches) and ``vllm`` (GPU, when
importable). Prints one JSON line per engine (generated tokens / wall seconds,
model load excluded, one untimed warm-up batch first; also CPU seconds, which
stay meaningful on a shared machine) and a ratio line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from alignpipe.core.models import load_causal_lm, resolve_dtype
from alignpipe.data.builtin import make_items
from alignpipe.generation.base import build_requests, vllm_importable
from alignpipe.generation.hf import HFBackend
from alignpipe.generation.load import load_chat_tokenizer
from alignpipe.params import SamplingParams


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--prompts", type=int, default=64, help="number of prompts")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per HF batch")
    p.add_argument("--engines", default="hf,hf_generate,vllm", help="comma-separated subset")
    return p.parse_args()


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def bench_hf(args, settings, tokenizer, requests, device) -> dict:
    model = load_causal_lm(args.model, dtype=settings.dtype, device=device)
    backend = HFBackend(model, tokenizer, settings)
    backend.generate(requests[: min(2, len(requests))], 2)  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    samples = backend.generate(requests, args.n)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return dict(
        tokens=sum(s.n_tokens for s in samples), seconds=seconds, cpu_seconds=cpu, samples=len(samples)
    )


@torch.inference_mode()
def bench_hf_generate(args, settings, tokenizer, requests, device) -> dict:
    model = load_causal_lm(args.model, dtype=settings.dtype, device=device).eval()
    pad = tokenizer.pad_token_id
    kwargs = dict(
        do_sample=True,
        temperature=settings.temperature,
        top_p=1.0,
        top_k=0,
        max_new_tokens=settings.max_new_tokens,
        num_return_sequences=args.n,
        pad_token_id=pad,
    )
    order = sorted(requests, key=lambda r: len(r.token_ids))
    batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]

    def run(batch, **extra) -> int:
        width = max(len(r.token_ids) for r in batch)
        ids = torch.tensor([[pad] * (width - len(r.token_ids)) + r.token_ids for r in batch], device=device)
        mask = (
            torch.arange(width, device=device)[None]
            >= torch.tensor([width - len(r.token_ids) for r in batch], device=device)[:, None]
        ).long()
        out = model.generate(input_ids=ids, attention_mask=mask, **{**kwargs, **extra})
        new = out[:, width:]
        ended = (new == tokenizer.eos_token_id).cumsum(-1)  # count up to and including the first EOS
        return int(((ended == 0) | ((ended == 1) & (new == tokenizer.eos_token_id))).sum())

    run(batches[0][:2], num_return_sequences=2)  # warm-up
    torch.manual_seed(0)
    start, cpu = time.perf_counter(), time.process_time()
    tokens = sum(run(b) for b in batches)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return dict(tokens=tokens, seconds=seconds, cpu_seconds=cpu, samples=len(requests) * args.n)


def bench_vllm(args, settings, tokenizer, requests, device) -> dict:
    from alignpipe.generation.vllm import VllmBackend

    backend = VllmBackend(args.model, settings)
    backend.generate(requests[:2], 2)  # warm-up (CUDA graphs are captured at load)
    start, cpu = time.perf_counter(), time.process_time()
    samples = backend.generate(requests, args.n)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    backend.close()
    return dict(
        tokens=sum(s.n_tokens for s in samples), seconds=seconds, cpu_seconds=cpu, samples=len(samples)
    )


def main() -> None:
    args = parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    settings = SamplingParams(
        backend="hf",
        temperature=0.8,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        dtype=args.dtype,
    )
    tokenizer = load_chat_tokenizer(args.model)
    items = make_items("prompts", args.prompts, seed=0)
    prompts = [[{"role": "user", "content": item.instruction}] for item in items]
    requests = build_requests(tokenizer, prompts, [item.id for item in items], seed=0)
    engines = {"hf": bench_hf, "hf_generate": bench_hf_generate, "vllm": bench_vllm}
    wanted = [e for e in args.engines.split(",") if e]
    if "vllm" in wanted and not (vllm_importable() and device.type == "cuda"):
        print("vllm: skipped (needs vLLM and a CUDA device)", file=sys.stderr)
        wanted.remove("vllm")
    base = dict(
        model=os.path.basename(os.path.normpath(args.model)),
        prompts=args.prompts,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        batch_prompts=args.batch_size,
        device=str(device),
        dtype=str(resolve_dtype(args.dtype, device)).removeprefix("torch."),
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
        gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
    )
    rates = {}
    for name in wanted:
        result = engines[name](args, settings, tokenizer, requests, device)
        rates[name] = result["tokens"] / result["seconds"]
        # tokens per CPU second divided by threads: what the run would reach on idle cores
        emit(
            dict(
                base,
                engine=name,
                tokens=result["tokens"],
                samples=result["samples"],
                seconds=round(result["seconds"], 2),
                tokens_per_s=round(rates[name], 1),
                cpu_seconds=round(result["cpu_seconds"], 2),
                tokens_per_cpu_s=round(result["tokens"] / result["cpu_seconds"], 1),
            )
        )
    ratios = {f"{a}/{b}": round(rates[a] / rates[b], 2) for a in rates for b in rates if a != b and b != "hf"}
    emit(dict(engine="ratio", **ratios))


if __name__ == "__main__":
    main()
