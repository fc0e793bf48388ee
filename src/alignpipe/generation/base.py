"""Sampling completions from a causal LM: one interface, two backends.

- ``hf`` (:mod:`alignpipe.generation.hf`): transformers on CPU or GPU, a custom
  sampling loop over the KV cache (prompt prefilled once, cache repeated N times,
  finished rows dropped, batches grouped by prompt length).
- ``vllm`` (:mod:`alignpipe.generation.vllm`): one request per prompt with
  ``SamplingParams(n=N)``, so a prompt's N samples share its KV cache.

``backend: auto`` picks vLLM when it is importable and a GPU is there, else hf.

Prompts are rendered with the model's chat template and tokenized once, here
(:func:`build_requests`), so both backends get the same token ids.

Seeds: each prompt gets a seed derived from ``settings.seed`` and its id, and its
sample ``j`` uses ``prompt_seed + j`` (vLLM's own rule for the children of an
``n > 1`` request). A sample therefore does not depend on which other prompts
were in its batch, chunk or shard. ``logprob`` is the sum of the sampled tokens'
log-probs under the model's raw distribution (before temperature and top-k/p),
EOS included, as vLLM reports it by default.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from alignpipe.core.chat import Message, encode_ids, render_prompt, require_chat_template
from alignpipe.params import SamplingParams

BackendName = Literal["hf", "vllm"]
Progress = Callable[[int], None]  # called with the number of prompts just finished
SEED_BITS = 62  # prompt seeds stay below 2**62 so prompt_seed + j fits an int64 column


class GenerationError(RuntimeError):
    """A backend cannot run here (not installed, no GPU) or returned something unexpected."""


@dataclass(frozen=True)
class PromptRequest:
    """One rendered prompt: its chat-template text, its token ids and its seed."""

    text: str
    token_ids: list[int]
    seed: int


@dataclass(frozen=True)
class Sample:
    """One sampled completion of prompt ``prompt_index`` (an index into the request list)."""

    prompt_index: int
    sample_idx: int
    completion: str
    n_tokens: int  # generated tokens, the closing EOS included
    finish_reason: Literal["stop", "length"]
    logprob: float | None
    seed: int


class Backend(Protocol):
    name: BackendName

    def generate(
        self, requests: Sequence[PromptRequest], n: int, progress: Progress | None = None
    ) -> list[Sample]:
        """``n`` samples per request, ordered by (prompt_index, sample_idx)."""
        ...

    def close(self) -> None: ...


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(name: str) -> BackendName:
    """``auto`` -> vllm when vLLM is importable and a GPU is there, else hf; explicit names are checked."""
    if name == "hf":
        return "hf"
    if name == "vllm":
        if not vllm_importable():
            raise GenerationError(
                "backend 'vllm' needs vLLM: pip install 'alignpipe[vllm]' (or use backend: hf)"
            )
        if not cuda_available():
            raise GenerationError("backend 'vllm' needs a CUDA GPU; none is visible (use backend: hf)")
        return "vllm"
    if name == "auto":
        return "vllm" if vllm_importable() and cuda_available() else "hf"
    raise GenerationError(f"unknown generation backend '{name}' (auto | vllm | hf)")


def derive_seed(seed: int, key: str) -> int:
    """A stable 62-bit seed for ``key`` (a prompt id) under the run seed ``seed``."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS)


def build_requests(
    tokenizer: Any, prompts: Sequence[list[Message]], keys: Sequence[str], seed: int
) -> list[PromptRequest]:
    """Render each prompt with the chat template, tokenize it once and give it its seed."""
    if len(prompts) != len(keys):
        raise ValueError(f"{len(prompts)} prompts but {len(keys)} keys")
    requests = []
    for prompt, key in zip(prompts, keys, strict=True):
        text = render_prompt(tokenizer, prompt)
        requests.append(PromptRequest(text, encode_ids(tokenizer, text), derive_seed(seed, key)))
    return requests


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


__all__ = [
    "Backend",
    "GenerationError",
    "PromptRequest",
    "Sample",
    "build_requests",
    "derive_seed",
    "load_chat_tokenizer",
    "loaded_backend",
    "open_backend",
    "resolve_backend",
    "sample",
]
