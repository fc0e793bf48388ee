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


def test_detection_and_loading_dispatch(tmp_path, tiny_model_dir):
    """A folder with a vision config is a VLM and loads through AutoProcessor + the image-text-to-text
    class; a text folder is not one."""
    from alignpipe.vision.models import load_image_text_model, load_processor, model_folder_kind

    save_tiny_vlm(tmp_path / "vlm")
    assert model_folder_kind(tmp_path / "vlm") == "vision" and model_folder_kind(tiny_model_dir) == "text"
    processor = load_processor(tmp_path / "vlm")
    model = load_image_text_model(tmp_path / "vlm", dtype="float32", device=torch.device("cpu"))
    assert (
        type(model).__name__ == "LlavaForConditionalGeneration"
        and processor.tokenizer.pad_token_id is not None
    )


def test_render_once_through_the_processor_template():
    """The prompt's image part comes before the first user text; the prompt ids are the processor's
    (image token expanded), the completion ends with one EOS and is the template's answer text."""
    from alignpipe.vision.models import encode_vision_completion, image_parts

    processor = tiny_vlm_processor()
    prompt = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what colour is this square?"},
    ]
    assert image_parts(prompt, 1)[1]["content"] == PROMPT[0]["content"]
    assert image_parts(prompt, 1)[0]["content"] == [{"type": "text", "text": "be brief"}]
    images = [{"bytes": square_png((255, 0, 0)), "path": None}]
    out = encode_vision_completion(processor, prompt, [{"role": "assistant", "content": "red"}], images)
    tok = processor.tokenizer
    text = tok.decode(out.encoded.prompt_ids)
    assert text == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n" + IMAGE_TOKEN * 4
        + "what colour is this square?<|im_end|>\n<|im_start|>assistant\n"
    )  # fmt: skip
    assert out.encoded.completion_ids == tok("red", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    assert out.pixel_inputs["pixel_values"].shape == (1, 3, 16, 16)
    cut = encode_vision_completion(processor, prompt, [{"role": "assistant", "content": "red " * 20}], images,
                                   max_length=len(out.encoded.prompt_ids) + 3)  # fmt: skip
    assert len(cut.encoded.completion_ids) == 3 and cut.encoded.completion_cut


def test_trainable_defaults_freeze_the_vision_tower_and_lora_targets_the_language_model():
    from peft import LoraConfig, get_peft_model

    from alignpipe.vision.models import language_model_lora_targets, set_trainable

    model = tiny_vlm(tiny_vlm_processor())
    counts = set_trainable(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("model.language_model.", "lm_head.")) for n in trained)
    assert counts["trained"] + counts["frozen"] == sum(p.numel() for p in model.parameters())
    set_trainable(model, "language_model+projector")
    assert any("multi_modal_projector" in n for n, p in model.named_parameters() if p.requires_grad)
    assert not any("vision_tower" in n for n, p in model.named_parameters() if p.requires_grad)
    set_trainable(model, "all")
    assert all(p.requires_grad for p in model.parameters())
    targets = language_model_lora_targets(model, ["q_proj", "v_proj"])
    assert len(targets) == 4 and all(t.startswith("model.language_model.layers.") for t in targets)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=language_model_lora_targets(model)))
    lora = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora and all(".language_model." in n for n in lora)
