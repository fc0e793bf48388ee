"""The DAG's stages on the tiny VLM (alignpipe.testing_vlm): generate (N samples per image prompt,
resumable by chunks), as the text path's tests do it on the tiny Llama."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from vlm_helpers import COLOURS, QUESTION, write_dpo_inputs

from alignpipe.artifacts import schema
from alignpipe.artifacts.generations import read_generations
from alignpipe.artifacts.io import read_parquet, write_parquet
from alignpipe.artifacts.schema import GENERATIONS, PROMPTS, with_images
from alignpipe.generate import run_generate
from alignpipe.generation.base import derive_seed
from alignpipe.params import GenerateParams
from alignpipe.testing_vlm import save_tiny_vlm, square_png


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "vlm")


@pytest.fixture(scope="module")
def image_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    rows = [dict(prompt_id=f"p{name}", prompt=QUESTION, meta=None, images=[{"bytes": square_png(rgb), "path": None}])
            for name, rgb in COLOURS.items()]  # fmt: skip
    write_parquet(rows, path, with_images(PROMPTS))
    return path


def _params(**kw) -> GenerateParams:
    return GenerateParams(**{**dict(backend="hf", n=2, max_new_tokens=4, temperature=1.0, chunk_prompts=2,
                                    dtype="float32"), **kw})  # fmt: skip


def test_generate_on_a_vlm_samples_n_per_image_prompt_and_resumes(vlm_dir, image_prompts, tmp_path):
    """Each image prompt gets n samples, each the sample of its own seed (prompt seed + j) drawn with
    the prompt's image; the artifact keeps the text schema (images stay in prompts, joined by
    prompt_id); a run killed after its first chunk resumes to the same rows."""
    from alignpipe.vision.generate import sample_with_images
    from alignpipe.vision.models import load_image_text_model, load_processor

    out = tmp_path / "full"
    metrics = run_generate(vlm_dir, image_prompts, out, _params(), progress=False)
    rows = read_generations(out)
    assert metrics["complete"] and metrics["chunks"] == 2 and metrics["samples"] == 6
    assert [(r["prompt_id"], r["sample_idx"]) for r in rows] == [
        (f"p{c}", j) for c in COLOURS for j in (0, 1)
    ]
    assert pq.read_schema(out / "chunk-00000.parquet").names == GENERATIONS.names  # no image bytes per sample
    processor = load_processor(vlm_dir)
    model = load_image_text_model(vlm_dir, "float32", torch.device("cpu")).eval()
    prompts = {r["prompt_id"]: r for r in read_parquet(image_prompts, with_images(PROMPTS))}
    for pid, prompt in prompts.items():
        seed = derive_seed(0, pid)
        direct = sample_with_images(model, processor, prompt["prompt"], prompt["images"], 2, 4, 1.0, seed)
        got = [r for r in rows if r["prompt_id"] == pid]
        assert [r["completion"] for r in got] == [s.completion for s in direct]
        assert [r["seed"] for r in got] == [seed, seed + 1]
        assert [r["logprob"] for r in got] == pytest.approx([s.logprob for s in direct], abs=1e-5)

    class Killed(RuntimeError):
        pass

    def kill_after_first(chunk):
        raise Killed

    resumed = tmp_path / "resumed"
    with pytest.raises(Killed):
        run_generate(vlm_dir, image_prompts, resumed, _params(), progress=False, after_chunk=kill_after_first)
    assert not (resumed / "manifest.json").exists()
    again = run_generate(vlm_dir, image_prompts, resumed, _params(), progress=False)
    assert again["chunks_generated"] == 1 and again["chunks_reused"] == 1
    assert read_generations(resumed) == rows


def test_generate_on_a_vlm_with_vllm_needs_vllm_importable(vlm_dir, image_prompts, tmp_path, monkeypatch):
    """The text path's rule: ``backend: vllm`` where vLLM does not import is one line (no hf fallback)."""
    from alignpipe.generation import base
    from alignpipe.generation.base import GenerationError

    monkeypatch.setattr(base, "vllm_importable", lambda: False)
    with pytest.raises(GenerationError, match="backend 'vllm' needs vLLM"):
        run_generate(vlm_dir, image_prompts, tmp_path / "g", _params(backend="vllm"), progress=False)


def test_vllm_requests_carry_token_ids_with_one_placeholder_per_image_and_the_pil_images(vlm_dir):
    """What goes into ``LLM.generate`` for a VLM (tests/test_vllm_vlm.py runs it on the real engine)."""
    from alignpipe.params import SamplingParams
    from alignpipe.vision.backend import build_vision_requests, vision_vllm_inputs
    from alignpipe.vision.models import load_processor

    processor = load_processor(vlm_dir)
    red, blue = ({"bytes": square_png(COLOURS[c]), "path": None} for c in ("red", "blue"))
    prompts, images = [QUESTION, QUESTION, QUESTION], [[red], [red, blue], []]
    requests = build_vision_requests(processor, prompts, images, ["a", "b", "c"], seed=3)
    settings = SamplingParams(backend="vllm", temperature=0.7, top_k=5, max_new_tokens=6, stop=["x"])
    inputs, params = vision_vllm_inputs(requests, settings, 4, dict)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert [p["prompt_token_ids"].count(image_token) for p in inputs] == [1, 2, 0]
    for p, req in zip(inputs, requests, strict=True):
        assert processor.tokenizer.decode(p["prompt_token_ids"]) == req.text  # the chat template's text
        assert req.text.endswith("<|im_start|>assistant\n") and req.text.count("<image>") == len(req.images)
    assert "multi_modal_data" not in inputs[2]
    pixels = [[im.getpixel((0, 0)) for im in p["multi_modal_data"]["image"]] for p in inputs[:2]]
    assert pixels == [[COLOURS["red"]], [COLOURS["red"], COLOURS["blue"]]]
    assert [p["seed"] for p in params] == [derive_seed(3, k) for k in "abc"]
    assert all(p["n"] == 4 and p["temperature"] == 0.7 and p["top_k"] == 5 and p["max_tokens"] == 6
               and p["stop"] == ["x"] and p["logprobs"] == 0 for p in params)  # fmt: skip


def _generations(out, answers: dict[str, list[str]]):
    """A finished generations folder with the given completions per prompt id (one chunk)."""
    from alignpipe.artifacts.generations import plan_chunks, write_chunk, write_manifest

    rows = [dict(prompt_id=pid, sample_idx=j, completion=text, n_tokens=1, finish_reason="stop", logprob=-1.0,
                 backend="hf", seed=j) for pid, texts in answers.items() for j, text in enumerate(texts)]  # fmt: skip
    out.mkdir(parents=True)
    chunks = plan_chunks(len(answers), len(answers))
    write_chunk(out / chunks[0].path_name, rows, "fp")
    n = len(next(iter(answers.values())))
    write_manifest(out, chunks, "fp", backend="hf", prompts=len(answers), n=n)
    return out


def test_score_passes_each_completion_its_prompts_images_to_a_python_reward(image_prompts, tmp_path):
    """reward.kind python on image prompts: the function gets images= (the colour reward is exact), so
    the same answer scores 1 on its own square and 0 on another's."""
    import json

    from alignpipe.params import RewardParams
    from alignpipe.score import score

    answers = {"pred": ["red", "blue"], "pgreen": [" Green", "red"], "pblue": ["blue", "a square"]}
    gens = _generations(tmp_path / "generations", answers)
    params = RewardParams(kind="python", function="alignpipe.testing_vlm:colour_reward")
    metrics = score(gens, image_prompts, tmp_path / "scored.parquet", tmp_path / "score.json", params)
    rows = read_parquet(tmp_path / "scored.parquet")
    assert [(r["prompt_id"], r["completion"], r["reward"]) for r in rows] == [
        ("pred", "red", 1.0), ("pred", "blue", 0.0), ("pgreen", " Green", 1.0), ("pgreen", "red", 0.0),
        ("pblue", "blue", 1.0), ("pblue", "a square", 0.0),
    ]  # fmt: skip
    assert metrics["reward_mean"] == 0.5 and json.loads((tmp_path / "score.json").read_text())["samples"] == 6


def test_pairs_keep_each_pairs_images_and_ref_logps_reads_them(image_prompts, vlm_dir, tmp_path):
    """pairs on image prompts: every train/eval pair carries its prompt's images (by prompt_id; a user
    pair its own, by pair_id), and the files encode through the VLM pair reader (one image per pair)."""
    import shutil

    from pairs_helpers import run_pairs, table, user_pair, write_inputs

    from alignpipe.params import PairsParams
    from alignpipe.vision.logprobs import read_vision_pairs
    from alignpipe.vision.models import load_processor

    scored = [r for c in COLOURS for r in table([1.0, 0.0], pid=f"p{c}")]
    user = {**user_pair("u1", "and this one?", "green", "red"), "images": [{"bytes": square_png(COLOURS["green"]), "path": None}]}  # fmt: skip
    write_inputs(tmp_path, scored)
    shutil.copy(image_prompts, tmp_path / "prepared/prompts.parquet")
    write_parquet([user], tmp_path / "prepared/preferences.parquet", with_images(schema.PREFERENCES))
    run_pairs(tmp_path, PairsParams(eval_fraction=0.34))
    rows = [r for split in ("train", "eval") for r in read_parquet(tmp_path / f"pairs/{split}.parquet", with_images(schema.PAIRS))]  # fmt: skip
    assert sorted(r["prompt_id"] for r in rows if r["source"] == "generated") == sorted(
        f"p{c}" for c in COLOURS
    )
    for r in rows:
        colour = "green" if r["source"] == "user" else r["prompt_id"][1:]
        assert [i["bytes"] for i in r["images"]] == [square_png(COLOURS[colour])], r["pair_id"]
    assert sum(r["source"] == "user" for r in rows) == 1
    encoded = read_vision_pairs(tmp_path / "pairs/train.parquet", load_processor(vlm_dir), 64)
    assert encoded and all(
        p.n_images == 1 and p.pixel_inputs["pixel_values"].shape == (1, 3, 16, 16) for p in encoded
    )


def _vlm_pairs(tmp_path, image_prompts):
    """The pairs stage's output on the three colour prompts (one pair each, 1 vs 0)."""
    import shutil

    from pairs_helpers import run_pairs, table, write_inputs

    from alignpipe.params import PairsParams

    write_inputs(tmp_path, [r for c in COLOURS for r in table([1.0, 0.0], pid=f"p{c}")])
    shutil.copy(image_prompts, tmp_path / "prepared/prompts.parquet")
    run_pairs(tmp_path, PairsParams(eval_fraction=0.34))
    return tmp_path / "pairs"


def _own_forward_logp(model, pair, side: str) -> float:
    """Summed log-prob of one side's completion tokens from the VLM's own forward (prompt + answer)."""
    enc = getattr(pair, side)
    ids = torch.tensor([enc.prompt_ids + enc.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pair.pixel_inputs["pixel_values"]).logits[0].float()
    logps = logits[:-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logps[len(enc.prompt_ids) - 1 :].sum())


def test_ref_logps_on_a_vlm_equal_the_models_own_forward(image_prompts, vlm_dir, tmp_path):
    """ref_logps dispatches on the VLM folder: every pair of train/eval/test is scored, each side equal
    to the model's own full forward with the pair's image (float32)."""
    from alignpipe.artifacts.ref_logps import PairScores
    from alignpipe.params import RefLogpsParams
    from alignpipe.ref_logps import run_ref_logps
    from alignpipe.training.numerics import Numerics
    from alignpipe.vision.models import load_image_text_model, load_processor
    from alignpipe.vision.ref_logps import read_vision_splits

    pairs_dir = _vlm_pairs(tmp_path, image_prompts)
    out = tmp_path / "ref_logps.parquet"
    summary = run_ref_logps(vlm_dir, pairs_dir, out, RefLogpsParams(dtype="float32", batch_size=2), 128, 64,
                            policy=Numerics("float32"))  # fmt: skip
    assert summary["pairs"] == 3 and summary["vision"]
    scores = PairScores.read(out)
    pairs = read_vision_splits(pairs_dir, load_processor(vlm_dir), 128, ("train", "eval", "test"))
    model = load_image_text_model(vlm_dir, "float32", torch.device("cpu")).eval()
    expected = {p.pair_id: (_own_forward_logp(model, p, "chosen"), _own_forward_logp(model, p, "rejected")) for p in pairs}  # fmt: skip
    got = dict(
        zip(scores.pair_ids, zip(scores.chosen.tolist(), scores.rejected.tolist(), strict=True), strict=True)
    )
    assert sorted(got) == sorted(expected)
    for pid, (c, r) in expected.items():
        assert got[pid] == pytest.approx((c, r), abs=1e-4)


@pytest.fixture(scope="module")
def vlm_dpo_inputs(vlm_dir, tmp_path_factory):
    """data/pairs (6 train colour pairs, 1 eval) with images and their ref_logps (the VLM path)."""
    return write_dpo_inputs(vlm_dir, tmp_path_factory.mktemp("vlm_dpo"))


def _vlm_dpo(vlm_dir, inputs, run, **kw):
    from alignpipe.dpo.stage import run_dpo
    from alignpipe.params import DpoParams

    settings = dict(loss_type="sigmoid", max_length=64, max_prompt_length=32, batch_size=2, learning_rate=1e-2, lr_scheduler="constant",
                    dtype="float32", logging_steps=1, eval_steps=100, save_steps=2, max_steps=5,
                    gradient_checkpointing=False)  # fmt: skip
    params = DpoParams(**{**settings, **kw})
    return run_dpo(vlm_dir, inputs / "pairs", inputs / "ref.parquet", run / "dpo", run / "checkpoints",
                   run / "reports", params)  # fmt: skip


def _losses(run) -> list[float]:
    import csv

    with (run / "reports/plots/metrics/loss.tsv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f, delimiter="\t")]


def test_dpo_on_a_vlm_trains_the_language_model_and_resumes_after_a_kill(vlm_dir, vlm_dpo_inputs, tmp_path, monkeypatch):  # fmt: skip
    """dpo dispatches on the VLM folder: step-1 loss ln 2 (policy == precomputed reference), the vision
    tower unchanged and the language model moved, the output loads with the Auto classes; killed at
    step 4 (checkpoint at 2) and rerun, it ends bit-identical to the uninterrupted run."""
    import math

    from faults import kill_at
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import alignpipe.dpo.stage as dpo_module

    whole = _vlm_dpo(vlm_dir, vlm_dpo_inputs, tmp_path / "whole")
    assert whole["steps"] == 5 and _losses(tmp_path / "whole")[0] == pytest.approx(math.log(2), abs=1e-5)
    before, after = load_file(str(vlm_dir / "model.safetensors")), load_file(str(tmp_path / "whole/dpo/model.safetensors"))  # fmt: skip
    assert before.keys() == after.keys()
    tower = [k for k in before if "vision_tower" in k]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model" in k)
    AutoProcessor.from_pretrained(tmp_path / "whole/dpo")
    AutoModelForImageTextToText.from_pretrained(tmp_path / "whole/dpo")
    with monkeypatch.context() as m:
        kill_at(m, dpo_module, 4)
        with pytest.raises(KeyboardInterrupt):
            _vlm_dpo(vlm_dir, vlm_dpo_inputs, tmp_path / "resumed")
    resumed = _vlm_dpo(vlm_dir, vlm_dpo_inputs, tmp_path / "resumed")
    assert resumed["resumed_from"] == 2
    again = load_file(str(tmp_path / "resumed/dpo/model.safetensors"))
    assert all(torch.equal(after[k], again[k]) for k in after)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "whole")


def test_dpo_on_a_vlm_refuses_what_it_does_not_run_yet(vlm_dir, vlm_dpo_inputs, tmp_path):
    with pytest.raises(ValueError, match="dpo.peft.load_in_4bit, dpo.compile not supported yet"):
        _vlm_dpo(
            vlm_dir,
            vlm_dpo_inputs,
            tmp_path / "r",
            peft={"enabled": True, "load_in_4bit": True},
            compile=True,
        )


def test_score_passes_the_images_to_an_hf_vlm_reward_model(image_prompts, tmp_path):
    """reward.kind hf with a VLM reward model (tiny Gemma3 classifier): the score stage's rewards equal
    the reward called directly with each answer's own prompt images, and differ from the same answers
    scored against another prompt's image (the stage really passes the images)."""
    from alignpipe.params import RewardParams
    from alignpipe.rewards.base import score_completions
    from alignpipe.rewards.load import get_reward
    from alignpipe.score import prompt_images, score
    from alignpipe.testing_vlm_reward import save_tiny_gemma3_reward

    folder = save_tiny_gemma3_reward(tmp_path / "rm")
    answers = {"pred": ["red", "blue"], "pgreen": [" Green", "red"], "pblue": ["blue", "a square"]}
    gens = _generations(tmp_path / "generations", answers)
    params = RewardParams(kind="hf", model=str(folder), batch_size=2)
    score(gens, image_prompts, tmp_path / "scored.parquet", tmp_path / "score.json", params)
    rows = read_parquet(tmp_path / "scored.parquet")
    prompts = {r["prompt_id"]: r["prompt"] for r in read_parquet(image_prompts, with_images(PROMPTS))}
    images = prompt_images(image_prompts)
    assert images is not None

    def direct(image_of):
        reward = get_reward(params)
        try:
            results = score_completions(reward, [prompts[r["prompt_id"]] for r in rows],
                                        [r["completion"] for r in rows], [None] * len(rows),
                                        images=[images[image_of(r)] for r in rows])  # fmt: skip
        finally:
            reward.close()
        return [res.reward for res in results]

    own = direct(lambda r: r["prompt_id"])
    assert [r["reward"] for r in rows] == pytest.approx(own, abs=1e-5)
    swapped = direct(lambda r: "pblue" if r["prompt_id"] != "pblue" else "pred")
    assert max(abs(a - b) for a, b in zip(own, swapped, strict=True)) > 1e-3
