"""DPO training throughput: alignpipe's DPO next to TRL's DPOTrainer, same model, pairs, steps and batch.

    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/dpo_throughput.py \\
        --model smollm2-135m --pairs 64 --batch-size 8 --max-length 512 --device cpu

Models: a named shape, random-initialised (``smollm2-135m``, ``qwen-0.5b``, ``tiny`` for smoke
tests), or a local HF folder. Tokenizer: the folder's, else ``models/base``'s when the repo has
one, else a byte-level BPE trained in-process (alignpipe.testing; its ids only use the start of the
shape's vocabulary, the LM head keeps its full width). Pairs: synthetic multi-turn dialogues whose
prompt + completion fill 60-100% of ``--max-length``, never truncated, the same token ids for both
implementations (checked; TRL gets the rendered text and tokenizes it itself).

- ``ours``: the ``ref_logps`` pass (precomputed reference, then the reference model is freed) plus
  the ``dpo`` training loop (alignpipe.dpo.stage.build_run / train); both are timed, model loads are not.
- ``trl``: ``DPOTrainer`` with its defaults (live reference model, its gradient checkpointing, its
  fused AdamW, its sampler) and the same steps, batch, max_length, beta, learning rate, schedule
  (linear, no warmup), seed and precision; ``trainer.train()`` is timed.

Each implementation runs in a fresh subprocess so peak memories don't mix: RSS high-water on CPU,
``torch.cuda.max_memory_allocated`` on GPU (plus MFU = 8 x params x tokens/s / 989e12: policy
forward + backward and reference forward, H100 bf16 dense peak). Tokens are real (unpadded)
prompt + completion tokens of the pairs trained. ``--parity``: both see the pairs in file order
(no shuffle), and the last line gives the largest per-step loss difference. Output: one JSON line
per run, then one ``ratio`` line (ours / TRL, medians over ``--repeats``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import write_parquet
from alignpipe.artifacts.pairs import EncodedPair, read_pairs
from alignpipe.core.chat import encode_completion, encode_ids, render_prompt
from alignpipe.params import DpoParams

REPO = Path(__file__).resolve().parents[1]
H100_BF16_FLOPS = 989e12
RESULT = "dpo-bench-result: "  # marks a worker's JSON line among the libraries' output
# Named shapes: random-initialised models with the published configs' dimensions.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
    "qwen-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                      tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "tiny": dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64, vocab_size=None, tie_word_embeddings=True),
}  # fmt: skip
VOCABULARY = ("the model answers each question with care and the user asks again about rivers mountains "
              "numbers lists colours cooking travel music weather history code tests data plans budgets "
              "short long clear simple first second third because however therefore finally")  # fmt: skip
WORDS = tuple(VOCABULARY.split())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help=f"a shape ({', '.join(SHAPES)}) or a model folder")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (global batch)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence (prompt + completion)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: one epoch, pairs // batch)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    p.add_argument("--impl", choices=("ours", "trl", "both"), default="both")
    p.add_argument("--parity", action="store_true", help="same batch order on both sides; report loss gap")
    p.add_argument("--padding-free", choices=("on", "off"), default="on", help="ours: packed rows")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile (GPU)")
    default_gc = "on" if DpoParams().gradient_checkpointing else "off"
    p.add_argument("--gradient-checkpointing", choices=("on", "off"), default=default_gc, help="ours")
    p.add_argument("--ablate", default="", help="ours without: shared_prompt, fused_adamw (comma-separated)")
    p.add_argument("--trl-gradient-checkpointing", choices=("default", "on", "off"), default="default")
    p.add_argument("--learning-rate", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="alternate ours/trl this many times")
    p.add_argument("--json-out", help="also write the JSON lines to this file")
    p.add_argument("--in-process", action="store_true", help="no subprocesses (tests; peaks mix)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolved_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def bench_tokenizer(model: str) -> Any:
    from alignpipe.core.models import load_tokenizer
    from alignpipe.testing import tiny_tokenizer

    folder = Path(model) if model not in SHAPES else REPO / "models" / "base"
    if model != "tiny" and (folder / "tokenizer_config.json").exists():
        return load_tokenizer(folder)
    return tiny_tokenizer()


def build_model(shape: str, tokenizer: Any, seed: int) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(SHAPES[shape])
    fields["vocab_size"] = max(fields["vocab_size"] or 0, len(tokenizer))
    rope_theta = fields.pop("rope_theta", 10000.0)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, max_position_embeddings=8192)
    config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _words(rng: random.Random, tokenizer: Any, n_tokens: int) -> list[str]:
    words, used = [], 0
    while used < n_tokens:
        word = rng.choice(WORDS) + (rng.choice(".,?") if rng.random() < 0.15 else "")
        used += len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        words.append(word)
    return words


def _fit(tokenizer: Any, words: list[str], build: Any, n_tokens: int) -> Any:
    """``build(text)`` for the longest prefix of ``words`` whose encoding is at most ``n_tokens`` long."""
    while True:
        built, length = build(" ".join(words).capitalize())
        if length <= n_tokens or len(words) == 1:
            return built
        words = words[: max(1, len(words) - max(1, (length - n_tokens) // 2))]


def _prompt(rng: random.Random, tokenizer: Any, n_tokens: int) -> list[dict[str, str]]:
    """System, user, assistant, user turns: about ``n_tokens`` in all once rendered."""
    roles = ("system", "user", "assistant", "user")

    def build(text: str) -> tuple[list[dict[str, str]], int]:
        words = text.split(" ")
        cuts = [round(k * len(words) / len(roles)) for k in range(len(roles) + 1)]
        texts = [" ".join(words[a:b]).capitalize() or "Hi" for a, b in zip(cuts, cuts[1:], strict=False)]
        messages = [{"role": r, "content": t} for r, t in zip(roles, texts, strict=True)]
        return messages, len(encode_ids(tokenizer, render_prompt(tokenizer, messages)))

    return _fit(tokenizer, _words(rng, tokenizer, n_tokens), build, n_tokens)


def _completion_builder(tokenizer: Any, prompt: list[dict[str, str]]) -> Any:
    def build(text: str) -> tuple[list[dict[str, str]], int]:
        completion = [{"role": "assistant", "content": text}]
        return completion, len(encode_completion(tokenizer, prompt, completion).input_ids)

    return build


def synthetic_pairs(tokenizer: Any, n: int, max_length: int, seed: int) -> list[dict[str, Any]]:
    """Rows of ``schema.PAIRS``: dialogue prompts of about 20-40% of ``max_length``, completions that
    bring each sequence to 60-100% of it (never more, so nothing is truncated)."""
    rng = random.Random(f"dpo-bench:{seed}")
    rows = []
    for i in range(n):
        prompt = _prompt(rng, tokenizer, int(max_length * rng.uniform(0.2, 0.4)))
        row = {"pair_id": f"p{i:05d}", "prompt_id": f"q{i:05d}", "prompt": prompt, "chosen_reward": 1.0,
               "rejected_reward": 0.0, "margin": 1.0, "source": "generated"}  # fmt: skip
        for side in ("chosen", "rejected"):
            target = int(max_length * rng.uniform(0.6, 1.0))
            build = _completion_builder(tokenizer, prompt)
            row[side] = _fit(tokenizer, _words(rng, tokenizer, target), build, target)
            if build(row[side][0]["content"])[1] > max_length:
                raise ValueError(f"--max-length {max_length} is too short for a dialogue prompt")
        rows.append(row)
    return rows


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Model folder, pairs parquet and the settings every worker reads."""
    tokenizer = bench_tokenizer(args.model)
    if args.model in SHAPES:
        model_dir = workdir / "model"
        build_model(args.model, tokenizer, args.seed).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    else:
        model_dir = Path(args.model)
    (workdir / "pairs").mkdir()
    rows = synthetic_pairs(tokenizer, args.pairs, args.max_length, args.seed)
    write_parquet(rows, workdir / "pairs" / "train.parquet", schema.PAIRS)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "workdir", "json_out")}
    settings.update(model_dir=str(model_dir), device=resolved_device(args.device),
                    steps=args.steps or args.pairs // args.batch_size)  # fmt: skip
    pairs = encoded(settings, workdir, tokenizer)
    settings["tokens_per_pair"] = statistics.mean(p.n_tokens for p in pairs)
    (workdir / "settings.json").write_text(json.dumps(settings))
    return settings


def encoded(settings: dict[str, Any], workdir: Path, tokenizer: Any) -> list[EncodedPair]:
    length = settings["max_length"]
    return read_pairs(workdir / "pairs" / "train.parquet", tokenizer, length, length - 1)


def compute_dtype(settings: dict[str, Any]) -> torch.dtype:
    from alignpipe.core.models import resolve_dtype

    return resolve_dtype(settings["dtype"], settings["device"])


class StepLosses:
    """Stands in for alignpipe.training.metrics.MetricsLog: keeps each step's loss (logging_steps = 1)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.history: list[tuple[int, dict[str, float]]] = []  # nothing replayed (no resume here)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if "loss" in metrics:
            self.losses.append(float(metrics["loss"]))

    def close(self, summary: dict[str, Any]) -> None:
        pass


def run_ours(settings: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Reference pass (timed) then the DPO loop (timed); the reference model is freed in between."""
    import alignpipe.dpo.stage as dpo
    from alignpipe.core.logprobs import load_reference, pair_scores
    from alignpipe.core.models import load_tokenizer

    s, device = settings, torch.device(settings["device"])
    params = DpoParams(
        beta=s["beta"], learning_rate=s["learning_rate"], lr_scheduler="linear", warmup_ratio=0.0,
        batch_size=s["batch_size"], max_length=s["max_length"], max_prompt_length=s["max_length"] - 1,
        max_steps=s["steps"], padding_free=s["padding_free"] == "on", compile=s["compile"],
        dtype=s["dtype"], seed=s["seed"], logging_steps=1, eval_steps=10**9, save_steps=10**9,
        save_minutes=None, gradient_checkpointing=s["gradient_checkpointing"] == "on",
    )  # fmt: skip
    tokenizer = load_tokenizer(s["model_dir"])
    pairs = encoded(s, workdir, tokenizer)
    options = loop_options(s)
    reference = load_reference(s["model_dir"], params.dtype, device)
    start = time.perf_counter()
    scores = pair_scores(reference, pairs, params.batch_size, tokenizer.pad_token_id, params.padding_free,
                         share_prompt=options.shared_prompt)  # fmt: skip
    ref_seconds = sync_time(device) - start
    del reference
    scores.write(workdir / "ref_logps.parquet")
    run, _ = dpo.build_run(
        Path(s["model_dir"]), workdir / "pairs", workdir / "ref_logps.parquet", params, options
    )
    losses = StepLosses()
    start = time.perf_counter()
    dpo.train(run, 0, losses, workdir / "checkpoints", {})
    seconds = ref_seconds + sync_time(device) - start
    n_params = sum(p.numel() for p in run.scorer.parameters())
    return dict(seconds=seconds, ref_seconds=ref_seconds, losses=losses.losses, params=n_params,
                shared_prompt=run.share_prompt, ablate=s["ablate"],
                gradient_checkpointing=params.gradient_checkpointing)  # fmt: skip


def loop_options(s: dict[str, Any]) -> Any:
    """The loop's options for ``--parity`` (file order: no shuffle, no length grouping, the order of
    TRL's sequential sampler) and ``--ablate`` (optimisations off, for bench/NOTES.md)."""
    from alignpipe.dpo.stage import LoopOptions

    ablated = set(filter(None, s["ablate"].split(",")))
    features = {"shared_prompt", "fused_adamw"}
    if ablated - features:
        raise SystemExit(
            f"--ablate: unknown feature {sorted(ablated - features)[0]!r} (one of {', '.join(sorted(features))})"
        )
    return LoopOptions(
        data_order="file" if s["parity"] else "length_grouped",
        shared_prompt="shared_prompt" not in ablated,
        fused_adamw="fused_adamw" not in ablated,
    )


def sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def trl_dataset(pairs: list[EncodedPair], tokenizer: Any) -> Any:
    """TRL's standard (text) format: the rendered prompt, and each completion up to its EOS."""
    from datasets import Dataset

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    return Dataset.from_list([
        {"prompt": text(p.chosen.prompt_ids), "chosen": text(p.chosen.completion_ids),
         "rejected": text(p.rejected.completion_ids)} for p in pairs
    ])  # fmt: skip


def same_tokens(dataset: Any, pairs: list[EncodedPair]) -> bool:
    return all(
        row["prompt_ids"] == p.chosen.prompt_ids
        and row["chosen_ids"] == p.chosen.completion_ids
        and row["rejected_ids"] == p.rejected.completion_ids
        for row, p in zip(dataset, pairs, strict=True)
    )


def run_trl(settings: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """``DPOTrainer`` with its defaults and a live reference; ``train()`` is timed."""
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from alignpipe.core.models import load_tokenizer

    s = settings
    tokenizer = load_tokenizer(s["model_dir"])
    pairs = encoded(s, workdir, tokenizer)
    overrides = {} if s["trl_gradient_checkpointing"] == "default" else {
        "gradient_checkpointing": s["trl_gradient_checkpointing"] == "on"}  # fmt: skip
    config = DPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=s["batch_size"], max_steps=s["steps"],
        max_length=s["max_length"], beta=s["beta"], learning_rate=s["learning_rate"], seed=s["seed"],
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=compute_dtype(s) == torch.bfloat16, use_cpu=s["device"] == "cpu", logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True,
        train_sampling_strategy="sequential" if s["parity"] else "random", **overrides,
    )  # fmt: skip
    losses: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = DPOTrainer(model=s["model_dir"], args=config, train_dataset=trl_dataset(pairs, tokenizer),
                         processing_class=tokenizer, callbacks=[Record()])  # fmt: skip
    tokens_match = same_tokens(trainer.train_dataset, pairs)
    if s["parity"] and not tokens_match:
        raise RuntimeError("parity: TRL tokenized the pairs differently from alignpipe")
    device = torch.device(s["device"])
    start = time.perf_counter()
    trainer.train()
    seconds = sync_time(device) - start
    n_params = sum(p.numel() for p in trainer.model.parameters())
    return dict(seconds=seconds, losses=losses, params=n_params, same_tokens=tokens_match,
                gradient_checkpointing=config.gradient_checkpointing)  # fmt: skip


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(impl: str, workdir: Path) -> dict[str, Any]:
    """One implementation's run, as its JSON record."""
    s = json.loads((workdir / "settings.json").read_text())
    torch.manual_seed(s["seed"])
    if s["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cpu = time.process_time()
    out = (run_ours if impl == "ours" else run_trl)(s, workdir)
    cpu = time.process_time() - cpu
    pairs_done = s["steps"] * s["batch_size"]
    tokens = pairs_done * s["tokens_per_pair"]
    losses, seconds = out.pop("losses"), out["seconds"]
    record = dict(
        impl=impl, model=s["model"], device=s["device"], dtype=str(compute_dtype(s)).removeprefix("torch."),
        pairs=s["pairs"], batch_size=s["batch_size"], max_length=s["max_length"], steps=s["steps"],
        padding_free=s["padding_free"], pairs_per_s=pairs_done / seconds, tokens_per_s=tokens / seconds,
        peak_memory_mb=peak_memory_mb(s["device"]), loss_step1=losses[0] if losses else None,
        loss_final=losses[-1] if losses else None, cpu_seconds=cpu, threads=torch.get_num_threads(),
        **out, losses=losses,
    )  # fmt: skip
    if s["device"] == "cuda":
        record["mfu"] = 8 * out["params"] * record["tokens_per_s"] / H100_BF16_FLOPS
    return record


def spawn(impl: str, workdir: Path, settings: dict[str, Any], in_process: bool) -> dict[str, Any]:
    if in_process:
        return worker(impl, workdir)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if settings["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--workdir", str(workdir)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line.removeprefix(RESULT) for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{impl} worker failed (exit {proc.returncode}); its stderr is above")
    return json.loads(lines[-1])


def ratio_line(records: list[dict[str, Any]], parity: bool) -> dict[str, Any] | None:
    by = {impl: [r for r in records if r["impl"] == impl] for impl in ("ours", "trl")}
    if not (by["ours"] and by["trl"]):
        return None

    def median(impl: str, key: str) -> float:
        return statistics.median(r[key] for r in by[impl])

    line = dict(impl="ratio", ratio_pairs_per_s=median("ours", "pairs_per_s") / median("trl", "pairs_per_s"),
                ratio_peak_memory=median("ours", "peak_memory_mb") / median("trl", "peak_memory_mb"),
                repeats=len(by["ours"]))  # fmt: skip
    if parity:
        ours, trl = by["ours"][0]["losses"], by["trl"][0]["losses"]
        line["max_loss_diff"] = max((abs(a - b) for a, b in zip(ours, trl, strict=False)), default=math.nan)
        line["max_loss_move"] = max((abs(a - math.log(2)) for a in ours), default=math.nan)
        line["steps_compared"] = min(len(ours), len(trl))
    return line


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.worker:
        print(RESULT + json.dumps(worker(args.worker, Path(args.workdir))), flush=True)
        return []
    impls = ["ours", "trl"] if args.impl == "both" else [args.impl]
    stamp = dict(machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
                 date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))  # fmt: skip
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        settings = prepare(args, Path(tmp))
        for _ in range(args.repeats):
            for impl in impls:
                record = {**spawn(impl, Path(tmp), settings, args.in_process), **stamp}
                emit(record, args.json_out)
                records.append(record)
    ratio = ratio_line(records, args.parity)
    if ratio is not None:
        emit(ratio, args.json_out)
        records.append(ratio)
    return records


def emit(record: dict[str, Any], json_out: str | None) -> None:
    line = json.dumps({k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in record.items()})
    print(line, flush=True)
    if json_out:
        with open(json_out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
