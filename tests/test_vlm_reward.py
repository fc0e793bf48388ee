"""``reward.kind: hf`` with a vision-language reward model: a tiny Gemma3ForSequenceClassification."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from alignpipe.params import RewardParams
from alignpipe.rewards.base import RewardError, score_completions
from alignpipe.rewards.hf import HFReward
from alignpipe.rewards.hf_vision import VisionHFReward
from alignpipe.rewards.load import get_reward
from alignpipe.testing_vlm import square_png
from alignpipe.testing_vlm_reward import save_tiny_gemma3_reward

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def square(rgb: tuple[int, int, int]) -> Image.Image:
    return Image.open(io.BytesIO(square_png(rgb))).convert("RGB")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_gemma3_reward(tmp_path_factory.mktemp("gemma3_rm"))


def reward_of(folder, **kw) -> VisionHFReward:
    params = RewardParams(kind="hf", model=str(folder), dtype="float32", **kw)
    reward = get_reward(params)
    assert isinstance(reward, VisionHFReward)
    return reward


PROMPTS = [
    [{"role": "user", "content": "What colour is this square?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour?"}],
    [{"role": "user", "content": "Name the colour of the square, please."}],
]
ANSWERS = ["red", "It is green, I think.", "blue"]


def own_forward(folder, prompt, completion, images) -> float:
    """The model's own forward on the processor's inputs of the conversation (no alignpipe code)."""
    from transformers import AutoModelForSequenceClassification, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    model.config.get_text_config().pad_token_id = None  # one row: the head reads its last token (an EOS)
    parts = []
    for m in prompt:
        content = [{"type": "text", "text": m["content"]}]
        if m["role"] == "user":
            content = [{"type": "image"}] * len(images) + content
        parts.append({"role": m["role"], "content": content})
    parts.append({"role": "assistant", "content": [{"type": "text", "text": completion}]})
    text = processor.apply_chat_template(parts, tokenize=False)
    inputs = processor(text=[text], images=[images], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0, 0].item()


def test_scores_equal_the_models_own_forward_and_see_the_image(folder):
    reward = reward_of(folder)
    images = [[square(RED)], [square(GREEN)], [square(BLUE), square(RED)]]
    results = score_completions(reward, PROMPTS, ANSWERS, images=images)
    for prompt, answer, imgs, res in zip(PROMPTS, ANSWERS, images, results, strict=True):
        assert res.reward == pytest.approx(own_forward(folder, prompt, answer, imgs), abs=1e-5)
        assert res.details["truncated"] is False
    # the same conversation with another image scores differently
    other = score_completions(reward, PROMPTS[:1], ANSWERS[:1], images=[[square(BLUE)]])[0].reward
    assert abs(other - results[0].reward) > 1e-3
    assert other == pytest.approx(own_forward(folder, PROMPTS[0], ANSWERS[0], [square(BLUE)]), abs=1e-5)


def test_batch_size_does_not_change_the_scores(folder):
    images = [[square(RED)], [square(GREEN)], [square(BLUE)]]
    one = [
        r.reward for r in score_completions(reward_of(folder, batch_size=1), PROMPTS, ANSWERS, images=images)
    ]
    three = [
        r.reward for r in score_completions(reward_of(folder, batch_size=3), PROMPTS, ANSWERS, images=images)
    ]
    assert three == pytest.approx(one, abs=1e-5)
    assert len(set(one)) == 3


def test_truncation_cuts_text_only_and_is_counted(folder):
    reward = reward_of(folder)
    whole = reward.encode_row(PROMPTS[0], "red " * 40, [square(RED)])[0]["input_ids"].shape[1]
    reward.max_length = whole - 10
    inputs, cut = reward.encode_row(PROMPTS[0], "red " * 40, [square(RED)])
    assert cut == "prompt"
    assert inputs["input_ids"].shape[1] <= reward.max_length
    assert (inputs["input_ids"] == reward.model.config.image_token_id).sum() == 4  # the image's 4 tokens stay
    res = score_completions(reward, PROMPTS[:1], ["red " * 40], images=[[square(RED)]])[0]
    assert res.details["truncated_part"] == "prompt" and res.details["tokens"] <= reward.max_length
    # even an empty user text leaves no room: the completion loses its end too, the image stays
    empty = [{"role": "user", "content": ""}]
    reward.max_length = reward.encode_row(empty, "red red", [square(RED)])[0]["input_ids"].shape[1]
    inputs, cut = reward.encode_row(PROMPTS[0], "red " * 40, [square(RED)])
    assert cut == "both" and inputs["input_ids"].shape[1] <= reward.max_length
    assert (inputs["input_ids"] == reward.model.config.image_token_id).sum() == 4


def test_missing_images_or_processor_fail_in_one_line(folder, tmp_path):
    with pytest.raises(RewardError) as info:
        score_completions(reward_of(folder), PROMPTS, ANSWERS)
    assert "vision-language reward model" in str(info.value) and "\n" not in str(info.value)
    broken = tmp_path / "no_processor"
    broken.mkdir()
    for f in folder.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RewardError) as info:
        reward_of(broken)
    assert "vision-language model" in str(info.value) and "\n" not in str(info.value)


def test_a_text_reward_model_refuses_prompts_with_images(tmp_path):
    from transformers import LlamaForSequenceClassification

    from alignpipe.testing import tiny_config, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = tiny_config(len(tok), num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    reward = get_reward(RewardParams(kind="hf", model=str(tmp_path / "rm"), dtype="float32"))
    assert type(reward) is HFReward
    with pytest.raises(RewardError) as info:
        score_completions(reward, PROMPTS[:1], ANSWERS[:1], images=[[square(RED)]])
    assert "text reward model" in str(info.value) and "\n" not in str(info.value)
    # no images (or none per row): scored on the text, as before
    assert len(score_completions(reward, PROMPTS[:1], ANSWERS[:1], images=[[]])) == 1
