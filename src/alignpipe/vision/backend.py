"""The ``generate`` stage's backend for a vision-language model (the model folder has a vision config).

Prompts carry their images (``prompts.parquet``'s ``images`` column, written by ``prepare``); each is
rendered once through the processor's chat template (:func:`build_vision_requests`, image parts before
the first user text) and sampled ``n`` times with :func:`alignpipe.vision.generate.sample_with_images`
(transformers' ``generate``, pixel inputs prefilled with the prompt), under the seed rule of
:mod:`alignpipe.generation.base`. The samples are the text path's :class:`Sample` rows, so the
generations artifact keeps its schema: images stay in ``prompts.parquet`` and later stages join them
by ``prompt_id`` (no image bytes copied per sample). Not built yet: vLLM's ``multi_modal_data`` and
``stop`` strings on a VLM (both refused in one line).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from alignpipe.core.chat import Message
from alignpipe.generation.base import GenerationError, Progress, PromptRequest, Sample, derive_seed
from alignpipe.params import SamplingParams
from alignpipe.vision.generate import sample_with_images
from alignpipe.vision.models import image_parts, load_image_text_model


@dataclass(frozen=True)
class VisionRequest(PromptRequest):
    """A rendered prompt with its messages and images (``{"bytes", "path"}`` entries)."""

    prompt: list[Message] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)


def build_vision_requests(
    processor: Any,
    prompts: Sequence[list[Message]],
    images: Sequence[list[dict[str, Any]]],
    keys: Sequence[str],
    seed: int,
) -> list[VisionRequest]:
    """Each prompt rendered once through the processor's chat template (its ``text`` is what the
    fingerprint hashes; the prompt id covers the images' bytes), with its seed and images."""
    out = []
    for prompt, imgs, key in zip(prompts, images, keys, strict=True):
        text = processor.apply_chat_template(image_parts(prompt, len(imgs)), tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        out.append(VisionRequest(text, [], derive_seed(seed, key), list(prompt), list(imgs)))
    return out


class VisionHFBackend:
    """N samples per image prompt through transformers' ``generate`` (the backend name stays ``hf``)."""

    name = "hf"

    def __init__(self, model: Any, processor: Any, settings: SamplingParams):
        self.model, self.processor, self.settings = model, processor, settings

    @classmethod
    def load(cls, model_dir: str | os.PathLike, settings: SamplingParams, processor: Any) -> VisionHFBackend:
        if settings.backend == "vllm":
            raise GenerationError(
                f"{model_dir}: a vision-language model samples with backend: hf only for now "
                "(vLLM's multi_modal_data is not wired yet)"
            )
        if settings.stop:
            raise GenerationError(
                f"{model_dir}: stop strings are not supported on a vision-language model yet"
            )
        return cls(load_image_text_model(model_dir, settings.dtype).eval(), processor, settings)

    def generate(
        self, requests: Sequence[PromptRequest], n: int, progress: Progress | None = None
    ) -> list[Sample]:
        s, out = self.settings, []
        for i, req in enumerate(requests):
            if not isinstance(req, VisionRequest):
                raise GenerationError("a vision-language model needs requests built by build_vision_requests")
            samples = sample_with_images(self.model, self.processor, req.prompt, req.images, n,
                                         s.max_new_tokens, s.temperature, req.seed, top_p=s.top_p,
                                         top_k=s.top_k)  # fmt: skip
            out += [Sample(i, v.sample_idx, v.completion, v.n_tokens, v.finish_reason, v.logprob,
                           req.seed + v.sample_idx) for v in samples]  # fmt: skip
            if progress is not None:
                progress(1)
        return out

    def close(self) -> None:
        self.model = None
