"""The sft stage on a vision-language model (the base model folder has a vision config).

The same Trainer, checkpoints, fingerprint, resume, curves and summary as the text path
(:mod:`alignpipe.sft.trainer`); what differs: the processor renders each row with its images
(:mod:`alignpipe.vision.sft`), the model loads as ``AutoModelForImageTextToText`` and trains what
``sft.vlm_trainable`` names (by default the language model, the vision tower and projector frozen),
LoRA goes on the language model only, and the folder written holds the processor. Not yet here:
packing, QLoRA.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import atomic_path, read_parquet, write_json
from alignpipe.core.progress import Timer
from alignpipe.params import SftParams
from alignpipe.sft.data import LengthGroupedSampler, SftData, SftDataError, SftExample
from alignpipe.sft.nonfinite import NonFiniteStop
from alignpipe.sft.trainer import LiveCallback, SftTrainer, summarize, training_arguments
from alignpipe.training.checkpoints import resume_point
from alignpipe.training.fingerprint import fingerprint
from alignpipe.training.precision import weights_dtype
from alignpipe.training.timed_save import TimedSave
from alignpipe.vision.models import apply_vision_lora, load_image_text_model, load_processor, set_trainable
from alignpipe.vision.sft import VisionSftExample, collate_vision_sft, encode_vision_sft


class _Examples(Dataset):
    def __init__(self, examples: Sequence[VisionSftExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> VisionSftExample:
        return self.examples[i]


class VisionSftTrainer(SftTrainer):
    """The stage's Trainer, resuming a VLM's full weights through ``from_pretrained``: a checkpoint holds
    the model's checkpoint names (LLaVA: ``language_model.model.*``), which transformers 5.24's
    ``Trainer._load_from_checkpoint`` loads with a plain ``load_state_dict`` and drops (a warning, and
    the resumed run silently restarts from the base weights; tests/test_vlm_sft_stage.py caught it)."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        model = self.model if model is None else model
        if hasattr(model, "peft_config"):  # adapters: peft's own names, the Trainer's path
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        dtype = next(model.parameters()).dtype
        loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype, use_safetensors=True)
        model.load_state_dict(loaded.state_dict(), strict=True)
        return None


def _collator(pad_token_id: int) -> Any:
    def collate(features: list[VisionSftExample]) -> dict[str, Any]:
        return {**collate_vision_sft(features, pad_token_id), "row_ids": [f.row_id for f in features]}

    return collate


def build_vision_model(params: SftParams, paths: Any) -> Any:
    """The VLM to train: what ``sft.vlm_trainable`` names, in full, or LoRA adapters on the language
    model's linear layers (with the projector, and the tower for ``all``, trained in full)."""
    if params.peft.load_in_4bit or params.packing:
        raise SftDataError(
            "sft on a vision-language model: sft.packing and sft.peft.load_in_4bit are not supported yet"
        )
    model = load_image_text_model(paths.model, weights_dtype(params))
    set_trainable(model, params.vlm_trainable)
    return apply_vision_lora(model, params.peft, params.vlm_trainable) if params.peft.enabled else model


def run_vision_sft(
    params: SftParams, paths: Any, callbacks: Sequence[TrainerCallback] = ()
) -> dict[str, Any]:
    """:func:`alignpipe.sft.stage.run_sft` for a VLM base model; ``paths`` is its ``SftPaths``."""
    timer = Timer("sft")
    processor = load_processor(paths.model)
    rows = read_parquet(paths.data, schema.with_images(schema.SFT))
    if not rows:
        raise SftDataError(f"{paths.data}: no rows, nothing to train on")
    examples = encode_vision_sft(processor, rows, params.max_length, where=str(paths.data))
    stats = SftData(
        rows=len(rows), examples=[SftExample(e.input_ids, e.prompt_len, e.row_id) for e in examples]
    )
    args = training_arguments(params, paths.checkpoints)
    with args.main_process_first(local=False, desc="sft checkpoints"):
        fp = fingerprint(params, {"data": paths.data, "base model": paths.model}, args.world_size)
        resume = resume_point(paths.checkpoints, fp, "sft", args.should_save)
    live, stop = LiveCallback(paths.metrics_dir), NonFiniteStop()
    trainer = VisionSftTrainer(
        model=build_vision_model(params, paths),
        args=args,
        train_dataset=_Examples(examples),
        data_collator=_collator(processor.tokenizer.pad_token_id),
        callbacks=[live, stop, TimedSave(params.save_minutes), *callbacks],
        sampler=LengthGroupedSampler(
            [len(e.input_ids) for e in examples], params.batch_size * args.world_size, params.seed
        ),  # fmt: skip
        non_finite=stop,
    )
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - started
    _save(trainer, params, paths, processor)
    summary = summarize(trainer.state, stats, timer.seconds, train_seconds, live.begin_tokens, resume)
    if args.should_save:
        write_json(summary | {"vision": True}, paths.metrics_dir / "metrics.json")
        timer.summary(summary["steps"], "steps", loss=summary["final_loss"])
    return summary


def _save(trainer: Any, params: SftParams, paths: Any, processor: Any) -> None:
    """The trained VLM as one HF folder (LoRA merged into the model trained), with its processor."""
    accelerator = trainer.accelerator
    state_dict = accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.args.should_save:
        model = accelerator.unwrap_model(trainer.model)
        if params.peft.enabled:
            model, state_dict = model.merge_and_unload(), None
        model.config.use_cache = True
        with atomic_path(paths.out) as tmp, torch.no_grad():
            model.save_pretrained(tmp, state_dict=state_dict)
            processor.save_pretrained(tmp)
    accelerator.wait_for_everyone()
