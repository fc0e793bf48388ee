"""Sampling N completions per image prompt from a VLM with transformers' ``generate`` (the HF path).

Each prompt (its messages and images, rendered once through the processor as for scoring) is
prefilled with its pixel inputs and sampled ``n`` times (``num_return_sequences``), with the seed rule
of :mod:`alignpipe.generation.base`: sample ``j`` of a prompt uses ``prompt_seed + j``, so it does not
depend on the other samples. ``logprob`` is the sum of the sampled tokens' log-probs under the model's
raw distribution (before temperature), the closing EOS included. ``generate`` prefills each sample
alone (it would expand the pixel inputs per returned sequence anyway): the vision tower runs once per
sample here (vLLM, ``backend: vllm``, prefills a prompt once for its N samples: :mod:`alignpipe.vision.backend`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from alignpipe.core.chat import Message
from alignpipe.vision.models import image_parts, open_images


@dataclass(frozen=True)
class VisionSample:
    sample_idx: int
    completion: str
    token_ids: list[int]
    n_tokens: int  # generated tokens, the closing EOS included
    finish_reason: Literal["stop", "length"]
    logprob: float


def prompt_inputs(processor: Any, prompt: Sequence[Message], images: Sequence[dict[str, Any]]) -> Any:
    """The processor's inputs of one prompt with its images (generation prompt appended)."""
    text = processor.apply_chat_template(
        image_parts(prompt, len(images)), tokenize=False, add_generation_prompt=True
    )
    return processor(text=[text], images=[open_images(images)] if images else None, add_special_tokens=False,
                     return_tensors="pt")  # fmt: skip


@torch.inference_mode()
def sample_with_images(
    model: Any,
    processor: Any,
    prompt: Sequence[Message],
    images: Sequence[dict[str, Any]],
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    top_p: float = 1.0,
    top_k: int = 0,
) -> list[VisionSample]:
    """``n`` completions of one image prompt (greedy when ``temperature`` is 0; ``top_k`` 0 is off)."""
    device = next(model.parameters()).device
    inputs = prompt_inputs(processor, prompt, images).to(device)
    eos = processor.tokenizer.eos_token_id
    prompt_len = inputs["input_ids"].shape[1]
    out = []
    for j in range(n):
        torch.manual_seed(seed + j)
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p} if temperature else {}
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=eos,
                             pad_token_id=processor.tokenizer.pad_token_id, output_logits=True,
                             return_dict_in_generate=True, do_sample=bool(temperature), **sampling)  # fmt: skip
        ids = gen.sequences[0, prompt_len:].tolist()
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
        logps = torch.stack(gen.logits[: len(ids)]).float().log_softmax(-1)[:, 0]
        logprob = float(logps.gather(-1, torch.tensor(ids, device=device)[:, None]).sum())
        text = processor.tokenizer.decode(ids, skip_special_tokens=True)
        finish = "stop" if ids and ids[-1] == eos else "length"
        out.append(VisionSample(j, text, ids, len(ids), finish, logprob))
    return out
