"""The ``sft`` stage: supervised fine-tuning of the base model on demonstrations.

``run_sft`` trains ``models/base`` on ``data/prepared/sft.parquet`` with the model's
chat template, loss on the assistant's tokens only, and writes a merged HF folder
(safetensors, tokenizer, chat template, generation config) that transformers and
vLLM load unchanged. It runs on transformers' ``Trainer``, so the same code runs
as ``python stages/sft.py`` on a laptop and under ``accelerate launch`` (DDP, FSDP,
DeepSpeed) on a cluster.

Resume: checkpoints go to ``checkpoints/sft`` next to a fingerprint of what
determines the result (the ``sft`` params, the data file, the base model, the
number of processes). A rerun with the same fingerprint resumes from the last
complete checkpoint; a changed one deletes the stale checkpoints and says why.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from alignpipe.artifacts.io import atomic_path, read_parquet, write_json
from alignpipe.artifacts.schema import SFT
from alignpipe.core.chat import require_chat_template
from alignpipe.core.models import (
    check_model_folder,
    load_causal_lm,
    load_causal_lm_4bit,
    load_tokenizer,
    pick_device,
    seed_everything,
)
from alignpipe.core.progress import Timer
from alignpipe.params import SftParams
from alignpipe.sft.data import (
    LengthGroupedSampler,
    SftDataset,
    collate_packed,
    collate_padded,
    encode_rows,
    warn_length_costs,
)
from alignpipe.sft.nonfinite import NonFiniteStop
from alignpipe.sft.trainer import (  # noqa: F401 - re-exported: the stage's names
    LIVE_METRICS,
    LiveCallback,
    SftTrainer,
    checkpointing_arguments,
    summarize,
    training_arguments,
)
from alignpipe.sft.vision import run_vision_sft
from alignpipe.training.checkpoints import resume_point
from alignpipe.training.fingerprint import fingerprint
from alignpipe.training.peft import lora_config
from alignpipe.training.precision import weights_dtype
from alignpipe.training.timed_save import TimedSave
from alignpipe.vision.models import is_vision_model_folder


class SftConfigError(ValueError):
    """The sft settings cannot run here (e.g. QLoRA without bitsandbytes)."""


@dataclass(frozen=True)
class SftPaths:
    """Where the stage reads and writes; ``dvc.yaml`` passes them on the command line."""

    model: Path
    data: Path
    out: Path
    checkpoints: Path
    metrics_dir: Path


def run_sft(params: SftParams, paths: SftPaths, callbacks: Sequence[TrainerCallback] = ()) -> dict[str, Any]:
    """Train (or pass through) the base model and write ``paths.out``; returns the metrics summary."""
    timer = Timer("sft")
    if not params.enabled:
        return passthrough(params, paths, timer)
    if is_vision_model_folder(paths.model):  # dispatched once, on the base model's config
        return run_vision_sft(params, paths, callbacks)
    check_settings(params)
    seed_everything(params.seed)
    tokenizer = load_tokenizer(paths.model)
    require_chat_template(tokenizer, params.chat_template, where=str(paths.model))
    rows = read_parquet(paths.data, SFT)
    data = encode_rows(tokenizer, rows, params.max_length, params.truncation, where=str(paths.data))
    args = training_arguments(params, paths.checkpoints)
    if args.should_save:
        warn_length_costs(data, params.max_length)
    with args.main_process_first(local=False, desc="sft checkpoints"):
        inputs = {"data": paths.data, "base model": paths.model}
        fp = fingerprint(params, inputs, args.world_size)
        resume = resume_point(paths.checkpoints, fp, "sft", args.should_save)
    live, stop = LiveCallback(paths.metrics_dir), NonFiniteStop()
    trainer = SftTrainer(
        model=build_model(params, paths.model),
        args=args,
        train_dataset=SftDataset(data.examples),
        data_collator=collator(params, tokenizer.pad_token_id, trim_logits=args.n_gpu <= 1),
        callbacks=[live, stop, TimedSave(params.save_minutes), *callbacks],
        sampler=LengthGroupedSampler(
            [len(e.input_ids) for e in data.examples], params.batch_size * args.world_size, params.seed
        ),  # global batches: the processes split each one, so N x B/N sees what 1 x B sees
        non_finite=stop,
    )
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - started
    save_final(trainer, params, paths, tokenizer)
    summary = summarize(trainer.state, data, timer.seconds, train_seconds, live.begin_tokens, resume)
    if args.should_save:
        write_json(summary, paths.metrics_dir / "metrics.json")
        timer.summary(
            summary["steps"], "steps", loss=summary["final_loss"], tokens_per_s=summary["tokens_per_second"]
        )
    return summary


def collator(params: SftParams, pad_token_id: int, trim_logits: bool = True) -> Callable[[list], dict]:
    """Packed or padded batches, with the ``row_ids`` they hold (named if they go non-finite);
    ``trim_logits`` off under ``torch.nn.DataParallel`` (it splits every tensor)."""
    if params.packing:
        collate = partial(collate_packed, trim_logits=trim_logits)
    else:
        collate = partial(collate_padded, pad_token_id=pad_token_id, trim_logits=trim_logits)
    return partial(_with_row_ids, collate)


def _with_row_ids(collate: Callable[[list], dict], features: list[dict[str, Any]]) -> dict[str, Any]:
    return {**collate(features), "row_ids": [f.get("row_id", "") for f in features]}


def check_settings(params: SftParams) -> None:
    """Fail before any work on settings this machine cannot run."""
    if params.peft.load_in_4bit:
        if not params.peft.enabled:
            raise SftConfigError("sft.peft.load_in_4bit (QLoRA) needs sft.peft.enabled: true")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise SftConfigError("sft.peft.load_in_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes")


def build_model(params: SftParams, model_dir: Path) -> Any:
    """The model to train: full weights, LoRA adapters on them, or LoRA on 4-bit weights (QLoRA)."""
    model = (
        _load_4bit(model_dir)
        if params.peft.load_in_4bit
        else load_causal_lm(model_dir, weights_dtype(params))
    )
    if not params.peft.enabled:
        return model
    from peft import get_peft_model

    if params.gradient_checkpointing:  # a 4-bit base is prepared for k-bit training by its loader
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(params.peft))


def _load_4bit(model_dir: Path) -> Any:
    return load_causal_lm_4bit(model_dir, pick_device())


def save_final(trainer: Trainer, params: SftParams, paths: SftPaths, tokenizer: Any) -> None:
    """Write the trained model as one merged HF folder, atomically, from the main process."""
    accelerator = trainer.accelerator
    state_dict = accelerator.get_state_dict(trainer.model_wrapped)  # gathers FSDP / ZeRO-3 shards
    if trainer.args.should_save:
        model = accelerator.unwrap_model(trainer.model)
        if params.peft.enabled:
            model, state_dict = merge_lora(model, state_dict, params, paths.model), None
        model.config.use_cache = True  # the Trainer turns it off for training
        with atomic_path(paths.out) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()


def merge_lora(
    peft_model: Any, state_dict: dict[str, torch.Tensor], params: SftParams, model_dir: Path
) -> Any:
    """The trained adapters merged into a fresh CPU copy of the base model, in the training dtype.

    Merging into a fresh copy (not the trained, possibly 4-bit, model in memory)
    gives QLoRA unquantized merged weights and works the same under any launcher.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapters = get_peft_model_state_dict(peft_model, state_dict=state_dict)
    base = load_causal_lm(model_dir, dtype=weights_dtype(params), device=torch.device("cpu"))
    fresh = get_peft_model(base, lora_config(params.peft))
    set_peft_model_state_dict(fresh, adapters)
    return fresh.merge_and_unload()


def passthrough(params: SftParams, paths: SftPaths, timer: Timer) -> dict[str, Any]:
    """``sft.enabled: false``: copy the base model to ``paths.out`` unchanged.

    The one change: a ``sft.chat_template`` is installed in the copy's tokenizer,
    so later stages can render chats with it.
    """
    check_model_folder(paths.model, what="base model")
    with atomic_path(paths.out) as tmp:
        shutil.copytree(paths.model, tmp)
        if params.chat_template:
            tokenizer = load_tokenizer(tmp)
            require_chat_template(tokenizer, params.chat_template, where=str(paths.model))
            tokenizer.save_pretrained(tmp)
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    plot = paths.metrics_dir / "plots" / "metrics" / LIVE_METRICS["loss"]
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot.with_suffix(".tsv").write_text("step\tloss\n")  # the dvc plots out exists and parses, empty
    summary = {"enabled": False, "steps": 0, "tokens": 0, "wall_seconds": round(timer.seconds, 1)}
    write_json(summary, paths.metrics_dir / "metrics.json")
    print(f"sft: disabled, copied {paths.model} to {paths.out}", flush=True)
    return summary


def run(params: SftParams, paths: SftPaths) -> dict[str, Any]:
    """The stage: train (or pass through) the base model; returns the summary."""
    return run_sft(params, paths)
