"""KTO on the tiny VLM (alignpipe.testing_vlm): the pairs stage keeps each unpaired example's images,
ref_logps scores every example and its KL mismatch with the example's image, and the dpo stage trains
with ``dpo.loss_type: kto`` (step 1 at policy == reference, the vision tower frozen)."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet, write_parquet
from alignpipe.artifacts.schema import with_images
from alignpipe.testing_vlm import save_tiny_vlm, square_png

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
QUESTION = [{"role": "user", "content": "what colour is this square?"}]
LENGTHS = (64, 32)  # dpo.max_length, dpo.max_prompt_length


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The pairs stage on 3 image prompts x 2 scored samples (1 vs 0), its unpaired examples (with
    images) and their reference log-probs."""
    from pairs_helpers import run_pairs, table, write_inputs

    from alignpipe.params import PairsParams, RefLogpsParams
    from alignpipe.ref_logps import run_ref_logps
    from alignpipe.training.numerics import Numerics

    root = tmp_path_factory.mktemp("vlm_kto")
    vlm = save_tiny_vlm(root / "vlm")
    write_inputs(root, [r for c in COLOURS for r in table([1.0, 0.0], pid=f"p{c}")])
    prompts = [dict(prompt_id=f"p{c}", prompt=QUESTION, meta=None, images=[{"bytes": square_png(rgb), "path": None}])
               for c, rgb in COLOURS.items()]  # fmt: skip
    write_parquet(prompts, root / "prepared/prompts.parquet", with_images(schema.PROMPTS))
    run_pairs(root, PairsParams(eval_fraction=0.0), unpaired_dir=root / "unpaired")
    run_ref_logps(vlm, root / "pairs", root / "ref.parquet", RefLogpsParams(dtype="float32", batch_size=4),
                  *LENGTHS, policy=Numerics("float32"), unpaired=(root / "unpaired", root / "ref_unpaired.parquet"))  # fmt: skip
    return root, vlm


def _own_logp(model, processor, completion, images) -> float:
    from alignpipe.vision.models import encode_vision_completion

    enc = encode_vision_completion(processor, QUESTION, completion, images)
    ids = torch.tensor([enc.encoded.prompt_ids + enc.encoded.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=enc.pixel_inputs["pixel_values"]).logits[0].float()
    logps = logits[:-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logps[len(enc.encoded.prompt_ids) - 1 :].sum())


def test_unpaired_examples_keep_their_images_and_their_reference_uses_them(env):
    """Every example of data/unpaired carries its prompt's square; its reference log-prob and its KL
    mismatch's (another prompt's completion after this example's prompt and image) equal the VLM's own
    full forward."""
    from alignpipe.artifacts.unpaired import UnpairedScores
    from alignpipe.vision.models import load_image_text_model, load_processor

    root, vlm = env
    rows = read_parquet(root / "unpaired/train.parquet", with_images(schema.UNPAIRED))
    assert len(rows) == 6 and sorted(r["label"] for r in rows) == [False] * 3 + [True] * 3
    for r in rows:
        assert [i["bytes"] for i in r["images"]] == [square_png(COLOURS[r["prompt_id"][1:]])]
    scores = UnpairedScores.read(root / "ref_unpaired.parquet")
    assert sorted(scores.example_ids) == sorted(r["example_id"] for r in rows)
    by_id = {r["example_id"]: r for r in rows}
    processor = load_processor(vlm)
    model = load_image_text_model(vlm, "float32", torch.device("cpu")).eval()
    for eid, kl_id, logp, kl_logp in zip(scores.example_ids, scores.kl_ids, scores.logps.tolist(), scores.kl_logps.tolist(), strict=True):  # fmt: skip
        row, other = by_id[eid], by_id[kl_id]
        assert other["prompt_id"] != row["prompt_id"]
        assert logp == pytest.approx(_own_logp(model, processor, row["completion"], row["images"]), abs=1e-4)
        assert kl_logp == pytest.approx(
            _own_logp(model, processor, other["completion"], row["images"]), abs=1e-4
        )


def _history(run, metric: str) -> list[float]:
    with (run / "reports/plots/metrics" / f"{metric}.tsv").open() as f:
        return [float(row[metric.split("/")[-1]]) for row in csv.DictReader(f, delimiter="\t")]


def test_kto_on_a_vlm_step_one_at_policy_equal_reference_then_trains(env, tmp_path):
    """Step 1: every log-ratio and the KL point are 0, so each example's loss is w (1 - sigmoid(0)) = w/2
    and the loss is 0.5 (1.5 x 3 + 0.5 x 3) / 6 (desirable_weight 1.5, undesirable 0.5); logps/chosen is the
    mean reference log-prob of the desirable examples. Then it trains: the KL point moves off 0, the
    language model changes, the vision tower does not, and the output loads with the Auto classes."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from alignpipe.artifacts.unpaired import UnpairedScores
    from alignpipe.dpo.stage import run_dpo
    from alignpipe.params import DpoParams

    root, vlm = env
    params = DpoParams(loss_type="kto", max_length=LENGTHS[0], max_prompt_length=LENGTHS[1], batch_size=6,
                       learning_rate=1e-2, lr_scheduler="constant", dtype="float32", logging_steps=1,
                       eval_steps=100, save_steps=100, max_steps=4, gradient_checkpointing=False,
                       desirable_weight=1.5, undesirable_weight=0.5)  # fmt: skip
    run = tmp_path / "run"
    summary = run_dpo(vlm, root / "pairs", root / "ref.parquet", run / "dpo", run / "checkpoints", run / "reports",
                      params, unpaired=(root / "unpaired", root / "ref_unpaired.parquet"))  # fmt: skip
    assert summary["steps"] == 4 and summary["train_examples"] == 6
    assert _history(run, "loss")[0] == pytest.approx(0.5 * (1.5 * 3 + 0.5 * 3) / 6, abs=1e-6)
    assert _history(run, "kl")[0] == pytest.approx(0.0, abs=1e-6)
    assert _history(run, "rewards/chosen")[0] == pytest.approx(0.0, abs=1e-5)
    ref = UnpairedScores.read(root / "ref_unpaired.parquet")
    labels = {
        r["example_id"]: r["label"] for r in read_parquet(root / "unpaired/train.parquet", schema.UNPAIRED)
    }
    desirable = [v for eid, v in zip(ref.example_ids, ref.logps.tolist(), strict=True) if labels[eid]]
    assert _history(run, "logps/chosen")[0] == pytest.approx(sum(desirable) / len(desirable), abs=1e-4)
    assert _history(run, "kl")[-1] != 0.0  # the policy moved away from the reference
    before, after = load_file(str(vlm / "model.safetensors")), load_file(str(run / "dpo/model.safetensors"))
    tower = [k for k in before if "vision_tower" in k]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model" in k)
    AutoProcessor.from_pretrained(run / "dpo")
    AutoModelForImageTextToText.from_pretrained(run / "dpo")
    shutil.rmtree(run)


def test_a_user_unpaired_row_keeps_its_own_images():
    """A generated example takes its prompt's images (by prompt_id); a user row its own (by example_id,
    data/prepared/unpaired.parquet), even when its prompt matched a generated prompt's id."""
    from alignpipe.pairs.stage import with_example_images

    red, blue = [{"bytes": square_png(COLOURS["red"]), "path": None}], [{"bytes": square_png(COLOURS["blue"]), "path": None}]  # fmt: skip
    rows = [{"example_id": "g", "prompt_id": "pred", "source": "generated"},
            {"example_id": "u", "prompt_id": "pred", "source": "user"},
            {"example_id": "v", "prompt_id": "other", "source": "user"}]  # fmt: skip
    out = with_example_images(rows, {"pred": red}, {"u": blue})
    assert [r["images"] for r in out] == [red, blue, []]
