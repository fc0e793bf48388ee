"""The evaluate stage on the tiny VLM (alignpipe.testing_vlm): answers sampled per image prompt, scored by a
python reward that sees the images, KL and forgetting NLL through the vision log-prob path, the reports."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import write_parquet
from alignpipe.artifacts.schema import with_images
from alignpipe.testing_vlm import save_tiny_vlm, square_png

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
QUESTION = [{"role": "user", "content": "what colour is this square?"}]


def image_reward(prompts, completions, images):
    """1 on the red square, 0 on the others, plus len(answer) / 100: the images and the answers both count."""
    red = [tuple(row[0].getpixel((0, 0))) == COLOURS["red"] for row in images]
    return [float(r) + len(c) / 100 for r, c in zip(red, completions, strict=True)]


def _image(c: str) -> list[dict]:
    return [{"bytes": square_png(COLOURS[c]), "path": None}]


def _pair(c: str, w: str) -> dict:
    return {"pair_id": f"{c}-{w}", "prompt_id": f"p{c}", "prompt": QUESTION,
            "chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": w}],
            "chosen_reward": 1.0, "rejected_reward": 0.0, "margin": 1.0, "source": "generated",
            "images": _image(c)}  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two tiny VLMs (seeds 0: "sft", 1: "dpo"), eval prompts, pairs and their reference, demonstrations."""
    from alignpipe.params import RefLogpsParams
    from alignpipe.ref_logps import run_ref_logps
    from alignpipe.training.numerics import Numerics

    root = tmp_path_factory.mktemp("vlm_eval")
    save_tiny_vlm(root / "sft", seed=0)
    save_tiny_vlm(root / "dpo", seed=1)
    prompts = [dict(prompt_id=f"p{c}", prompt=QUESTION, meta=None, images=_image(c)) for c in COLOURS]
    write_parquet(prompts, root / "eval_prompts.parquet", with_images(schema.PROMPTS))
    write_parquet([_pair("red", "blue")], root / "pairs/train.parquet", with_images(schema.PAIRS))
    write_parquet([_pair("green", "red"), _pair("blue", "green")], root / "pairs/eval.parquet",
                  with_images(schema.PAIRS))  # fmt: skip
    write_parquet([], root / "pairs/test.parquet", with_images(schema.PAIRS))
    run_ref_logps(root / "sft", root / "pairs", root / "ref.parquet", RefLogpsParams(dtype="float32", batch_size=2),
                  64, 32, policy=Numerics("float32"))  # fmt: skip
    demos = [dict(id=f"d{c}", prompt=QUESTION, completion=[{"role": "assistant", "content": f"it is {c}"}],
                  meta=None, images=_image(c)) for c in ("red", "blue")]  # fmt: skip
    write_parquet(demos, root / "sft.parquet", with_images(schema.SFT))
    return root


def _evaluate(root, dpo_dir, out):
    from alignpipe.evaluate.stage import run_evaluate
    from alignpipe.params import DpoParams, EvaluateParams, RewardParams

    params = EvaluateParams(n=2, max_new_tokens=4, temperature=1.0, backend="hf", dtype="float32", batch_size=2,
                            forgetting_rows=2)  # fmt: skip
    reward = RewardParams(kind="python", function="test_vlm_evaluate:image_reward")
    models = {"sft": root / "sft", "dpo": dpo_dir, "base": root / "sft"}
    metrics = run_evaluate(models, root / "eval_prompts.parquet", root / "pairs/eval.parquet", root / "ref.parquet",
                           out, params, reward, DpoParams(max_length=64, max_prompt_length=32, beta=0.5), sft_data=root / "sft.parquet",
                           preferences=root / "pairs/test.parquet")  # fmt: skip
    return metrics, params


def _own_logp(model, processor, prompt, completion, images, finish: str) -> tuple[float, int]:
    """Summed completion log-prob from the VLM's own full forward (the length rule: no EOS after a cut)."""
    from alignpipe.vision.models import encode_vision_completion

    enc = encode_vision_completion(processor, prompt, completion, images)
    completion_ids = enc.encoded.completion_ids[:-1] if finish == "length" else enc.encoded.completion_ids
    ids = torch.tensor([enc.encoded.prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=enc.pixel_inputs["pixel_values"]).logits[0].float()
    logps = logits[:-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logps[len(enc.encoded.prompt_ids) - 1 :].sum()), len(completion_ids)


def test_evaluate_on_a_vlm_samples_scores_and_measures_kl_with_the_images(workspace, tmp_path):
    """DPO (seed 1) against SFT (seed 0): each model's reward mean is the image reward of its own answers
    (sampled directly with the prompt's image and seed), the KL and the forgetting NLL equal the models'
    own full forwards with the images, the eval pairs are scored, and the reports are written."""
    from alignpipe.generation.base import derive_seed
    from alignpipe.vision.generate import sample_with_images
    from alignpipe.vision.models import load_image_text_model, load_processor, open_images

    metrics, params = _evaluate(workspace, workspace / "dpo", tmp_path / "reports")
    assert json.loads((tmp_path / "reports/eval.json").read_text()) == metrics
    assert (tmp_path / "reports/eval.md").read_text().count("|") > 10
    processor = load_processor(workspace / "sft")
    models = {
        m: load_image_text_model(workspace / m, "float32", torch.device("cpu")).eval() for m in ("sft", "dpo")
    }
    diffs: dict[str, list[float]] = {}
    for m in ("sft", "dpo"):
        rewards = []
        for c in COLOURS:
            stored = _image(c)
            samples = sample_with_images(models[m], processor, QUESTION, stored, 2, 4, 1.0, derive_seed(params.seed, f"p{c}"))  # fmt: skip
            rewards += image_reward(None, [s.completion for s in samples], [open_images(stored)] * 2)
            if m == "dpo":
                for s in samples:
                    answer = [{"role": "assistant", "content": s.completion}]
                    lp = {
                        k: _own_logp(models[k], processor, QUESTION, answer, stored, s.finish_reason)[0]
                        for k in models
                    }
                    diffs.setdefault(c, []).append(lp["dpo"] - lp["sft"])
        assert metrics[m]["samples"] == 6
        assert metrics[m]["reward_mean"] == pytest.approx(statistics.fmean(rewards), abs=1e-4)
    kl = statistics.fmean(statistics.fmean(v) for v in diffs.values())
    assert metrics["kl"] == pytest.approx(kl, abs=2e-4) and abs(kl) > 1e-3 and metrics["kl_samples"] == 6
    assert metrics["pairs"] == 2 and metrics["pairs_accuracy"] in (0.0, 0.5, 1.0)
    nll = {}
    for m in models:
        sums = [_own_logp(models[m], processor, QUESTION, [{"role": "assistant", "content": f"it is {c}"}], _image(c), "stop")
                for c in ("red", "blue")]  # fmt: skip
        nll[m] = -sum(s for s, _ in sums) / sum(n for _, n in sums)
        assert metrics[m]["demo_nll"] == pytest.approx(nll[m], abs=2e-4)
    assert metrics["dpo"]["demo_nll_delta"] == pytest.approx(nll["dpo"] - nll["sft"], abs=3e-4)
    assert "preferences" not in metrics  # the held-out split has no rows


def test_evaluate_on_a_vlm_against_itself_is_a_tie_with_zero_kl(workspace, tmp_path):
    """DPO == SFT: the same answers (same seeds), so every comparison ties (win rate 1/2), KL 0, and
    against the cached reference no eval pair has a margin (accuracy 0, ties are misses)."""
    metrics, _ = _evaluate(workspace, workspace / "sft", tmp_path / "reports")
    assert metrics["win_rate"] == 0.5 and metrics["ties"] == 6
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["pairs_accuracy"] == 0.0 and metrics["pairs_margin_mean"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["dpo"]["demo_nll_delta"] == pytest.approx(0.0, abs=1e-6)


def test_preference_split_on_a_vlm_scores_the_pairs_with_their_images(workspace, tmp_path):
    """The held-out split through the VLM's pair scoring: SFT as the policy is its own reference (margins
    fp32 noise, ties, nothing up or down); DPO (seed 1)'s logp accuracy is its own full forwards' with
    the images, and the SFT row is the cached reference's."""
    from alignpipe.evaluate.vision import VisionEvaluation
    from alignpipe.params import DpoParams, EvaluateParams, RefLogpsParams
    from alignpipe.ref_logps import run_ref_logps
    from alignpipe.training.numerics import Numerics
    from alignpipe.vision.models import load_image_text_model, load_processor

    split = [_pair("red", "green"), _pair("blue", "red"), _pair("green", "blue")]
    for name, rows in (("train", [_pair("red", "blue")]), ("eval", [_pair("green", "red")]), ("test", split)):
        write_parquet(rows, tmp_path / f"pairs/{name}.parquet", with_images(schema.PAIRS))
    run_ref_logps(workspace / "sft", tmp_path / "pairs", tmp_path / "ref.parquet",
                  RefLogpsParams(dtype="float32", batch_size=2), 64, 32, policy=Numerics("float32"))  # fmt: skip
    params, dpo = (
        EvaluateParams(dtype="float32", batch_size=2),
        DpoParams(max_length=64, max_prompt_length=32, beta=0.5),
    )
    evaluation = VisionEvaluation(workspace / "eval_prompts.parquet")
    args = (tmp_path / "pairs/test.parquet", tmp_path / "ref.parquet", params, dpo)
    same = evaluation.preference_split(workspace / "sft", *args)
    assert same is not None and same["pairs"] == 3 and same["beta"] == 0.5
    assert same["dpo"]["preference_accuracy"] == 0.0 and same["dpo"]["chosen_up_rejected_down"] == 0.0
    assert abs(same["dpo"]["reward_margin"]) < 1e-5
    assert same["dpo"]["logp_accuracy"] == same["sft"]["logp_accuracy"] == same["sft"]["preference_accuracy"]
    got = evaluation.preference_split(workspace / "dpo", *args)
    processor = load_processor(workspace / "sft")
    own = {}
    for m in ("sft", "dpo"):
        model = load_image_text_model(workspace / m, "float32", torch.device("cpu")).eval()
        own[m] = [[_own_logp(model, processor, QUESTION, p[side], p["images"], "stop")[0] for side in ("chosen", "rejected")]
                  for p in split]  # fmt: skip
    for m in own:
        assert got[m]["logp_accuracy"] == pytest.approx(statistics.fmean(c > r for c, r in own[m]))
    margins = [0.5 * ((c - sc) - (r - sr)) for (c, r), (sc, sr) in zip(own["dpo"], own["sft"], strict=True)]
    assert got["dpo"]["reward_margin"] == pytest.approx(statistics.fmean(margins), abs=1e-4)
