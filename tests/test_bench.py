"""Smoke test of bench/dpo_throughput.py on a tiny shape: its JSON lines, and loss parity with TRL."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("trl")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "dpo_throughput.py"
RUN_KEYS = {"impl", "pairs_per_s", "tokens_per_s", "peak_memory_mb", "loss_step1", "loss_final", "steps",
            "seconds", "losses", "machine", "date"}  # fmt: skip


def load_bench():
    spec = importlib.util.spec_from_file_location("dpo_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench()


def test_parity_run_prints_one_line_per_impl_and_a_ratio(bench, tmp_path):
    """Same pairs, order, optimizer and schedule: TRL and alignpipe agree step by step, while the
    loss moves well away from its step-1 value ln 2 (lr 1e-2: 0.055 here, so the check is not vacuous)."""
    out = tmp_path / "bench.jsonl"
    argv = ["--model", "tiny", "--pairs", "8", "--batch-size", "2", "--max-length", "128", "--device", "cpu",
            "--parity", "--in-process", "--learning-rate", "1e-2", "--json-out", str(out)]  # fmt: skip
    records = bench.main(argv)
    ours, trl, ratio = records
    assert [r["impl"] for r in records] == ["ours", "trl", "ratio"]
    assert set(ours) >= RUN_KEYS and set(trl) >= RUN_KEYS
    assert ours["steps"] == trl["steps"] == 4 and len(ours["losses"]) == len(trl["losses"]) == 4
    assert ours["shared_prompt"] and trl["same_tokens"]
    assert ours["loss_step1"] == pytest.approx(math.log(2), abs=1e-6)
    assert {"ratio_pairs_per_s", "ratio_peak_memory", "max_loss_diff"} <= set(ratio)
    assert ratio["max_loss_move"] > 1e-2
    assert ratio["max_loss_diff"] < 1e-4
    assert [json.loads(line)["impl"] for line in out.read_text().splitlines()] == ["ours", "trl", "ratio"]


def test_synthetic_pairs_fill_the_length_budget_without_truncation(bench):
    from alignpipe.artifacts.pairs import encode_pairs
    from alignpipe.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    rows = bench.synthetic_pairs(tokenizer, 6, 160, seed=0)
    assert rows == bench.synthetic_pairs(tokenizer, 6, 160, seed=0)
    for pair in encode_pairs(tokenizer, rows, 160, 159, where="bench"):
        assert pair.chosen.prompt_ids == pair.rejected.prompt_ids
        for side in (pair.chosen, pair.rejected):
            assert not side.truncated and len(side.input_ids) <= 160


def test_ratio_line_uses_medians_and_max_step_gap(bench):
    runs = [
        {"impl": "ours", "pairs_per_s": 3.0, "peak_memory_mb": 100.0, "losses": [0.7, 0.5]},
        {"impl": "trl", "pairs_per_s": 2.0, "peak_memory_mb": 200.0, "losses": [0.7, 0.4]},
        {"impl": "ours", "pairs_per_s": 5.0, "peak_memory_mb": 100.0, "losses": [0.7, 0.5]},
        {"impl": "trl", "pairs_per_s": 2.0, "peak_memory_mb": 200.0, "losses": [0.7, 0.4]},
    ]
    line = bench.ratio_line(runs, parity=True)
    assert line["ratio_pairs_per_s"] == pytest.approx(2.0)  # median(3, 5) / median(2, 2)
    assert line["ratio_peak_memory"] == pytest.approx(0.5)
    assert line["max_loss_diff"] == pytest.approx(0.1)
    assert bench.ratio_line(runs[:1], parity=False) is None
