"""A tiny Gemma3 vision-language reward model built in-process, for tests (no download).

``Gemma3ForSequenceClassification`` with one output: a 2-layer SigLIP tower on 16x16 images in 8x8
patches (4 image tokens per image), Gemma3's projector and a 2-layer Gemma3 text model. Its processor
is ``Gemma3Processor`` with the PIL image processor and the tiny byte-level tokenizer plus Gemma3's
``<start_of_image>``, ``<image_soft_token>`` and ``<end_of_image>`` tokens; the chat template is
:data:`alignpipe.testing_vlm.VLM_CHATML_TEMPLATE` with ``{"type": "image"}`` rendered as
``<start_of_image>`` (the processor expands it to the image's tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignpipe.testing import tiny_tokenizer
from alignpipe.testing_vlm import IMAGE_SIZE, PATCH_SIZE, VLM_CHATML_TEMPLATE

BOI, IMAGE_SOFT, EOI = "<start_of_image>", "<image_soft_token>", "<end_of_image>"
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2
GEMMA3_CHATML_TEMPLATE = VLM_CHATML_TEMPLATE.replace("{{ '<image>' }}", "{{ '" + BOI + "' }}")


def tiny_gemma3_processor() -> Any:
    """Gemma3Processor: PIL image processor (16x16, no pan and scan) and the tiny tokenizer + image tokens."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([BOI, IMAGE_SOFT, EOI], special_tokens=True)
    tokenizer._set_model_specific_special_tokens(
        {"boi_token": BOI, "image_token": IMAGE_SOFT, "eoi_token": EOI}
    )
    tokenizer.chat_template = GEMMA3_CHATML_TEMPLATE
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHATML_TEMPLATE,
        image_seq_length=TOKENS_PER_IMAGE,
    )


def tiny_gemma3_reward(processor: Any, seed: int = 0) -> Any:
    """A Gemma3ForSequenceClassification (num_labels=1) of about 100k parameters."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForSequenceClassification,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    tok = processor.tokenizer
    text = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        sliding_window=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)  # fmt: skip
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=tok.convert_tokens_to_ids(BOI),
        eoi_token_index=tok.convert_tokens_to_ids(EOI),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_SOFT),
        num_labels=1,
        architectures=["Gemma3ForSequenceClassification"],
    )
    config.pad_token_id = tok.pad_token_id
    model = Gemma3ForSequenceClassification(config).eval()
    with torch.no_grad():  # Gemma3 initialises the projector to zeros: the images would not count
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        weight.normal_(0.0, 1.0 / weight.shape[0] ** 0.5)
    return model


def save_tiny_gemma3_reward(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny Gemma3 reward model folder (safetensors, processor, tokenizer, chat template)."""
    out_dir = Path(out_dir)
    processor = tiny_gemma3_processor()
    tiny_gemma3_reward(processor, seed=seed).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
