"""VLM SFT and sampling on the tiny VLM: it learns "what colour is this square?" with its vision tower
frozen, answers by the image (the text is the same for every colour), and its samples' log-probs are
the scorer's."""

from __future__ import annotations

import pytest
import torch

from alignpipe.testing_vlm import square_png, tiny_vlm, tiny_vlm_processor
from alignpipe.vision.generate import sample_with_images
from alignpipe.vision.models import set_trainable
from alignpipe.vision.sft import IGNORE_INDEX, collate_vision_sft, encode_vision_sft

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
PROMPT = [{"role": "user", "content": "what colour is this square?"}]


def sft_rows() -> list[dict]:
    return [{"id": name, "prompt": PROMPT, "completion": [{"role": "assistant", "content": name}],
             "images": [{"bytes": square_png(rgb), "path": None}]} for name, rgb in COLOURS.items()]  # fmt: skip


@pytest.fixture(scope="module")
def trained():
    """The tiny VLM after 60 full-batch AdamW steps on the 3 colour rows (language model only)."""
    processor = tiny_vlm_processor()
    model = tiny_vlm(processor, seed=0)
    set_trainable(model)
    tower = {n: p.detach().clone() for n, p in model.get_encoder(modality="image").named_parameters()}
    batch = collate_vision_sft(encode_vision_sft(processor, sft_rows(), 64), processor.tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    model.train()
    losses = []
    for _ in range(60):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return processor, model.eval(), losses, tower, batch


def test_batch_masks_the_prompt_and_its_image_tokens():
    processor = tiny_vlm_processor()
    examples = encode_vision_sft(processor, sft_rows(), 64)
    batch = collate_vision_sft(examples, processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    image_token = processor.image_token_id
    assert int((batch["input_ids"] == image_token).sum()) == 12  # 4 per row
    assert not ((batch["input_ids"] == image_token) & (batch["labels"] != IGNORE_INDEX)).any()
    scored = (batch["labels"] != IGNORE_INDEX).sum(1).tolist()
    assert scored == [len(e.input_ids) - e.prompt_len for e in examples]


def test_sft_learns_colours_from_the_image_with_the_tower_frozen(trained):
    processor, model, losses, tower, _ = trained
    assert losses[-1] < 0.05 * losses[0]
    for name, p in model.get_encoder(modality="image").named_parameters():
        assert torch.equal(p, tower[name]), name  # frozen: not one step moved it
    for name, rgb in COLOURS.items():  # same text, three images: only the image tells the answer
        image = [{"bytes": square_png(rgb), "path": None}]
        (sample,) = sample_with_images(
            model, processor, PROMPT, image, n=1, max_new_tokens=8, temperature=0, seed=0
        )
        assert sample.completion == name and sample.finish_reason == "stop"


def test_samples_are_seeded_and_their_logprob_is_the_scorers(trained):
    """Sampling at T=1: seed s + j gives sample j again whatever n is; its reported log-prob equals the
    log-prob path's sum over its tokens (vision.logprobs, shared-prompt layout)."""
    from alignpipe.vision.logprobs import (
        VisionCompletionScorer,
        VisionPair,
        collate_vision_pairs,
        vision_pair_logps,
    )
    from alignpipe.vision.models import encode_vision_completion, image_token_id

    processor, model, _, _, _ = trained
    image = [{"bytes": square_png((0, 255, 0)), "path": None}]
    samples = sample_with_images(
        model, processor, PROMPT, image, n=3, max_new_tokens=6, temperature=1.0, seed=7
    )
    again = sample_with_images(
        model, processor, PROMPT, image, n=2, max_new_tokens=6, temperature=1.0, seed=7
    )
    assert [s.token_ids for s in again] == [s.token_ids for s in samples[:2]]
    enc = encode_vision_completion(processor, PROMPT, [{"role": "assistant", "content": "green"}], image)
    pair = VisionPair(
        "p",
        type(enc.encoded)(enc.encoded.prompt_ids, samples[0].token_ids),
        type(enc.encoded)(enc.encoded.prompt_ids, samples[1].token_ids),
        enc.pixel_inputs,
        1,
    )
    scorer = VisionCompletionScorer(model).eval()
    batch = collate_vision_pairs([pair], True, processor.tokenizer.pad_token_id, image_token_id(model),
                                 share_prompt=True)  # fmt: skip
    with torch.no_grad():
        out = vision_pair_logps(scorer, batch)
    expected = torch.tensor([samples[0].logprob, samples[1].logprob])
    torch.testing.assert_close(
        torch.stack([out.chosen_logps[0], out.rejected_logps[0]]), expected, atol=1e-4, rtol=0
    )


def test_python_reward_receives_images():
    """The python reward gets per-completion image lists; a function without 'images' is refused when
    there are images, and text scoring calls it as before."""
    from alignpipe.rewards.base import RewardError
    from alignpipe.rewards.python import PythonReward
    from alignpipe.vision.models import open_images

    reward = PythonReward("alignpipe.testing_vlm:colour_reward")
    images = [open_images([{"bytes": square_png(COLOURS[c])}]) for c in ("red", "blue", "green")]
    results = reward.score([PROMPT] * 3, ["red", "red", " Green"], [None] * 3, images=images)
    assert [r.reward for r in results] == [1.0, 0.0, 1.0]
    text_only = PythonReward("alignpipe.testing:tiny_tokenizer")  # any callable without 'images'
    with pytest.raises(RewardError, match="the prompts have images; give it an 'images' parameter"):
        text_only.score([PROMPT], ["red"], [None], images=images[:1])


def test_dpo_on_the_vlm_from_precomputed_reference_logps():
    """DPO steps on colour pairs (chosen: the image's colour, rejected: another colour; the same text for
    every image): at step 1 policy == reference, so the loss is ln 2 exactly; the reference log-probs
    precomputed once (as ref_logps does) equal a live reference pass; after training the policy ranks
    the true colour above the other one on every pair, with the vision tower frozen."""
    import math

    from alignpipe.core.objective import combined_loss
    from alignpipe.vision.logprobs import (
        VisionCompletionScorer,
        collate_vision_pairs,
        encode_vision_pair,
        vision_pair_logps,
    )
    from alignpipe.vision.models import image_token_id

    processor = tiny_vlm_processor()
    names = list(COLOURS)
    rows = [{"pair_id": f"{c}-{w}", "prompt": PROMPT, "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": w}], "images": [{"bytes": square_png(COLOURS[c])}]}
            for c in names for w in names if w != c]  # fmt: skip
    pairs = [encode_vision_pair(processor, row, max_length=64) for row in rows]
    policy, reference = tiny_vlm(processor, seed=3), tiny_vlm(processor, seed=3)
    set_trainable(policy)
    pad, image = processor.tokenizer.pad_token_id, image_token_id(policy)
    batch = collate_vision_pairs(pairs, True, pad, image, share_prompt=True)
    ref_scorer = VisionCompletionScorer(reference).eval().requires_grad_(False)
    with torch.no_grad():
        ref = vision_pair_logps(ref_scorer, batch)  # precomputed once
    scorer = VisionCompletionScorer(policy).train()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(40):
        out = vision_pair_logps(scorer, batch)
        loss = combined_loss(["sigmoid"], [1.0], out.chosen_logps, out.rejected_logps, ref.chosen_logps,
                             ref.rejected_logps, beta=0.1).mean()  # fmt: skip
        if step == 0:
            assert abs(float(loss.detach()) - math.log(2)) < 1e-6
            with torch.no_grad():
                live = vision_pair_logps(ref_scorer, collate_vision_pairs(pairs, False, pad, image))  # padded
            torch.testing.assert_close(live.chosen_logps, ref.chosen_logps, atol=1e-4, rtol=1e-6)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]
    with torch.no_grad():
        final = vision_pair_logps(scorer.eval(), batch)
    assert bool((final.chosen_logps > final.rejected_logps).all())  # each image's own colour wins
    assert not any(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in policy.get_encoder(modality="image").parameters()
    )
