"""DPO training throughput: alignpipe's DPO next to TRL's DPOTrainer, same model, pairs, steps and batch.

    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/dpo_throughput.py \\
        --model smollm2-135m --pairs 64 --batch-size 8 --max-length 512 --device cpu \\
        --rows ours,trl,trl_tuned,ours_gc_off,trl_tuned_gc_off --repeats 3 --fraction-of-peak

Models: a named shape, random-initialised (``smollm2-135m``, ``qwen-0.5b``, ``tiny`` for smoke
tests), or a local HF folder. Tokenizer: the folder's, else ``models/base``'s when the repo has
one, else a byte-level BPE trained in-process (alignpipe.testing; its ids only use the start of the
shape's vocabulary, the LM head keeps its full width). Pairs: synthetic multi-turn dialogues whose
prompt + completion fill 60-100% of ``--max-length``, never truncated, the same token ids for both
implementations (checked; TRL gets the rendered text and tokenizes it itself).

Rows (``--rows``, comma-separated; ``--ablate f1,f2`` adds ``ours_no_f1``, ``ours_no_f2``):

- ``ours``: the ``ref_logps`` pass (precomputed reference, then the reference model is freed) plus
  the ``dpo`` training loop (alignpipe.dpo.stage.build_run / train); both timed, model loads not.
- ``trl``: ``DPOTrainer`` with its defaults (live reference model, its gradient checkpointing, its
  fused AdamW, its random sampler); ``trainer.train()`` is timed.
- ``trl_tuned``: TRL at its strongest on this workload: ``precompute_ref_log_probs=True`` (no
  reference model during training; TRL 1.16 precomputes inside ``DPOTrainer.__init__``, so the time
  runs from construction on, with a fresh ``HF_DATASETS_CACHE`` per run so no cached precompute is
  reused), ``train_sampling_strategy="group_by_length"`` over a ``length`` column (the longer side of
  each pair, which TRL pads to), and the same gradient-checkpointing setting as ours.
- modifiers, appended to a row: ``_gc_off`` / ``_gc_on`` (gradient checkpointing), ``_bf16`` /
  ``_fp32`` (dtype of that row, both sides alike), ``_no_<feature>`` (ours only, the engine's real
  options): ``shared_prompt`` (LoopOptions.shared_prompt), ``padding_free`` (dpo.padding_free:
  padded rows; shared prompts need packed rows, so this is off too), ``completion_head``
  (LoopOptions.completion_head: the LM head over every position), ``reference_cache``
  (dpo.reference: live, the reference forward every step; use with ``--epochs`` > 1),
  ``fused_adamw`` (LoopOptions.fused_adamw).

Every implementation runs in a fresh subprocess so peak memories don't mix: RSS high-water on CPU,
``torch.cuda.max_memory_allocated`` on GPU. ``--repeats`` runs all rows that many times, interleaved
(row order, then again), so a load change hits every row alike; each row's summary gives the median
and min/max. Tokens are real (unpadded) prompt + completion tokens of the pairs trained.
``--fraction-of-peak``: a matmul micro-benchmark on the same threads (fp32 and bf16) gives the peak;
model FLOPs = 6 x params per trained token + 2 x params per reference token, gradient-checkpointing
recompute (2 x params per trained token) counted apart. ``--parity``: every row sees the pairs in file
order (no shuffle, no length grouping) and the ratio line gives the largest per-step loss gap to ours.
Output: one JSON line per run, one ``summary`` line per row, then the ``ratio`` line (medians).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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
IMPLS = ("trl_tuned", "trl", "ours")  # longest first: a row name starts with one of them
FEATURES = ("shared_prompt", "padding_free", "completion_head", "reference_cache", "fused_adamw")
MODIFIER = re.compile(r"_(gc_off|gc_on|bf16|fp32|no_(?:" + "|".join(FEATURES) + "))")
DEFAULT_ROWS = "ours,trl,trl_tuned"
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
    p.add_argument("--epochs", type=int, default=1, help="passes over the pairs (unless --steps)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: epochs x pairs // batch)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (alignpipe.training.precision) | float32 | bfloat16")
    p.add_argument("--rows", default=DEFAULT_ROWS, help="rows to run, e.g. ours,trl,trl_tuned,ours_gc_off")
    p.add_argument(
        "--ablate", default="", help=f"add ours_no_<f> rows for these features ({', '.join(FEATURES)})"
    )
    p.add_argument("--parity", action="store_true", help="file order on every row; report loss gaps to ours")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile (GPU)")
    default_gc = "on" if DpoParams().gradient_checkpointing else "off"
    p.add_argument("--gradient-checkpointing", choices=("on", "off"), default=default_gc,
                   help="ours and trl_tuned (rows without a _gc_ modifier)")  # fmt: skip
    p.add_argument(
        "--fraction-of-peak", action="store_true", help="measure the matmul peak; report fractions"
    )
    p.add_argument("--malloc", choices=("retain", "system"), default="retain",
                   help="every row: glibc keeps freed memory (alignpipe.cli.retain_freed_memory, what the "
                   "stages do) | glibc's defaults (the headline file of 2026-12-01)")  # fmt: skip
    p.add_argument("--learning-rate", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="run every row this many times, interleaved")
    p.add_argument("--json-out", help="also append the JSON lines to this file")
    p.add_argument(
        "--results", help="write a bench/results file: commit, date, CPU, command, runs, summaries"
    )
    p.add_argument("--in-process", action="store_true", help="no subprocesses (tests; peaks mix)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


@dataclass(frozen=True)
class Row:
    """One benchmark row: an implementation and its modifiers."""

    name: str
    impl: str  # ours | trl | trl_tuned
    gradient_checkpointing: bool | None = None  # None: the row's default (see resolved_gc)
    dtype: str | None = None  # None: --dtype
    ablated: frozenset[str] = frozenset()


def parse_row(name: str) -> Row:
    impl = next((i for i in IMPLS if name == i or name.startswith(i + "_")), None)
    rest = name[len(impl) :] if impl else name
    mods = MODIFIER.findall(rest)
    if impl is None or "".join(f"_{m}" for m in mods) != rest:
        raise SystemExit(
            f"--rows: cannot read {name!r} (an impl of {IMPLS}, then _gc_off, _bf16, _no_<feature>...)"
        )
    gc = {"gc_off": False, "gc_on": True}
    dtypes = {"bf16": "bfloat16", "fp32": "float32"}
    ablated = frozenset(m.removeprefix("no_") for m in mods if m.startswith("no_"))
    if ablated and impl != "ours":
        raise SystemExit(f"--rows {name}: _no_<feature> switches alignpipe's options, rows of ours only")
    return Row(name, impl, next((gc[m] for m in mods if m in gc), None),
               next((dtypes[m] for m in mods if m in dtypes), None), ablated)  # fmt: skip


def row_names(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    extra = [f"ours_no_{f.strip()}" for f in args.ablate.split(",") if f.strip()]
    for name in names + extra:
        parse_row(name)  # fails early on a typo
    return list(dict.fromkeys(names + extra))


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
                    steps=args.steps or args.epochs * (args.pairs // args.batch_size))  # fmt: skip
    pairs = encoded(settings, workdir, tokenizer)
    settings["tokens_per_pair"] = statistics.mean(p.n_tokens for p in pairs)
    (workdir / "settings.json").write_text(json.dumps(settings))
    return settings


def encoded(settings: dict[str, Any], workdir: Path, tokenizer: Any) -> list[EncodedPair]:
    length = settings["max_length"]
    return read_pairs(workdir / "pairs" / "train.parquet", tokenizer, length, length - 1)


def compute_dtype(settings: dict[str, Any], row: Row | None = None) -> torch.dtype:
    from alignpipe.core.models import resolve_dtype

    return resolve_dtype((row.dtype if row else None) or settings["dtype"], settings["device"])


def resolved_gc(settings: dict[str, Any], row: Row) -> bool | None:
    """ours and trl_tuned: the --gradient-checkpointing setting; trl: TRL's default (None)."""
    if row.gradient_checkpointing is not None:
        return row.gradient_checkpointing
    return None if row.impl == "trl" else settings["gradient_checkpointing"] == "on"


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


def placeholder_scores(pairs: list[EncodedPair]) -> Any:
    """ref_logps for a live-reference row: the loader needs the file, the loop never reads its values
    (NaN, so a loss that did would show it)."""
    from alignpipe.artifacts.ref_logps import PairScores

    rows = [(math.nan, math.nan, len(p.chosen.completion_ids), len(p.rejected.completion_ids)) for p in pairs]
    return PairScores.from_rows([p.pair_id for p in pairs], rows)


def run_ours(settings: dict[str, Any], workdir: Path, row: Row, run_dir: Path) -> dict[str, Any]:
    """Reference pass (timed) then the DPO loop (timed); the reference model is freed in between."""
    import alignpipe.dpo.stage as dpo
    from alignpipe.core.logprobs import pair_scores
    from alignpipe.core.models import load_tokenizer
    from alignpipe.training.numerics import Numerics, reference_scorer

    s, device, off = settings, torch.device(settings["device"]), row.ablated
    dtype = row.dtype or s["dtype"]
    params = DpoParams(  # TRL's DPOTrainer default loss, whatever params.yaml's default mix
        loss_type="sigmoid", beta=s["beta"], learning_rate=s["learning_rate"], lr_scheduler="linear",
        warmup_ratio=0.0,
        batch_size=s["batch_size"], max_length=s["max_length"], max_prompt_length=s["max_length"] - 1,
        max_steps=s["steps"], padding_free="padding_free" not in off, compile=s["compile"],
        dtype=dtype, seed=s["seed"], logging_steps=1, eval_steps=10**9, save_steps=10**9,
        save_minutes=None, gradient_checkpointing=bool(resolved_gc(s, row)),
        reference="live" if "reference_cache" in off else "precomputed",
    )  # fmt: skip
    tokenizer = load_tokenizer(s["model_dir"])
    pairs = encoded(s, workdir, tokenizer)
    options = loop_options(s, row)
    ref_seconds = 0.0
    if params.reference == "precomputed":  # as the ref_logps stage: the reference computes as the policy
        numerics = Numerics.of_policy(dtype, params.peft.enabled, params.peft.load_in_4bit, device)
        reference = reference_scorer(s["model_dir"], numerics, device)
        reference.head_all_positions = not options.completion_head
        start = time.perf_counter()
        with numerics.context(device):
            scores = pair_scores(reference, pairs, params.batch_size, tokenizer.pad_token_id,
                                 params.padding_free, share_prompt=options.shared_prompt)  # fmt: skip
        ref_seconds = sync_time(device) - start
        del reference
    else:
        scores = placeholder_scores(pairs)
    scores.write(run_dir / "ref_logps.parquet")
    run, _ = dpo.build_run(
        Path(s["model_dir"]), workdir / "pairs", run_dir / "ref_logps.parquet", params, options
    )
    losses = StepLosses()
    start = time.perf_counter()
    dpo.train(run, 0, losses, run_dir / "checkpoints", {})
    seconds = ref_seconds + sync_time(device) - start
    n_params = sum(p.numel() for p in run.scorer.parameters())
    ref_pairs = len(pairs) if params.reference == "precomputed" else s["steps"] * s["batch_size"]
    return dict(seconds=seconds, ref_seconds=ref_seconds, losses=losses.losses, params=n_params,
                ref_pairs=ref_pairs, shared_prompt=run.share_prompt, padding_free=params.padding_free,
                ablated=sorted(off), gradient_checkpointing=params.gradient_checkpointing)  # fmt: skip


def loop_options(s: dict[str, Any], row: Row) -> Any:
    """The loop's options for ``--parity`` (file order: no shuffle, no length grouping, the order of
    TRL's sequential sampler) and the ablations (an optimisation off, for bench/NOTES.md)."""
    from alignpipe.dpo.stage import LoopOptions

    return LoopOptions(
        data_order="file" if s["parity"] else "length_grouped",
        shared_prompt="shared_prompt" not in row.ablated,
        fused_adamw="fused_adamw" not in row.ablated,
        completion_head="completion_head" not in row.ablated,
    )


def sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def trl_dataset(pairs: list[EncodedPair], tokenizer: Any) -> Any:
    """TRL's standard (text) format: the rendered prompt, and each completion up to its EOS; and a
    ``length`` column for ``group_by_length``: the longer side, which TRL pads the pair to."""
    from datasets import Dataset

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    return Dataset.from_list([
        {"prompt": text(p.chosen.prompt_ids), "chosen": text(p.chosen.completion_ids),
         "rejected": text(p.rejected.completion_ids),
         "length": max(len(p.chosen.input_ids), len(p.rejected.input_ids))} for p in pairs
    ])  # fmt: skip


def same_tokens(dataset: Any, pairs: list[EncodedPair]) -> bool:
    return all(
        row["prompt_ids"] == p.chosen.prompt_ids
        and row["chosen_ids"] == p.chosen.completion_ids
        and row["rejected_ids"] == p.rejected.completion_ids
        for row, p in zip(dataset, pairs, strict=True)
    )


def trl_sampling(s: dict[str, Any], row: Row) -> str:
    if s["parity"]:
        return "sequential"
    return "group_by_length" if row.impl == "trl_tuned" else "random"


def run_trl(settings: dict[str, Any], workdir: Path, row: Row, run_dir: Path) -> dict[str, Any]:
    """``DPOTrainer``: defaults and a live reference (``train()`` timed), or tuned (construction on)."""
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from alignpipe.core.models import load_tokenizer

    s, tuned = settings, row.impl == "trl_tuned"
    tokenizer = load_tokenizer(s["model_dir"])
    pairs = encoded(s, workdir, tokenizer)
    gc = resolved_gc(s, row)
    overrides: dict[str, Any] = {} if gc is None else {"gradient_checkpointing": gc}
    if tuned:  # the length column must reach the sampler: TRL's signature columns would drop it
        overrides.update(precompute_ref_log_probs=True, remove_unused_columns=False)
    config = DPOConfig(
        output_dir=str(run_dir / "trl"), per_device_train_batch_size=s["batch_size"], max_steps=s["steps"],
        max_length=s["max_length"], beta=s["beta"], learning_rate=s["learning_rate"], seed=s["seed"],
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=compute_dtype(s, row) == torch.bfloat16, use_cpu=s["device"] == "cpu", logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True,
        train_sampling_strategy=trl_sampling(s, row), **overrides,
    )  # fmt: skip
    losses: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    dataset, device = trl_dataset(pairs, tokenizer), torch.device(s["device"])
    # tuned: the model is loaded before the clock starts (as ours), so construction times the
    # tokenization and the reference precompute only
    model = AutoModelForCausalLM.from_pretrained(s["model_dir"]) if tuned else s["model_dir"]
    start = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Record()])  # fmt: skip
    init_seconds = sync_time(device) - start
    tokens_match = same_tokens(trainer.train_dataset, pairs)
    if s["parity"] and not tokens_match:
        raise RuntimeError("parity: TRL tokenized the pairs differently from alignpipe")
    train_start = time.perf_counter()
    trainer.train()
    end = sync_time(device)
    seconds = end - (start if tuned else train_start)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    return dict(seconds=seconds, init_seconds=init_seconds, losses=losses, params=n_params,
                ref_pairs=len(pairs) if tuned else s["steps"] * s["batch_size"], same_tokens=tokens_match,
                gradient_checkpointing=config.gradient_checkpointing, sampling=config.train_sampling_strategy,
                precompute_ref_log_probs=config.precompute_ref_log_probs,
                datasets_cache=os.path.relpath(os.environ["HF_DATASETS_CACHE"], workdir))  # fmt: skip


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def flops(record: dict[str, Any], tokens_per_pair: float) -> dict[str, float]:
    """Model FLOPs of a run: 6 N per trained token, 2 N per reference token; recompute apart."""
    n = record["params"]
    trained = record["steps"] * record["batch_size"] * tokens_per_pair
    model = 6 * n * trained + 2 * n * record["ref_pairs"] * tokens_per_pair
    recompute = 2 * n * trained if record["gradient_checkpointing"] else 0.0
    return dict(model_flops=model, recompute_flops=recompute, model_flops_per_s=model / record["seconds"],
                hardware_flops_per_s=(model + recompute) / record["seconds"])  # fmt: skip


def worker(name: str, workdir: Path, run_dir: Path) -> dict[str, Any]:
    """One row's run, as its JSON record."""
    from alignpipe.cli import retain_freed_memory

    s, row = json.loads((workdir / "settings.json").read_text()), parse_row(name)
    retained = s["malloc"] == "retain" and retain_freed_memory()  # TRL's rows too
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s["seed"])
    if s["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cpu, usage = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    out = (run_ours if row.impl == "ours" else run_trl)(s, workdir, row, run_dir)
    cpu, after = time.process_time() - cpu, resource.getrusage(resource.RUSAGE_SELF)
    pairs_done = s["steps"] * s["batch_size"]
    tokens = pairs_done * s["tokens_per_pair"]
    losses, seconds = out.pop("losses"), out["seconds"]
    record = dict(
        impl=name, base=row.impl, model=s["model"], device=s["device"],
        dtype=str(compute_dtype(s, row)).removeprefix("torch."), pairs=s["pairs"], batch_size=s["batch_size"],
        max_length=s["max_length"], steps=s["steps"], pairs_per_s=pairs_done / seconds,
        tokens_per_s=tokens / seconds, peak_memory_mb=peak_memory_mb(s["device"]),
        loss_step1=losses[0] if losses else None, loss_final=losses[-1] if losses else None,
        cpu_seconds=cpu, threads=torch.get_num_threads(), malloc="retain" if retained else "system",
        minor_faults=after.ru_minflt - usage.ru_minflt, system_seconds=after.ru_stime - usage.ru_stime,
        **out, losses=losses,
    )  # fmt: skip
    record.update(flops(record, s["tokens_per_pair"]))
    if s["device"] == "cuda":
        record["mfu"] = record["model_flops_per_s"] / H100_BF16_FLOPS
    return record


def spawn(
    name: str, workdir: Path, settings: dict[str, Any], repeat: int, in_process: bool
) -> dict[str, Any]:
    run_dir = workdir / "runs" / f"{name}-{repeat}"
    cache = run_dir / "hf-datasets-cache"  # fresh per run: no precompute cached by an earlier run
    if in_process:
        os.environ["HF_DATASETS_CACHE"] = str(cache)
        return worker(name, workdir, run_dir)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(cache))
    if settings["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--workdir", str(workdir),
           "--run-dir", str(run_dir)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line.removeprefix(RESULT) for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{name} worker failed (exit {proc.returncode}); its stderr is above")
    return json.loads(lines[-1])


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """The best of ``repeats`` n x n @ n x n matmuls on this process's threads, in GFLOP/s (2 n^3)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def measured_peak(device: str) -> dict[str, float]:
    """GFLOP/s of fp32 and bf16 matmuls (2048 on CPU, 8192 on GPU) where the rows run."""
    if device == "cuda":
        out = {}
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
            a @ a
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                a @ a
            torch.cuda.synchronize()
            out[str(dtype).removeprefix("torch.")] = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e9
        return out
    return {str(d).removeprefix("torch."): matmul_gflops(d, 2048) for d in (torch.float32, torch.bfloat16)}


def summary_line(name: str, runs: list[dict[str, Any]], peak: dict[str, float] | None) -> dict[str, Any]:
    """A row's medians and spread (min, max) over its repeats."""
    line: dict[str, Any] = dict(impl="summary", row=name, repeats=len(runs), dtype=runs[0]["dtype"],
                                gradient_checkpointing=runs[0]["gradient_checkpointing"])  # fmt: skip
    for key in ("pairs_per_s", "tokens_per_s", "peak_memory_mb", "seconds", "cpu_seconds"):
        values = [r[key] for r in runs]
        line.update({key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)})
    line["loss_step1"] = statistics.median(r["loss_step1"] for r in runs)
    line["loss_final"] = statistics.median(r["loss_final"] for r in runs)
    if peak:
        line["peak_gflops"] = peak[runs[0]["dtype"]]
        for key in ("model", "hardware"):
            line[f"{key}_fraction_of_peak"] = statistics.median(
                r[f"{key}_flops_per_s"] / 1e9 / peak[r["dtype"]] for r in runs
            )
    return line


def add_ratios(summaries: dict[str, dict[str, Any]]) -> None:
    """Each row against TRL tuned (the anchor) and against TRL defaults, medians over medians."""
    for anchor, suffix in (("trl_tuned", "_vs_trl_tuned"), ("trl", "_vs_trl")):
        if anchor in summaries:
            for line in summaries.values():
                for key in ("pairs_per_s", "tokens_per_s", "peak_memory_mb"):
                    line[f"ratio_{key}{suffix}"] = line[key] / summaries[anchor][key]


def loss_gap(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b, strict=False)), default=math.nan)


def ratio_line(records: list[dict[str, Any]], parity: bool) -> dict[str, Any] | None:
    """ours against TRL defaults (``ratio_pairs_per_s``), TRL tuned (``..._vs_trl_tuned``) and, for
    each modifier row of ours (``ours_gc_off``), its TRL counterpart (``trl_tuned_gc_off``, else ``trl_gc_off``)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["impl"], []).append(r)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in by[name])

    ours_rows = [name for name in by if name == "ours" or name.startswith("ours_")]
    line: dict[str, Any] = dict(
        impl="ratio", repeats=max((len(by[n]) for n in ours_rows), default=0), rows=list(by)
    )
    for anchor, suffix in (("trl", ""), ("trl_tuned", "_vs_trl_tuned")):
        if anchor in by and "ours" in by:
            line[f"ratio_pairs_per_s{suffix}"] = median("ours", "pairs_per_s") / median(anchor, "pairs_per_s")
            line[f"ratio_peak_memory{suffix}"] = median("ours", "peak_memory_mb") / median(
                anchor, "peak_memory_mb"
            )
    for name in by:
        if name.startswith("ours_"):
            mods = name.removeprefix("ours")
            other = next((a + mods for a in ("trl_tuned", "trl") if a + mods in by), None)
            if other is not None:
                line[f"ratio_pairs_per_s{mods}"] = median(name, "pairs_per_s") / median(other, "pairs_per_s")
                line[f"ratio_peak_memory{mods}"] = median(name, "peak_memory_mb") / median(
                    other, "peak_memory_mb"
                )
                line[f"anchor{mods}"] = other
    if not any(key.startswith("ratio_") for key in line):
        return None  # no row of ours with its anchor measured
    if parity and "ours" in by:
        ours = by["ours"][0]["losses"]
        for anchor, suffix in (("trl", ""), ("trl_tuned", "_vs_trl_tuned")):
            if anchor in by:
                line[f"max_loss_diff{suffix}"] = loss_gap(ours, by[anchor][0]["losses"])
                line[f"steps_compared{suffix}"] = min(len(ours), len(by[anchor][0]["losses"]))
        line["max_loss_move"] = max((abs(a - math.log(2)) for a in ours), default=math.nan)
    return line


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.worker:
        print(RESULT + json.dumps(worker(args.worker, Path(args.workdir), Path(args.run_dir))), flush=True)
        return []
    names = row_names(args)
    stamp = dict(machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
                 date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))  # fmt: skip
    records: list[dict[str, Any]] = []
    commit = head_commit()  # once: a commit made during a long run does not relabel its figures
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        settings = prepare(args, Path(tmp))
        peak = measured_peak(settings["device"]) if args.fraction_of_peak else None
        for repeat in range(args.repeats):
            for name in names:  # interleaved: every row once per repeat
                load = os.getloadavg()[0]
                record = {**spawn(name, Path(tmp), settings, repeat, args.in_process), **stamp,
                          "repeat": repeat, "load_average_1min": load}  # fmt: skip
                emit(record, args.json_out)
                records.append(record)
                if args.results:  # a killed run keeps what it measured: the file is rewritten per run
                    summaries, ratio = summarise(names, records, peak, args.parity)
                    write_results(Path(args.results), records, summaries, ratio, peak, commit, complete=False)
    summaries, ratio = summarise(names, records, peak, args.parity)
    for line in summaries:
        emit({**line, "peak_matmul_gflops": peak} if peak else line, args.json_out)
    if ratio is not None:
        emit(ratio, args.json_out)
    if args.results:
        write_results(Path(args.results), records, summaries, ratio, peak, commit, complete=True)
    return records + summaries + ([ratio] if ratio else [])


def summarise(
    names: list[str], records: list[dict[str, Any]], peak: dict[str, float] | None, parity: bool
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """A summary line per row that has runs, and the ratio line, from the runs so far."""
    summaries = {
        n: summary_line(n, runs, peak) for n in names if (runs := [r for r in records if r["impl"] == n])
    }
    add_ratios(summaries)
    return list(summaries.values()), ratio_line(records, parity)


def cpu_name() -> str:
    """The CPU's model name and its bf16-relevant flags (what the dtype decision reads)."""
    from alignpipe.training.precision import cpuinfo_flags

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.partition(":")[2].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor())  # fmt: skip
    flags = sorted(cpuinfo_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return f"{model}, {os.cpu_count()} cpus, {' '.join(flags) or 'no AVX2'}"


def head_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()


def write_results(path: Path, runs: list, summaries: list, ratio: dict | None, peak: dict | None,
                  commit: str, complete: bool) -> None:  # fmt: skip
    """A results file as tests/test_bench_results.py reads them (``commit``: the one the script
    started at); ``complete`` is false while runs are still to come (a file left by a killed run says so)."""
    data = dict(date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00"), commit=commit, cpu=cpu_name(),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None, torch=torch.__version__,
                command=" ".join(["bench/dpo_throughput.py", *sys.argv[1:]]), peak_matmul_gflops=peak,
                complete=complete, runs=runs, summaries=summaries, ratio=ratio)  # fmt: skip
    path.write_text(json.dumps(data, indent=1) + "\n")


def emit(record: dict[str, Any], json_out: str | None) -> None:
    line = json.dumps({k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in record.items()})
    print(line, flush=True)
    if json_out:
        with open(json_out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
