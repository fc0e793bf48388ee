"""Helpers of tests/test_vlm_stages.py and tests/test_vlm_trainable.py: colour-square pairs with their
images, and the dpo stage's inputs built from them (data/pairs and its reference log-probs)."""

from __future__ import annotations

from pathlib import Path

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import write_parquet
from alignpipe.artifacts.schema import with_images
from alignpipe.testing_vlm import square_png

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
QUESTION = [{"role": "user", "content": "what colour is this square?"}]


def colour_pair(c: str, w: str) -> dict:
    """A pairs row: the square of colour ``c``, answered ``c`` (chosen) and ``w`` (rejected)."""
    return {"pair_id": f"{c}-{w}", "prompt_id": f"p{c}", "prompt": QUESTION,
            "chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": w}],
            "chosen_reward": 1.0, "rejected_reward": 0.0, "margin": 1.0, "source": "generated",
            "images": [{"bytes": square_png(COLOURS[c]), "path": None}]}  # fmt: skip


def write_dpo_inputs(vlm_dir: Path, root: Path) -> Path:
    """``root``/pairs (6 train colour pairs, 1 eval) with images and ``root``/ref.parquet, their
    reference log-probs (float32, the ref_logps stage's VLM path); returns ``root``."""
    from alignpipe.params import RefLogpsParams
    from alignpipe.ref_logps import run_ref_logps
    from alignpipe.training.numerics import Numerics

    train = [colour_pair(c, w) for c in COLOURS for w in COLOURS if w != c]
    write_parquet(train, root / "pairs/train.parquet", with_images(schema.PAIRS))
    write_parquet([colour_pair("red", "green") | {"pair_id": "e1"}], root / "pairs/eval.parquet",
                  with_images(schema.PAIRS))  # fmt: skip
    run_ref_logps(vlm_dir, root / "pairs", root / "ref.parquet", RefLogpsParams(dtype="float32", batch_size=4),
                  64, 32, policy=Numerics("float32"))  # fmt: skip
    return root
