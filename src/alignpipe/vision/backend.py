"""The ``generate`` stage's backend for a vision-language model (the model folder has a vision config).

Prompts carry their images (``prompts.parquet``'s ``images`` column, written by ``prepare``); each is
rendered once through the processor's chat template (:func:`build_vision_requests`, image parts before
the first user text) and sampled ``n`` times with :func:`alignpipe.vision.generate.sample_with_images`
(transformers' ``generate``, pixel inputs prefilled with the prompt), or, with ``backend: vllm``, sent
to vLLM as one request per prompt (:class:`VisionVllmBackend`: its token ids with one image placeholder
per image, ``multi_modal_data={"image": [PIL images]}`` and ``SamplingParams(n=N)``; vLLM expands each
placeholder to the image's feature tokens), under the seed rule of :mod:`alignpipe.generation.base`.
The samples are the text path's :class:`Sample` rows, so the generations artifact keeps its schema:
images stay in ``prompts.parquet`` and later stages join them by ``prompt_id`` (no image bytes copied
per sample). Not built yet: ``stop`` strings with the hf backend (refused in one line; vLLM has them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from alignpipe.core.chat import Message, encode_ids
from alignpipe.generation.base import (
    Backend,
    GenerationError,
    Progress,
    PromptRequest,
    Sample,
    derive_seed,
    resolve_backend,
)
from alignpipe.generation.vllm import VllmBackend, sampling_kwargs
from alignpipe.params import SamplingParams
from alignpipe.vision.generate import sample_with_images
from alignpipe.vision.models import image_parts, load_image_text_model, open_images


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
    fingerprint hashes; the prompt id covers the images' bytes), with its seed and images. ``token_ids``
    are the text's tokens, one image placeholder per image (not expanded: vLLM expands them)."""
    out = []
    for prompt, imgs, key in zip(prompts, images, keys, strict=True):
        text = processor.apply_chat_template(image_parts(prompt, len(imgs)), tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        ids = encode_ids(processor.tokenizer, text)
        out.append(VisionRequest(text, ids, derive_seed(seed, key), list(prompt), list(imgs)))
    return out


def open_vision_backend(
    model_dir: str | os.PathLike, settings: SamplingParams, processor: Any, requests: Sequence[PromptRequest]
) -> Backend:
    """The backend ``settings.backend`` resolves to (as for text), loaded for these image ``requests``."""
    if resolve_backend(settings.backend) == "vllm":
        max_images = max((len(r.images) for r in requests if isinstance(r, VisionRequest)), default=1)
        return VisionVllmBackend(model_dir, settings, max_images)
    return VisionHFBackend.load(model_dir, settings, processor)


def vision_vllm_inputs(
    requests: Sequence[PromptRequest], settings: SamplingParams, n: int, sampling_params_cls: Any
) -> tuple[list[dict[str, Any]], list[Any]]:
    """The ``prompts`` and per-prompt ``sampling_params`` lists of ``LLM.generate`` for image requests:
    ``{"prompt_token_ids", "multi_modal_data": {"image": [PIL images]}}`` (no images: token ids only)."""
    prompts: list[dict[str, Any]] = []
    for r in requests:
        if not isinstance(r, VisionRequest):
            raise GenerationError("a vision-language model needs requests built by build_vision_requests")
        prompt: dict[str, Any] = {"prompt_token_ids": list(r.token_ids)}
        if r.images:
            prompt["multi_modal_data"] = {"image": open_images(r.images)}
        prompts.append(prompt)
    params = [sampling_params_cls(**sampling_kwargs(settings, n, r.seed)) for r in requests]
    return prompts, params


class VisionVllmBackend(VllmBackend):
    """N samples per image prompt from vLLM: the text backend's engine, settings, seeds and output checks,
    with ``limit_mm_per_prompt`` and :func:`vision_vllm_inputs` for the requests."""

    def __init__(self, model_dir: str | os.PathLike, settings: SamplingParams, max_images: int = 1,
                 llm: Any = None) -> None:  # fmt: skip
        super().__init__(
            model_dir, settings, llm, engine_extra={"limit_mm_per_prompt": {"image": max(1, max_images)}}
        )

    def build_inputs(self, requests: Sequence[PromptRequest], n: int) -> tuple[list[Any], list[Any]]:
        return vision_vllm_inputs(requests, self.settings, n, self.sampling_params_cls)


class VisionHFBackend:
    """N samples per image prompt through transformers' ``generate`` (the backend name stays ``hf``)."""

    name = "hf"

    def __init__(self, model: Any, processor: Any, settings: SamplingParams):
        self.model, self.processor, self.settings = model, processor, settings

    @classmethod
    def load(cls, model_dir: str | os.PathLike, settings: SamplingParams, processor: Any) -> VisionHFBackend:
        if settings.stop:
            raise GenerationError(
                f"{model_dir}: stop strings on a vision-language model need backend: vllm "
                "(the hf backend has none yet)"
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
