"""Devices, dtypes, seeds and model loading shared by every stage.

Weights load from safetensors only and never run remote code unless the params
ask, so an artifact folder can't execute anything on load.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from alignpipe.training.precision import resolve_dtype  # the one dtype policy (re-exported)


class ModelFolderError(ValueError):
    """A model folder is missing, incomplete or not loadable."""


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def cpu_only() -> bool:
    """No accelerator here: accelerate and the Trainer must be told (``cpu=True``), else processes
    started by torchrun (``accelerate launch --multi_gpu``) each train alone instead of joining gloo."""
    return not torch.accelerator.is_available()


def deepspeed_launch() -> bool:
    """Started by ``accelerate launch`` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_kwargs() -> dict[str, Any]:
    """``Accelerator(**...)`` for this machine: on CPU ``cpu=True`` (see :func:`cpu_only`), except under
    DeepSpeed, which accelerate skips on a ``cpu=True`` state: there the gloo backend, named."""
    if not cpu_only():
        return {}
    if deepspeed_launch():
        from accelerate.utils import InitProcessGroupKwargs

        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def check_model_folder(path: str | os.PathLike, what: str = "model") -> Path:
    """Fail clearly if ``path`` is not an HF model folder with safetensors weights."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"{path}: {what} folder missing (run the stage that writes it)")
    if not (path / "config.json").exists():
        raise ModelFolderError(f"{path}: no config.json, not a Hugging Face model folder")
    if not any(path.glob("*.safetensors")):
        raise ModelFolderError(f"{path}: no *.safetensors weights (alignpipe never loads pickled weights)")
    return path


# What transformers builds a tokenizer from: a `tokenizers` file, a sentencepiece model, BPE or
# WordPiece vocabularies, or a tiktoken file.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.json", "vocab.txt", "tiktoken.model")  # fmt: skip


def check_tokenizer_folder(path: str | os.PathLike, what: str = "model") -> Path:
    """Fail clearly if the local folder ``path`` holds no tokenizer files (transformers would say
    "install sentencepiece or tiktoken", naming no folder)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"{path}: {what} folder missing (run the stage that writes it)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise ModelFolderError(
            f"{path}: no tokenizer files in the {what} folder (none of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer next to the weights (tokenizer.save_pretrained)"
        )
    return path


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model folder (or hub id); a local folder without one fails naming it."""
    from transformers import AutoTokenizer

    local = Path(path).is_dir()
    if local:
        check_tokenizer_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if not local:
            raise
        raise ModelFolderError(
            f"{path}: cannot load the tokenizer ({' '.join(str(exc).split())[:300]})"
        ) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelFolderError(f"{path}: the tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str | os.PathLike,
    dtype: str = "auto",
    device: torch.device | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """Load a causal LM folder (safetensors only) onto ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    check_model_folder(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=resolve_dtype(dtype, device),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a truncated or corrupt file
        raise ModelFolderError(
            f"{path}: cannot load the model ({' '.join(str(exc).split())[:300]})"
        ) from None
    return model.to(device)


def load_causal_lm_4bit(path: str | os.PathLike, device: torch.device | None = None) -> Any:
    """QLoRA's base: NF4 4-bit linear layers (double quantization, bf16 compute), prepared for k-bit
    training (the other weights in float32, all frozen). bitsandbytes runs it on CPU too."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_model_folder(path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        quantization_config=quantization,
        dtype=torch.bfloat16,
        device_map={"": device or pick_device()},
        use_safetensors=True,
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, so the inputs need no
    ``requires_grad`` and dropout masks are replayed). transformers 5 renamed the method."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 4.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
