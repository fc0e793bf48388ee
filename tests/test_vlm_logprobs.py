"""The log-prob path with pixel inputs on the tiny VLM: padded, packed, binned and shared-prompt layouts
give the log-probs of the model's own forward, each image goes through the vision tower once per pair."""

from __future__ import annotations

import contextlib
from collections import defaultdict

import pytest
import torch

from alignpipe.core.logprobs import pack_row_tokens
from alignpipe.testing_vlm import square_png, tiny_vlm, tiny_vlm_processor
from alignpipe.vision.logprobs import (
    VisionCompletionScorer,
    collate_vision_pairs,
    encode_vision_pair,
    vision_pair_logps,
)
from alignpipe.vision.models import image_token_id, open_images

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def vision_row(i: int, name: str) -> dict:
    """A pairs row: 'what colour is this square?' about a square of colour ``name``, of 3 lengths."""
    return {
        "pair_id": f"v{i}",
        "prompt": [{"role": "user", "content": "what colour is this square?" + " please" * i}],
        "chosen": [{"role": "assistant", "content": name}],
        "rejected": [
            {"role": "assistant", "content": name + " the quick brown fox" + " x" * i}
        ],  # shares a token
        "images": [{"bytes": square_png(COLOURS[name]), "path": None}],
    }


@pytest.fixture(scope="module")
def vlm():
    processor = tiny_vlm_processor()
    return processor, tiny_vlm(processor)


@pytest.fixture(scope="module")
def pairs(vlm):
    processor, _ = vlm
    return [encode_vision_pair(processor, vision_row(i, n), max_length=128) for i, n in enumerate(COLOURS)]


def reference_logps(model, processor, pair, row) -> tuple[float, float]:
    """Summed completion log-probs from LlavaForConditionalGeneration's own forward, one sequence at a time."""
    pixels = processor.image_processor(open_images(row["images"]), return_tensors="pt")["pixel_values"]
    out = []
    for seq in (pair.chosen, pair.rejected):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq.input_ids]), pixel_values=pixels).logits[0].double()
        logps = logits.log_softmax(-1)
        p = len(seq.prompt_ids)
        out.append(sum(float(logps[p - 1 + t, tok]) for t, tok in enumerate(seq.completion_ids)))
    return out[0], out[1]


def test_each_prompt_has_its_image_tokens(vlm, pairs):
    processor, model = vlm
    image_token = image_token_id(model)
    for pair in pairs:
        assert pair.chosen.prompt_ids.count(image_token) == 4  # (16 / 8)^2 patches of one image
        assert pair.pixel_inputs["pixel_values"].shape == (1, 3, 16, 16)
        assert pair.chosen.completion_ids[-1] == processor.tokenizer.eos_token_id


@pytest.mark.parametrize("layout", ["padded", "packed", "binned", "shared"])
def test_layouts_equal_the_models_own_forward(vlm, pairs, layout):
    processor, model = vlm
    scorer = VisionCompletionScorer(model).eval()
    assert scorer.shares_prompt  # the tiny Llama is on sdpa: its language model takes shared-prompt batches
    padding_free, row_tokens = layout != "padded", {"binned": 0}.get(layout)
    if layout == "binned":
        assert pack_row_tokens(scorer) == 0
    batch = collate_vision_pairs(pairs, padding_free, processor.tokenizer.pad_token_id, image_token_id(model),
                                 row_tokens=row_tokens, share_prompt=layout == "shared")  # fmt: skip
    with torch.no_grad():
        out = vision_pair_logps(scorer, batch)
    rows = [vision_row(i, n) for i, n in enumerate(COLOURS)]
    expected = torch.tensor([reference_logps(model, processor, p, r) for p, r in zip(pairs, rows, strict=True)],
                            dtype=torch.float64)  # fmt: skip
    # float32 sums of ~-130: rtol 1e-6 is float32's rounding; a wrong image feature moves them by ~1e-2
    torch.testing.assert_close(out.chosen_logps.double(), expected[:, 0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.rejected_logps.double(), expected[:, 1], atol=1e-5, rtol=1e-6)
    shown = 1 if layout == "shared" else 2  # the prompt (and its 4 image tokens) once or twice per pair
    assert batch.image_index.numel() == shown * 4 * len(pairs)


def test_one_vision_pass_per_pair_and_equal_gradients(vlm, pairs):
    """The vision tower sees each pair's image once (3 images for 6 sequences), and the shared-prompt
    layout's gradients equal the padded layout's (the rejected side reads the chosen side's features)."""
    processor, model = vlm
    scorer = VisionCompletionScorer(model)
    seen = []
    hook = model.get_encoder(modality="image").register_forward_hook(
        lambda m, i, o: seen.append(i[0].shape[0])
    )
    grads = {}
    try:
        for layout in ("padded", "shared"):
            model.zero_grad()
            batch = collate_vision_pairs(pairs, layout == "shared", processor.tokenizer.pad_token_id,
                                         image_token_id(model), share_prompt=layout == "shared")  # fmt: skip
            out = vision_pair_logps(scorer, batch)
            (out.chosen_logps - out.rejected_logps).sum().backward()
            grads[layout] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        hook.remove()
    assert seen == [3, 3]
    vision_grads = [n for n in grads["padded"] if "vision_tower" in n]
    assert vision_grads  # the features are not detached: the tower gets gradients when it trains
    assert grads["padded"].keys() == grads["shared"].keys()
    for name, grad in grads["padded"].items():
        torch.testing.assert_close(grads["shared"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_dpo_loss_parity_with_trl_on_a_vlm_batch(vlm, pairs):
    """TRL 1.16's own code on the same VLM batch: its DataCollatorForVisionPreference tokenizes the rows
    and its DPOTrainer.compute_ref_log_probs / _compute_loss (on a stub trainer, the real tiny VLMs with
    TRL's fused LM head) give the log-probs and the sigmoid loss our shared-prompt path gives."""
    from types import SimpleNamespace

    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    from trl.trainer.utils import add_fused_lm_head

    from alignpipe.core.objective import combined_loss

    processor, _ = vlm
    policy, ref = tiny_vlm(processor, seed=0), tiny_vlm(processor, seed=1)
    ours = {}
    for name, model in (("policy", policy), ("ref", ref)):
        scorer = VisionCompletionScorer(model).eval()
        batch = collate_vision_pairs(pairs, True, processor.tokenizer.pad_token_id, image_token_id(model),
                                     share_prompt=True)  # fmt: skip
        with torch.no_grad():
            ours[name] = vision_pair_logps(scorer, batch)
    rows = [vision_row(i, n) for i, n in enumerate(COLOURS)]
    examples = [{"images": open_images(r["images"]), "prompt": r["prompt"], "chosen": r["chosen"],
                 "rejected": r["rejected"]} for r in rows]  # fmt: skip
    inputs = dpo_trainer.DataCollatorForVisionPreference(processor)(examples)
    assert inputs["completion_mask"].sum(1).tolist() == [len(p.chosen.completion_ids) for p in pairs] + [
        len(p.rejected.completion_ids) for p in pairs
    ]  # TRL scores the tokens we score
    add_fused_lm_head(
        policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1")
    )  # as DPOTrainer does
    add_fused_lm_head(ref)
    stub = SimpleNamespace(
        model=policy, ref_model=ref, accelerator=SimpleNamespace(
            device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t, autocast=contextlib.nullcontext,
            unwrap_model=lambda m: m),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None), beta=0.1, label_smoothing=0.0,
        loss_types=["sigmoid"], loss_weights=[1.0], ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", use_weighting=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    trl_ref = dpo_trainer.DPOTrainer.compute_ref_log_probs(stub, ref, inputs)
    torch.testing.assert_close(trl_ref[0], ours["ref"].chosen_logps, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(
        trl_ref[1], ours["ref"].rejected_logps, atol=1e-5, rtol=1e-6
    )  # float32 sums near -90
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = trl_ref
    with torch.no_grad():
        trl_loss = dpo_trainer.DPOTrainer._compute_loss(stub, policy, inputs, False)
    p, r = ours["policy"], ours["ref"]
    loss = combined_loss(["sigmoid"], [1.0], p.chosen_logps, p.rejected_logps, r.chosen_logps, r.rejected_logps,
                         beta=0.1, chosen_lengths=p.chosen_tokens, rejected_lengths=p.rejected_tokens)  # fmt: skip
    torch.testing.assert_close(loss.mean(), trl_loss, atol=1e-6, rtol=0)
    assert abs(float(trl_loss) - 0.6931) > 1e-3  # policy and reference differ: not the trivial ln 2


def test_vision_pair_scores_read_from_parquet_are_batch_invariant(vlm, tmp_path):
    """ref_logps' VLM path: pairs read back from parquet (PAIRS + images) score the same in batches of 1
    and of 3, in the file's order, and equal the model's own forward."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alignpipe.artifacts import schema
    from alignpipe.testing import pair_row
    from alignpipe.vision.logprobs import read_vision_pairs, vision_pair_scores

    processor, model = vlm
    rows = [{**pair_row(i), **vision_row(i, n)} for i, n in enumerate(COLOURS)]
    pq.write_table(
        pa.Table.from_pylist(rows, schema=schema.with_images(schema.PAIRS)), tmp_path / "train.parquet"
    )
    pairs = read_vision_pairs(tmp_path / "train.parquet", processor, max_length=128)
    scorer = VisionCompletionScorer(model).eval()
    pad = processor.tokenizer.pad_token_id
    one, three = (vision_pair_scores(scorer, pairs, b, pad) for b in (1, 3))
    assert one.pair_ids == three.pair_ids == ["v0", "v1", "v2"]
    torch.testing.assert_close(one.chosen, three.chosen, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(one.rejected, three.rejected, atol=1e-5, rtol=1e-6)
    expected = torch.tensor([reference_logps(model, processor, p, r) for p, r in zip(pairs, rows, strict=True)],
                            dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(three.chosen, expected[:, 0], atol=1e-5, rtol=1e-6)
    assert three.chosen_tokens.tolist() == [len(p.chosen.completion_ids) for p in pairs]
