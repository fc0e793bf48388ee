"""The sft stage on the tiny VLM: run_sft dispatches on the base model's vision config, trains the
language model only through the stage's Trainer, writes a folder transformers loads unchanged, and a
run interrupted after a checkpoint resumes to the same weights as an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sft_helpers import StopAt, quick, sft_paths, weights

from alignpipe.artifacts import schema
from alignpipe.params import PeftParams
from alignpipe.sft.stage import SftPaths, run_sft
from alignpipe.testing_vlm import save_tiny_vlm, square_png
from alignpipe.training.checkpoints import complete_checkpoints

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0)}
ROWS = [
    {"id": f"sft-{name}-{k}", "prompt": [{"role": "user", "content": "what colour is this square?" + " ?" * k}],
     "completion": [{"role": "assistant", "content": name}], "meta": None,
     "images": [{"bytes": square_png(rgb), "path": None}]}
    for k in range(2) for name, rgb in COLOURS.items()
]  # fmt: skip


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "base")


def paths_for(tmp_path: Path, model_dir: Path) -> SftPaths:
    """The stage's paths over ROWS with their images (8 rows: 2 steps an epoch of quick()'s batch 4)."""
    return sft_paths(tmp_path, model_dir, ROWS, schema.with_images(schema.SFT))


def test_vlm_sft_trains_the_language_model_and_writes_a_loadable_folder(tmp_path, vlm_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    paths = paths_for(tmp_path, vlm_dir)
    summary = run_sft(quick(), paths)
    assert summary["steps"] == 6 and summary["rows"] == 8
    assert json.loads((paths.metrics_dir / "metrics.json").read_text())["vision"] is True
    assert (paths.metrics_dir / "plots/metrics/train/loss.tsv").exists()
    AutoProcessor.from_pretrained(paths.out)
    AutoModelForImageTextToText.from_pretrained(paths.out)
    before, after = weights(vlm_dir), weights(paths.out)
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    # LLaVA's checkpoint names: language_model.*, vision_tower.*, multi_modal_projector.* (tied LM head)
    assert moved and all(k.startswith("language_model.") for k in moved)
    assert any(k.startswith("vision_tower.") for k in before) and any(
        k.startswith("multi_modal") for k in before
    )


def test_vlm_lora_merges_into_the_language_model_only(tmp_path, vlm_dir):
    peft = PeftParams(enabled=True, r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    paths = paths_for(tmp_path, vlm_dir)
    run_sft(quick(max_steps=2, peft=peft), paths)
    before, after = weights(vlm_dir), weights(paths.out)
    assert before.keys() == after.keys()  # merged: no lora_ keys
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(
        k.startswith("language_model.") and k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved
    )


def test_interrupted_vlm_sft_resumes_to_the_same_weights(tmp_path, vlm_dir):
    params = quick()
    straight = paths_for(tmp_path / "a", vlm_dir)
    run_sft(params, straight)
    resumed = paths_for(tmp_path / "b", vlm_dir)
    with pytest.raises(KeyboardInterrupt):
        run_sft(params, resumed, callbacks=[StopAt(5)])
    assert not resumed.out.exists()
    assert [p.name for p in complete_checkpoints(resumed.checkpoints)] == ["checkpoint-4"]
    summary = run_sft(params, resumed)
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 6
    a, b = weights(straight.out), weights(resumed.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_base_model_copies_a_local_vlm_folder_that_loads_unchanged(tmp_path, vlm_dir):
    """base_model with a local VLM folder: the copy keeps the processor files, and loads through
    AutoProcessor and the image-text-to-text class."""
    from alignpipe.base_model import build_base_model
    from alignpipe.params import BaseModelParams
    from alignpipe.vision.models import is_vision_model_folder, load_image_text_model, load_processor

    out = build_base_model(BaseModelParams(source=str(vlm_dir)), tmp_path / "base")
    assert is_vision_model_folder(out)
    assert load_processor(out).image_token == "<image>"
    load_image_text_model(out, dtype="float32", device=torch.device("cpu"))
