"""End-to-end on the tiny VLM: `dvc repro` of the whole DAG in a throwaway copy of the repository, on an
image dataset written here (coloured 16x16 squares, "what colour is this square?", an exact python reward
that sees the images), then KTO on the same data."""

from __future__ import annotations

import json

import pytest
import yaml
from workspace import dvc, make_workspace, ran_stages, set_params

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet
from alignpipe.testing_vlm import save_tiny_vlm, square_png

pytestmark = pytest.mark.slow

QUESTION = "What colour is this square?"
# three shades per colour: two for training (distinct images, so prepare keeps every row), the third
# held out for evaluation (an eval prompt must differ from every train prompt, its image included)
SHADES = {"red": [(255, 0, 0), (200, 30, 30), (150, 0, 20)], "green": [(0, 255, 0), (30, 200, 30), (20, 150, 0)],
          "blue": [(0, 0, 255), (30, 30, 200), (0, 20, 150)]}  # fmt: skip

REWARD_MODULE = '''
NAMES = ("red", "green", "blue")


def score(prompts, completions, images):
    """1.0 when the answer names the square's colour (its strongest channel), else 0.0."""
    truth = [NAMES[max(range(3), key=row[0].getpixel((0, 0)).__getitem__)] for row in images]
    return [float(c.strip().lower() == t) for c, t in zip(completions, truth, strict=True)]
'''

TINY_VLM_PIPELINE = {
    "data": {"sft": {"source": "vlmdata/sft.jsonl"}, "prompts": {"source": "vlmdata/prompts.jsonl"},
             "eval_prompts": {"source": "vlmdata/eval_prompts.jsonl"}},
    "sft": {"batch_size": 3, "save_steps": 20, "max_steps": 40, "learning_rate": 1e-2},  # 20 epochs: it answers colours
    "generate": {"n": 4, "max_new_tokens": 4, "chunk_prompts": 3, "backend": "hf", "temperature": 1.0},
    "reward": {"kind": "python", "function": "colour_reward:score"},
    # KTO examples labelled by the exact reward (every sample one), not by rank within a prompt
    "pairs": {"allow_truncated": True, "eval_fraction": 0.34, "unpaired": {"label": "threshold", "threshold": 1.0}},
    "ref_logps": {"batch_size": 4},
    "dpo": {"loss_type": "sigmoid", "batch_size": 2, "eval_steps": 2, "save_steps": 2, "max_steps": 3,
            "max_length": 64, "max_prompt_length": 32, "gradient_checkpointing": False},
    "evaluate": {"max_new_tokens": 4, "n": 2, "n_examples": 2, "backend": "hf", "forgetting_rows": 3},
}  # fmt: skip


def _write_data(ws) -> dict[str, bytes]:
    """vlmdata/: the squares as PNG files and three TRL jsonl files whose images are paths relative to them."""
    data, files = ws / "vlmdata", {}
    (data / "img").mkdir(parents=True)
    for name, shades in SHADES.items():
        for k, rgb in enumerate(shades):
            files[f"img/{name}{k}.png"] = square_png(rgb)
            (data / f"img/{name}{k}.png").write_bytes(files[f"img/{name}{k}.png"])
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    sft = [{"images": [f"img/{c}{k}.png"], "prompt": prompt, "completion": c} for c in SHADES for k in (0, 1)]
    prompts = [{"images": [f"img/{c}{k}.png"], "prompt": prompt} for c in SHADES for k in (0, 1)]
    evals = [{"images": [f"img/{c}2.png"], "prompt": prompt} for c in SHADES]
    for name, rows in (("sft", sft), ("prompts", prompts), ("eval_prompts", evals)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def _reward_in_deps(ws) -> None:
    """The reward module is a dep of the stages that run it (README: reward.kind python)."""
    path = ws / "dvc.yaml"
    dag = yaml.safe_load(path.read_text())
    for stage in ("score", "evaluate"):
        dag["stages"][stage]["deps"].append("colour_reward.py")
    path.write_text(yaml.safe_dump(dag, sort_keys=False))


def test_the_whole_dag_on_a_tiny_vlm_then_kto(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    vlm = save_tiny_vlm(tmp_path / "tiny_vlm")
    ws = make_workspace(tmp_path / "ws", {"base_model": {"source": str(vlm)}, **TINY_VLM_PIPELINE})
    files = _write_data(ws)
    (ws / "colour_reward.py").write_text(REWARD_MODULE)
    _reward_in_deps(ws)
    first = dvc(ws, "repro")
    assert {
        "base_model",
        "prepare",
        "sft",
        "generate",
        "score",
        "pairs",
        "ref_logps",
        "dpo",
        "evaluate",
    } <= set(ran_stages(first.stdout)), first.stdout[-3000:]
    prompts = read_parquet(ws / "data/prepared/prompts.parquet", schema.with_images(schema.PROMPTS))
    assert len(prompts) == 6 and all(len(r["images"]) == 1 for r in prompts)
    train_files = [v for k, v in files.items() if not k.endswith("2.png")]
    assert sorted(r["images"][0]["bytes"] for r in prompts) == sorted(train_files)  # the images survive
    sft_rows = read_parquet(ws / "data/prepared/sft.parquet", schema.with_images(schema.SFT))
    assert len(sft_rows) == 6 and all(r["images"] for r in sft_rows)
    for folder in ("models/base", "models/sft", "models/dpo"):
        AutoProcessor.from_pretrained(ws / folder)
        AutoModelForImageTextToText.from_pretrained(ws / folder)
    scored = read_parquet(ws / "data/scored.parquet", schema.SCORED)
    assert len(scored) == 24 and {r["reward"] for r in scored} <= {0.0, 1.0}
    pairs = read_parquet(ws / "data/pairs/train.parquet", schema.with_images(schema.PAIRS))
    assert all(len(r["images"]) == 1 for r in pairs)
    metrics = json.loads((ws / "reports/eval.json").read_text())
    for model in ("sft", "dpo"):
        # the colour reward is 0/1, so its mean is the pass rate (pass_rate itself: the built-in verifier's)
        assert metrics[model]["samples"] == 6 and 0.0 <= metrics[model]["reward_mean"] <= 1.0
        assert metrics[model]["demo_nll"] > 0
    assert metrics["reward"] == "python:colour_reward:score" and 0.0 <= metrics["win_rate"] <= 1.0
    assert metrics["kl"] is not None and metrics["kl_samples"] == 6
    assert (ws / "reports/eval.md").exists()
    assert ran_stages(dvc(ws, "repro").stdout) == []  # a second repro is a no-op
    assert dvc(ws, "status").stdout.strip().endswith("up to date.")

    # KTO on the same data: the unpaired examples (with their images) get their reference, dpo trains on them
    set_params(ws, {"dpo": {"loss_type": "kto"}, "ref_logps": {"unpaired": True}})
    kto = dvc(ws, "repro")
    assert sorted(ran_stages(kto.stdout)) == ["dpo", "evaluate", "ref_logps"]
    unpaired = read_parquet(ws / "data/unpaired/train.parquet", schema.with_images(schema.UNPAIRED))
    ref_unpaired = read_parquet(ws / "data/ref_logps_unpaired.parquet", schema.REF_LOGPS_UNPAIRED)
    assert unpaired and all(len(r["images"]) == 1 for r in unpaired)
    assert {r["label"] for r in unpaired} == {True, False}  # right and wrong colours were sampled
    assert {r["example_id"] for r in unpaired} <= {r["example_id"] for r in ref_unpaired}
    logged = json.loads((ws / "reports/dpo/metrics.json").read_text())
    assert "kl" in logged and "rewards" in logged
    AutoModelForImageTextToText.from_pretrained(ws / "models/dpo")
