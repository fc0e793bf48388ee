"""A tiny vision-language model built in-process, for tests (no download).

A LLaVA-style model: a 2-layer CLIP vision tower on 16x16 images in 8x8 patches (4 image tokens per
image once the CLS token is dropped), a projector, and the 2-layer Llama of :mod:`alignpipe.testing`.
Its processor is ``LlavaProcessor`` with the PIL image processor (no torchvision) and the tiny
byte-level tokenizer plus an ``<image>`` token; the chat template renders ``{"type": "image"}`` parts
as ``<image>`` (the processor expands each to the image's tokens).

``python -m alignpipe.testing_vlm OUT_DIR`` writes it in HF format (safetensors, processor, template).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignpipe.testing import save_cli, tiny_config, tiny_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 16, 8
# ChatML with content parts: a string, or a list of {"type": "image"} / {"type": "text", "text": ...}. No
# newline after the last message, so that the completion TRL's collator appends ends at the EOS, as ours.
VLM_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_vlm_processor() -> Any:
    """LlavaProcessor: PIL CLIP-style image processor (16x16 crops) and the tiny tokenizer + ``<image>``."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = VLM_CHATML_TEMPLATE
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=VLM_CHATML_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )


def tiny_vlm(processor: Any, seed: int = 0, **text_overrides: Any) -> Any:
    """A LlavaForConditionalGeneration of about 150k parameters, on sdpa (``text_overrides``: fields of
    the Llama's config, e.g. the head size 32 that vLLM's CPU attention needs)."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = processor.tokenizer
    text = tiny_config(len(tokenizer), **text_overrides)
    text.bos_token_id, text.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    text.pad_token_id = tokenizer.pad_token_id
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=16)  # fmt: skip
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return LlavaForConditionalGeneration(config).eval()


def square_png(rgb: tuple[int, int, int], size: int = IMAGE_SIZE) -> bytes:
    """PNG bytes of a ``size`` x ``size`` square of one colour."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def colour_reward(prompts: list, completions: list[str], images: list[list[Any]]) -> list[float]:
    """A ``python`` reward for "what colour is this square?": 1.0 when the answer names the colour of
    the prompt's (first) image, exactly; 0.0 otherwise."""
    names = {(255, 0, 0): "red", (0, 255, 0): "green", (0, 0, 255): "blue"}
    truth = [names.get(tuple(row[0].convert("RGB").getpixel((0, 0)))) for row in images]
    return [float(answer.strip().lower() == t) for answer, t in zip(completions, truth, strict=True)]


def save_tiny_vlm(out_dir: str | Path, seed: int = 0, **text_overrides: Any) -> Path:
    """Write the tiny VLM folder (safetensors, processor, tokenizer, chat template, generation config)."""
    out_dir = Path(out_dir)
    processor = tiny_vlm_processor()
    model = tiny_vlm(processor, seed=seed, **text_overrides)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    to_checkpoint_layout(out_dir / "model.safetensors")
    return out_dir


def to_checkpoint_layout(weights: Path) -> None:
    """Rename the CLIP tower's weights to the layout of llava-hf checkpoints (``vision_tower.vision_model.*``).

    transformers 5 keeps the CLIP tower without its ``vision_model`` prefix in memory and, for a model built
    from a config (no checkpoint loaded), saves it so (``vision_tower.embeddings.*``); vLLM 0.32 rejects that
    folder ("There is no module or parameter named 'vision_tower.embeddings'"). transformers loads both
    layouts, and a model loaded from this one saves it again (so ``sft`` and ``dpo`` outputs keep it)."""
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    state = {(k.replace("vision_tower.", "vision_tower.vision_model.", 1)
              if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
             for k, v in state.items()}  # fmt: skip
    save_file(state, weights, metadata={"format": "pt"})


def main(argv: Sequence[str] | None = None) -> None:
    save_cli(save_tiny_vlm, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
