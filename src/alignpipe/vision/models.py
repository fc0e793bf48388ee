"""Vision-language models: detection, loading, which parameters train, and rendering with images.

A model folder is a VLM when its config has a ``vision_config`` (LLaVA, Idefics3/SmolVLM, Qwen2-VL,
Gemma 3, ...). It loads with ``AutoProcessor`` and ``AutoModelForImageTextToText`` (safetensors only,
remote code only when asked), as text models load through :mod:`alignpipe.core.models`.

Rendering follows :mod:`alignpipe.core.chat`: the prompt, with one ``{"type": "image"}`` part per image
before the text of its first user message (TRL's placement, as stored by ``prepare``), goes through the
processor's chat template and the processor (which expands each image token to the image's feature
tokens and makes the pixel inputs), once; the completion is what the template adds after the prompt,
cut after its first EOS, tokenized with ``add_special_tokens=False``. A prompt is never cut (a cut
could split an image's tokens); a completion is, keeping its start.
"""

from __future__ import annotations

import io
import json
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from alignpipe.core.chat import Encoded, Message, TruncationError, _completion_ids, _completion_text
from alignpipe.core.models import ModelFolderError, check_model_folder, pick_device, resolve_dtype

if TYPE_CHECKING:
    from alignpipe.params import PeftParams

# Which parameters a VLM stage trains (``sft.vlm_trainable``, ``dpo.vlm_trainable``): the language model
# only (the default; the tower and the projector frozen), the projector too, or everything.
Trainable = Literal["language_model", "language_model+projector", "all"]
# Processor outputs that are token-level (laid out by the collators), not per-image pixel inputs.
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def is_vision_config(config: Any) -> bool:
    """Whether a transformers config is a vision-language model's (it has a vision sub-config)."""
    return getattr(config, "vision_config", None) is not None


def is_vision_model_folder(path: str | os.PathLike) -> bool:
    """Whether the model folder at ``path`` holds a VLM: its ``config.json`` has a ``vision_config`` (read
    as JSON, nothing loaded; a folder without one is not a VLM, and the text loaders say what is missing)."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("vision_config") is not None


def load_processor(path: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """The processor of a VLM folder; its tokenizer gets the EOS as pad token when it has none."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelFolderError(
            f"{path}: cannot load the processor ({' '.join(str(exc).split())[:300]})"
        ) from None
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelFolderError(f"{path}: the tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_image_text_model(
    path: str | os.PathLike,
    dtype: str = "auto",
    device: torch.device | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """A VLM folder (safetensors only) through ``AutoModelForImageTextToText``, onto ``device`` in ``dtype``."""
    from safetensors import SafetensorError
    from transformers import AutoModelForImageTextToText

    device = device or pick_device()
    check_model_folder(path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            str(path),
            dtype=resolve_dtype(dtype, device),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelFolderError(
            f"{path}: cannot load the model ({' '.join(str(exc).split())[:300]})"
        ) from None
    return model.to(device)


def _language_and_vision(model: nn.Module) -> tuple[set[int], set[int]]:
    """Ids of the language model's parameters (decoder, LM head, token embeddings) and the vision tower's;
    the rest (the projector) is neither."""
    vision = model.get_encoder(modality="image")
    if vision is model:
        raise ValueError(f"{type(model).__name__}: no vision tower found (not a vision-language model?)")
    decoder, head, embed = model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings()
    lm = {id(p) for m in (decoder, head, embed) if m is not None for p in m.parameters()}
    return lm, {id(p) for p in vision.parameters()}


def set_trainable(model: nn.Module, trainable: Trainable = "language_model") -> dict[str, int]:
    """Freeze what ``trainable`` leaves out (the vision tower unless ``all``, the projector too by
    default); returns the trained and frozen parameter counts. The LM head and the token embeddings train
    with the language model."""
    if trainable not in typing.get_args(Trainable):
        raise ValueError(f"vlm_trainable: {trainable!r} is none of {', '.join(typing.get_args(Trainable))}")
    lm, vision = _language_and_vision(model)
    trained = {id(p) for p in model.parameters()} if trainable == "all" else set(lm)
    if trainable == "language_model+projector":
        trained |= {id(p) for p in model.parameters() if id(p) not in vision}
    counts = {"trained": 0, "frozen": 0}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
        counts["trained" if id(p) in trained else "frozen"] += p.numel()
    return counts


def fully_trained_modules(model: nn.Module, trainable: Trainable) -> list[str]:
    """Full names of the largest modules outside the language model that ``trainable`` trains (the
    projector; the vision tower too with ``all``): peft's ``modules_to_save`` when LoRA adapts the
    language model. A parameter of such a part held by no module of its own is refused in one line."""
    if trainable == "language_model":
        return []
    lm, vision = _language_and_vision(model)
    wanted = {id(p) for p in model.parameters() if id(p) not in lm and (trainable == "all" or id(p) not in vision)}  # fmt: skip
    names: list[str] = []
    covered: set[int] = set()
    for name, module in model.named_modules():
        ids = {id(p) for p in module.parameters()}
        if name and ids and ids <= wanted and not ids <= covered:
            names.append(name)
            covered |= ids
    loose = [n for n, p in model.named_parameters() if id(p) in wanted and id(p) not in covered]
    if loose:
        raise ValueError(f"vlm_trainable {trainable} with LoRA: {loose[0]} belongs to no module peft can "
                         "train in full (modules_to_save); use peft.enabled: false")  # fmt: skip
    return names


def apply_vision_lora(model: nn.Module, peft: PeftParams, trainable: Trainable) -> nn.Module:
    """LoRA adapters on the language model's linear layers (``peft.target_modules`` among them), never the
    tower, the projector or the LM head; what else ``trainable`` names trains in full (``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout,
                        target_modules=language_model_lora_targets(model, peft.target_modules),
                        modules_to_save=fully_trained_modules(model, trainable) or None)  # fmt: skip
    return get_peft_model(model, config)


def language_model_lora_targets(model: nn.Module, names: Sequence[str] | str = "all-linear") -> list[str]:
    """Full names of the language model's linear layers (all, or those whose last name part is in
    ``names``): peft's ``target_modules`` for LoRA on the language model only (never the vision tower,
    the projector or the LM head)."""
    decoder = model.get_decoder()
    inside = {id(m) for m in decoder.modules()}
    wanted = None if names == "all-linear" else set([names] if isinstance(names, str) else names)
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m) in inside and (wanted is None or name.rsplit(".", 1)[-1] in wanted)]  # fmt: skip


def image_parts(messages: Sequence[Message], n_images: int) -> list[dict[str, Any]]:
    """``messages`` with content parts: ``n_images`` image parts before the first user message's text."""
    out, placed = [], False
    for msg in messages:
        parts: list[dict[str, Any]] = [{"type": "text", "text": msg["content"]}]
        if msg["role"] == "user" and not placed:
            parts, placed = [{"type": "image"}] * n_images + parts, True
        out.append({"role": msg["role"], "content": parts})
    return out


def open_images(images: Sequence[dict[str, Any]]) -> list[Any]:
    """PIL images (RGB) of an ``images`` column's entries (``{"bytes", "path"}``)."""
    from PIL import Image

    return [Image.open(io.BytesIO(image["bytes"])).convert("RGB") for image in images]


@dataclass(frozen=True)
class VisionEncoded:
    """A prompt with images and a completion as token ids (the prompt's image tokens expanded), and the
    processor's per-row image inputs (``pixel_values`` and, by model, ``image_sizes``, ``image_grid_thw``...)."""

    encoded: Encoded
    pixel_inputs: dict[str, Tensor]
    n_images: int


def encode_vision_completion(
    processor: Any,
    prompt: list[Message],
    completion: list[Message],
    images: Sequence[dict[str, Any]],
    max_length: int | None = None,
) -> VisionEncoded:
    """Tokenize a prompt with ``images`` and its assistant completion, once (see the module doc)."""
    parts_prompt = image_parts(prompt, len(images))
    parts_completion = [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in completion
    ]
    prompt_text, completion_text = _completion_text(processor, parts_prompt, parts_completion)
    inputs = processor(text=[prompt_text], images=[open_images(images)] if images else None,
                       add_special_tokens=False, return_tensors="pt")  # fmt: skip
    prompt_ids = inputs["input_ids"][0].tolist()
    completion_ids = _completion_ids(processor.tokenizer, completion_text)
    pixels = {k: v for k, v in inputs.items() if k not in TEXT_KEYS}
    cut = False
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room < 1:
            raise TruncationError(
                f"the prompt and its images take {len(prompt_ids)} of {max_length} tokens; a prompt with "
                "images is never cut, so nothing of the completion is left"
            )
        cut, completion_ids = len(completion_ids) > room, completion_ids[:room]
    return VisionEncoded(Encoded(prompt_ids, completion_ids, completion_cut=cut), pixels, len(images))


def image_token_id(model_or_config: Any) -> int:
    """The placeholder token id whose positions receive image features."""
    config = getattr(model_or_config, "config", model_or_config)
    for key in ("image_token_id", "image_token_index"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    raise ValueError(f"{type(config).__name__}: no image_token_id in the config")


def model_folder_kind(path: str | Path) -> str:
    """``"vision"`` or ``"text"``: which loader a stage dispatches to, once, for the model at ``path``."""
    return "vision" if is_vision_model_folder(path) else "text"
