"""Load the backend that ``<section>.backend`` resolves to, and sample from a model folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

from alignpipe.core.chat import Message, require_chat_template
from alignpipe.generation.base import Backend, Progress, Sample, build_requests, resolve_backend
from alignpipe.params import SamplingParams


def open_backend(model_dir: str | os.PathLike, settings: SamplingParams, tokenizer: Any) -> Backend:
    """Load the model into the backend that ``settings.backend`` resolves to."""
    name = resolve_backend(settings.backend)
    if name == "vllm":
        from alignpipe.generation.vllm import VllmBackend

        return VllmBackend(model_dir, settings)
    from alignpipe.generation.hf import HFBackend

    return HFBackend.load(model_dir, settings, tokenizer)


@contextlib.contextmanager
def loaded_backend(
    model_dir: str | os.PathLike, settings: SamplingParams, tokenizer: Any
) -> Iterator[Backend]:
    backend = open_backend(model_dir, settings, tokenizer)
    try:
        yield backend
    finally:
        backend.close()


def load_chat_tokenizer(model_dir: str | os.PathLike) -> Any:
    from alignpipe.core.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    require_chat_template(tokenizer, where=str(model_dir))
    return tokenizer


def sample(
    model_dir: str | os.PathLike,
    prompts: Sequence[list[Message]],
    settings: SamplingParams,
    n: int = 1,
    keys: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[Sample]:
    """``n`` samples for each chat prompt from the model in ``model_dir``.

    ``keys`` (prompt ids; default: the prompt's position) fix each prompt's seed,
    so two models sampled with the same settings and keys draw the same random
    numbers (``evaluate`` compares SFT and DPO this way).
    """
    tokenizer = load_chat_tokenizer(model_dir)
    keys = list(keys) if keys is not None else [str(i) for i in range(len(prompts))]
    requests = build_requests(tokenizer, prompts, keys, settings.seed)
    with loaded_backend(model_dir, settings, tokenizer) as backend:
        return backend.generate(requests, n, progress)
