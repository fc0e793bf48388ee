"""The tiny in-process VLM (alignpipe.testing_vlm): it saves and loads through the Auto classes."""

from __future__ import annotations

import io

import torch
from PIL import Image

from alignpipe.testing_vlm import IMAGE_TOKEN, save_tiny_vlm, square_png, tiny_vlm, tiny_vlm_processor

PROMPT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is this square?"}]}
]


def test_tiny_vlm_round_trip(tmp_path):
    """The saved folder loads with AutoProcessor and AutoModelForImageTextToText, gives the same logits,
    and the processor expands one image part to the tower's 4 patch tokens."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = tiny_vlm_processor()
    model = tiny_vlm(processor)
    save_tiny_vlm(tmp_path / "vlm")
    loaded_processor = AutoProcessor.from_pretrained(tmp_path / "vlm")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "vlm").eval()
    text = loaded_processor.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert text.count(IMAGE_TOKEN) == 1
    image = Image.open(io.BytesIO(square_png((255, 0, 0))))
    enc = loaded_processor(text=[text], images=[[image]], return_tensors="pt")
    assert int((enc.input_ids == processor.image_token_id).sum()) == 4  # (16 / 8)^2 patches
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, model(**enc).logits)
