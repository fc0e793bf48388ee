"""Best-of-N generation throughput: vLLM, alignpipe's HF loop, HF ``generate`` and ``generate_batch``.

    python bench/generate_throughput.py --model models/base --prompts 32 --n 4 --max-new-tokens 48 \
        --repeats 3 --json-out bench/results/DATE-MACHINE.json

One run, the same prompts for every engine: the built-in task's train prompts rendered with
the model's chat template and tokenized once, here; every engine samples those token ids
at temperature 0.8, top-k/p off. Engines:

- ``hf``: alignpipe's loop (:class:`alignpipe.generation.hf.HFBackend`).
- ``hf_generate``: ``model.generate`` with ``num_return_sequences=n``, left padding,
  batches of ``--batch-size`` prompts sorted by length.
- ``hf_generate_batch``: transformers' continuous batching (``model.generate_batch``,
  paged KV cache), the strongest HF baseline.
- ``vllm``: alignpipe's vLLM backend. vLLM needs its own environment (``make vllm-env``):
  it runs in a subprocess of ``--vllm-python`` (default ``.venv-vllm/bin/python``; this
  interpreter when it imports vLLM), which gets the token ids from here. Its engine start
  is reported apart. ``--vllm-bind all`` also runs it with its worker bound to every core
  (by default vLLM keeps one core for its scheduler).

Each engine loads once, runs one untimed warm-up, then ``--repeats`` timed runs of every
prompt (same seeds, so the same work): tokens/s (generated tokens, EOS included, over wall
seconds), tokens per CPU second (meaningful on a shared machine) and, per engine, median,
min and max. Ratios are of the medians. ``uptime``'s load average is recorded around each
engine: the machine may be shared. The vLLM worker also measures whether a prompt's samples
change when it is sampled alone instead of in the batch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
ENGINES = ("vllm", "hf", "hf_generate", "hf_generate_batch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--prompts", type=int, default=32, help="number of prompts")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per HF batch")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads of the HF engines (default: torch's)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine")
    p.add_argument(
        "--repeats-generate-batch", type=int, default=None, help="its own count (default: --repeats)"
    )
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset")
    p.add_argument("--vllm-python", default=None, help="interpreter with vLLM (default: see above)")
    p.add_argument("--vllm-bind", default="auto", choices=["auto", "all", "both"], help="vLLM CPU binding")
    p.add_argument("--json-out", default=None, help="write the whole run as one JSON file")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # vLLM side: requests JSON path
    return p.parse_args(argv)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        flags = next(
            (line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), []
        )
        name = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
        isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
        return f"{name}, {os.cpu_count()} cores, {isa}"
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def git_commit() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return proc.stdout.strip() + ("+dirty" if dirty else "")


def summarize(name: str, runs: list[dict]) -> dict:
    rates = [r["tokens_per_s"] for r in runs]
    return dict(
        engine=name,
        tokens_per_s=round(statistics.median(rates), 1),
        tokens_per_s_min=round(min(rates), 1),
        tokens_per_s_max=round(max(rates), 1),
        tokens_per_cpu_s=round(statistics.median(r["tokens_per_cpu_s"] for r in runs), 1),
        tokens=runs[0]["tokens"],
        repeats=len(runs),
    )


def timed(fn, cpu_seconds) -> dict:
    """Run ``fn`` (returns generated tokens) once: tokens, wall and CPU seconds."""
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = fn()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return dict(tokens=tokens, seconds=round(seconds, 2), tokens_per_s=round(tokens / seconds, 1),
                cpu_seconds=round(cpu, 2), tokens_per_cpu_s=round(tokens / max(cpu, 1e-9), 1))  # fmt: skip


# ------------------------------------------------------------------ HF engines (this interpreter)


def hf_engines(args, settings, tokenizer, requests, device, record_cb: dict) -> dict:
    import torch

    from alignpipe.core.models import load_causal_lm
    from alignpipe.generation.hf import HFBackend

    def loop():
        backend = HFBackend(
            load_causal_lm(args.model, dtype=settings.dtype, device=device), tokenizer, settings
        )
        backend.generate(requests[:2], 2)  # warm-up
        return lambda: sum(s.n_tokens for s in backend.generate(requests, args.n))

    def generate():
        model = load_causal_lm(args.model, dtype=settings.dtype, device=device).eval()
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        kwargs = dict(do_sample=True, temperature=settings.temperature, top_p=1.0, top_k=0,
                      max_new_tokens=settings.max_new_tokens, num_return_sequences=args.n, pad_token_id=pad)  # fmt: skip
        order = sorted(requests, key=lambda r: len(r.token_ids))
        batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]

        @torch.inference_mode()
        def run(batch, **extra) -> int:
            width = max(len(r.token_ids) for r in batch)
            ids = torch.tensor(
                [[pad] * (width - len(r.token_ids)) + r.token_ids for r in batch], device=device
            )
            starts = torch.tensor([width - len(r.token_ids) for r in batch], device=device)
            mask = (torch.arange(width, device=device)[None] >= starts[:, None]).long()
            new = model.generate(input_ids=ids, attention_mask=mask, **{**kwargs, **extra})[:, width:]
            ended = (new == eos).cumsum(-1)  # tokens up to and including the first EOS
            return int(((ended == 0) | ((ended == 1) & (new == eos))).sum())

        run(batches[0][:2], num_return_sequences=2)  # warm-up

        def timed_run() -> int:
            torch.manual_seed(0)
            return sum(run(b) for b in batches)

        return timed_run

    def generate_batch():
        """Sized to the workload: one decode step of every sample fits one batch, the cache holds every
        sample. Its default sizes the cache from free RAM and pads every step to 8192 tokens, which
        on CPU is slower still (a step then attends over the whole cache)."""
        from transformers import ContinuousBatchingConfig, GenerationConfig

        model = load_causal_lm(args.model, dtype=settings.dtype, device=device).eval()
        config = GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=1.0, top_k=0,
                                  max_new_tokens=settings.max_new_tokens, num_return_sequences=args.n,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        inputs = [list(r.token_ids) for r in requests]
        page = 32
        per_sample = -(-(max(len(i) for i in inputs) + settings.max_new_tokens) // page)
        cb = ContinuousBatchingConfig(page_size=page, num_blocks=len(inputs) * args.n * per_sample,
                                      max_batch_tokens=min(256, len(inputs) * args.n))  # fmt: skip
        record_cb.update(page_size=page, num_blocks=cb.num_blocks, max_batch_tokens=cb.max_batch_tokens)
        model.generate_batch(
            inputs=inputs[:2], generation_config=config, continuous_batching_config=cb
        )  # warm-up

        def timed_run() -> int:
            torch.manual_seed(0)
            out = model.generate_batch(inputs=inputs, generation_config=config, continuous_batching_config=cb)
            if len(out) != len(inputs) * args.n or any(o.error for o in out.values()):
                raise RuntimeError(f"generate_batch returned {len(out)} of {len(inputs) * args.n} samples")
            return sum(len(o.generated_tokens) for o in out.values())

        return timed_run

    return {"hf": loop, "hf_generate": generate, "hf_generate_batch": generate_batch}


# ------------------------------------------------------------------ vLLM (its own interpreter)


def vllm_worker(args) -> None:
    """In vLLM's environment: start the engine, warm up, time the repeats, check batch invariance."""
    import psutil

    from alignpipe.generation.base import PromptRequest
    from alignpipe.generation.vllm import VllmBackend
    from alignpipe.params import SamplingParams

    job = json.loads(Path(args.worker).read_text())
    settings = SamplingParams(**job["settings"])
    requests = [PromptRequest(**r) for r in job["requests"]]
    me = psutil.Process()

    def cpu_seconds() -> float:  # this process and the engine's (EngineCore, workers)
        procs = [me, *me.children(recursive=True)]
        return sum(sum(p.cpu_times()[:2]) for p in procs if p.is_running())

    start = time.perf_counter()
    backend = VllmBackend(args.model, settings)
    engine_start = time.perf_counter() - start
    backend.generate(requests[:2], 2)  # warm-up
    batched: list = []

    def run_once() -> int:
        batched[:] = backend.generate(requests, args.n)
        return sum(s.n_tokens for s in batched)

    runs = [timed(run_once, cpu_seconds) for _ in range(args.repeats)]
    # Batch invariance: the first prompts sampled alone, one call each, against the batched run.
    alone = [s for r in requests[: job["alone"]] for s in backend.generate([r], args.n)]
    same = [
        (a.completion, a.n_tokens) == (b.completion, b.n_tokens) for a, b in zip(alone, batched, strict=False)
    ]
    gaps = [
        abs(a.logprob - b.logprob)
        for a, b in zip(alone, batched, strict=False)
        if a.completion == b.completion
    ]
    backend.close()
    result = dict(
        engine_start_s=round(engine_start, 1),
        runs=runs,
        device=backend.device,
        env={k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
        batch_invariance=dict(
            prompts=job["alone"],
            samples=len(same),
            identical=sum(same),
            max_logprob_gap_when_identical=max(gaps) if gaps else None,
        ),  # fmt: skip
    )
    Path(job["out"]).write_text(json.dumps(result))


def run_vllm(args, settings, requests, python: str, bind: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        out = Path(tmp) / "out.json"
        job.write_text(json.dumps(dict(
            settings=settings.model_dump(), out=str(out), alone=min(4, len(requests)),
            requests=[dict(text=r.text, token_ids=r.token_ids, seed=r.seed) for r in requests],
        )))  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        if bind == "all":
            env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{os.cpu_count() - 1}", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
        argv = [python, __file__, "--worker", str(job), "--model", args.model, "--n", str(args.n),
                "--repeats", str(args.repeats)]  # fmt: skip
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"vLLM worker failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def vllm_python(args) -> str | None:
    import importlib.util

    if args.vllm_python:
        return args.vllm_python
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return str(DEFAULT_VLLM_PYTHON) if DEFAULT_VLLM_PYTHON.exists() else None


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        vllm_worker(args)
        return {}
    import torch

    from alignpipe.core.models import resolve_dtype
    from alignpipe.data.builtin import make_items
    from alignpipe.generation.base import build_requests
    from alignpipe.generation.load import load_chat_tokenizer
    from alignpipe.params import SamplingParams

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = SamplingParams(backend="hf", temperature=0.8, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, dtype=args.dtype)  # fmt: skip
    tokenizer = load_chat_tokenizer(args.model)
    items = make_items("prompts", args.prompts, seed=0)
    prompts = [[{"role": "user", "content": item.instruction}] for item in items]
    requests = build_requests(tokenizer, prompts, [item.id for item in items], seed=0)
    record: dict = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        commit=git_commit(),
        cpu=cpu_model(),
        gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        note=args.note,
        settings=dict(
            model=os.path.basename(os.path.normpath(args.model)),
            prompts=args.prompts,
            n=args.n,
            max_new_tokens=args.max_new_tokens,
            batch_prompts=args.batch_size,
            temperature=0.8,
            device=str(device),
            dtype=str(resolve_dtype(args.dtype, device)).removeprefix("torch."),
            repeats=args.repeats,
            prompt_tokens=sum(len(r.token_ids) for r in requests),
        ),  # fmt: skip
        load_average_start=load_average(),
        engines={},
    )
    import transformers

    record["transformers"] = transformers.__version__
    wanted = [e for e in args.engines.split(",") if e]
    record["generate_batch_config"] = {}
    hf = hf_engines(args, settings, tokenizer, requests, device, record["generate_batch_config"])
    for name in wanted:
        if name == "vllm":
            python = vllm_python(args)
            if python is None:
                print("vllm: skipped (no vLLM here and no .venv-vllm: make vllm-env)", file=sys.stderr)
                continue
            binds = ["auto", "all"] if args.vllm_bind == "both" else [args.vllm_bind]
            for bind in binds:
                key = "vllm" if bind == "auto" else "vllm_all_cores"
                load_before = load_average()
                result = run_vllm(args, settings, requests, python, bind)
                summary = summarize(key, result["runs"])
                record["engines"][key] = dict(summary, **result, load_average=[load_before, load_average()])
                print(
                    json.dumps({k: v for k, v in record["engines"][key].items() if k != "runs"}), flush=True
                )
            continue
        load_before = load_average()
        run_once = hf[name]()
        repeats = args.repeats
        if name == "hf_generate_batch" and args.repeats_generate_batch is not None:
            repeats = args.repeats_generate_batch
        runs = [timed(run_once, time.process_time) for _ in range(repeats)]
        record["engines"][name] = dict(
            summarize(name, runs), runs=runs, load_average=[load_before, load_average()]
        )
        print(json.dumps({k: v for k, v in record["engines"][name].items() if k != "runs"}), flush=True)
    rates = {k: v["tokens_per_s"] for k, v in record["engines"].items()}
    cpu_rates = {k: v["tokens_per_cpu_s"] for k, v in record["engines"].items()}
    record["ratios"] = {f"{a}/{b}": round(rates[a] / rates[b], 2) for a in rates for b in rates if a != b}
    record["cpu_ratios"] = {f"{a}/{b}": round(cpu_rates[a] / cpu_rates[b], 2)
                            for a in cpu_rates for b in cpu_rates if a != b}  # fmt: skip
    record["load_average_end"] = load_average()
    print(json.dumps({"ratios": record["ratios"]}), flush=True)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":  # vLLM's engine spawns processes: the guard is required
    main()
