"""Sampling completions from a causal LM: one interface, two backends.

- ``hf`` (:mod:`alignpipe.generation.hf`): transformers on CPU or GPU, a custom
  sampling loop over the KV cache (prompt prefilled once, cache repeated N times,
  finished rows dropped, batches grouped by prompt length).
- ``vllm`` (:mod:`alignpipe.generation.vllm`): one request per prompt with
  ``SamplingParams(n=N)``, so a prompt's N samples share its KV cache.

``backend: auto`` picks vLLM when it is importable and a GPU is there, else hf
(:func:`resolve_backend`); :mod:`alignpipe.generation.load` loads the chosen one.

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

import hashlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from alignpipe.core.chat import Message, encode_ids, render_prompt

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
