"""Smoke test of bench/dpo_throughput.py on a tiny shape: its JSON lines, and loss parity with TRL."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "dpo_throughput.py"
RUN_KEYS = {"impl", "pairs_per_s", "tokens_per_s", "peak_memory_mb", "loss_step1", "loss_final", "steps",
            "seconds", "losses", "machine", "date"}  # fmt: skip


def load_bench():
    spec = importlib.util.spec_from_file_location("dpo_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench()


def test_parity_run_prints_one_line_per_run_a_summary_per_row_and_a_ratio(bench, tmp_path):
    """Same pairs, order, optimizer and schedule: TRL (defaults and tuned) and alignpipe agree step by
    step, while the loss moves well away from its step-1 value ln 2 (lr 1e-2: 0.055 here, so the check
    is not vacuous)."""
    out = tmp_path / "bench.jsonl"
    argv = ["--model", "tiny", "--pairs", "8", "--batch-size", "2", "--max-length", "128", "--device", "cpu",
            "--parity", "--in-process", "--learning-rate", "1e-2", "--json-out", str(out)]  # fmt: skip
    records = bench.main(argv)
    ours, trl, tuned = records[:3]
    assert [r["impl"] for r in records] == ["ours", "trl", "trl_tuned"] + ["summary"] * 3 + ["ratio"]
    assert [r["row"] for r in records[3:6]] == ["ours", "trl", "trl_tuned"]
    for run in (ours, trl, tuned):
        assert set(run) >= RUN_KEYS and run["steps"] == 4 and len(run["losses"]) == 4
    assert ours["shared_prompt"] and trl["same_tokens"] and tuned["same_tokens"]
    assert tuned["precompute_ref_log_probs"] and not trl["precompute_ref_log_probs"]
    assert tuned["sampling"] == trl["sampling"] == "sequential"  # parity: file order on every row
    assert tuned["gradient_checkpointing"] == ours["gradient_checkpointing"]  # same setting as ours
    assert tuned["init_seconds"] < tuned["seconds"]  # its time runs from construction on
    assert ours["loss_step1"] == pytest.approx(math.log(2), abs=1e-6)
    ratio = records[-1]
    assert {
        "ratio_pairs_per_s",
        "ratio_pairs_per_s_vs_trl_tuned",
        "ratio_peak_memory",
        "max_loss_diff",
    } <= set(ratio)
    assert ratio["max_loss_move"] > 1e-2
    assert ratio["max_loss_diff"] < 1e-4 and ratio["max_loss_diff_vs_trl_tuned"] < 1e-4
    assert records[3]["ratio_pairs_per_s_vs_trl_tuned"] == pytest.approx(
        ours["pairs_per_s"] / tuned["pairs_per_s"], rel=1e-9
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["impl"] for line in lines] == [r["impl"] for r in records]


def test_trl_tuned_groups_by_length_over_a_length_column(bench, tmp_path):
    """Outside --parity, TRL tuned samples group_by_length: the length column reaches the sampler
    (TRL's own inference fails on DPO rows), and it trains."""
    results = tmp_path / "2026-01-01-x.json"
    argv = ["--model", "tiny", "--pairs", "4", "--batch-size", "2", "--max-length", "96", "--device", "cpu",
            "--in-process", "--rows", "trl_tuned_gc_off", "--results", str(results)]  # fmt: skip
    run = bench.main(argv)[0]
    data = json.loads(results.read_text())
    assert (
        len(data["commit"]) == 40
        and data["cpu"]
        and [r["impl"] for r in data["runs"]] == ["trl_tuned_gc_off"]
    )
    assert run["sampling"] == "group_by_length" and run["precompute_ref_log_probs"]
    assert run["datasets_cache"] == "runs/trl_tuned_gc_off-0/hf-datasets-cache"  # fresh per run, relative
    assert run["gradient_checkpointing"] is False and len(run["losses"]) == 2


def test_a_killed_run_leaves_a_results_file_with_what_it_measured(bench, tmp_path, monkeypatch):
    """The results file is rewritten after every run: when the second row dies, the first row's run
    and summary are on disk, marked incomplete; a finished run marks it complete."""
    results = tmp_path / "2026-01-01-x.json"
    argv = ["--model", "tiny", "--pairs", "4", "--batch-size", "2", "--max-length", "96", "--device", "cpu",
            "--in-process", "--rows", "ours,trl_tuned", "--results", str(results)]  # fmt: skip
    real_spawn, calls = bench.spawn, []

    def spawn_then_die(name, *args):
        calls.append(name)
        if name == "trl_tuned":
            raise SystemExit("trl_tuned worker failed (exit -9)")
        return real_spawn(name, *args)

    monkeypatch.setattr(bench, "spawn", spawn_then_die)
    with pytest.raises(SystemExit):
        bench.main(argv)
    data = json.loads(results.read_text())
    assert calls == ["ours", "trl_tuned"] and data["complete"] is False
    assert [r["impl"] for r in data["runs"]] == ["ours"] and [s["row"] for s in data["summaries"]] == ["ours"]
    assert data["ratio"] is None  # no anchor measured yet
    monkeypatch.setattr(bench, "spawn", real_spawn)
    bench.main(argv)
    data = json.loads(results.read_text())
    assert data["complete"] is True and [r["impl"] for r in data["runs"]] == ["ours", "trl_tuned"]
    assert data["ratio"]["ratio_pairs_per_s_vs_trl_tuned"] > 0


def test_ablation_rows_switch_the_engines_options(bench, tmp_path):
    """Each _no_<feature> row reaches the engine: no shared prompt, padded rows, a live reference;
    the losses stay close to those of ours (the ablations change the work, not the maths)."""
    argv = ["--model", "tiny", "--pairs", "4", "--batch-size", "2", "--max-length", "96", "--device", "cpu",
            "--in-process", "--parity", "--learning-rate", "1e-2", "--rows", "ours", "--ablate", ",".join(bench.FEATURES)]  # fmt: skip
    runs = {r["impl"]: r for r in bench.main(argv) if r["impl"].startswith("ours")}
    assert runs["ours"]["shared_prompt"] and not runs["ours_no_shared_prompt"]["shared_prompt"]
    assert (
        not runs["ours_no_padding_free"]["padding_free"] and not runs["ours_no_padding_free"]["shared_prompt"]
    )
    assert (
        runs["ours_no_reference_cache"]["ref_seconds"] == 0
        and runs["ours_no_reference_cache"]["ref_pairs"] == 4
    )
    for name, run in runs.items():  # step 1 is exact; later steps carry rounding that Adam (lr 1e-2,
        # updates of size lr for near-zero gradients) amplifies: the LM-head ablation moved step 2 by 6e-3
        assert run["losses"][0] == pytest.approx(math.log(2), abs=1e-6), name
        assert run["losses"] == pytest.approx(runs["ours"]["losses"], abs=2e-2), name


def test_row_names_parse_and_typos_fail(bench):
    row = bench.parse_row("trl_tuned_gc_off_bf16")
    assert (row.impl, row.gradient_checkpointing, row.dtype, row.ablated) == (
        "trl_tuned",
        False,
        "bfloat16",
        set(),
    )
    assert bench.parse_row("ours_no_shared_prompt_no_fused_adamw").ablated == {"shared_prompt", "fused_adamw"}
    assert bench.parse_row("trl").gradient_checkpointing is None
    for bad in ("our", "trl_gc", "ours_no_magic", "trl_no_shared_prompt", "ours_bf16x"):
        with pytest.raises(SystemExit):
            bench.parse_row(bad)


def test_summary_has_median_and_spread_and_flops_count_reference_apart(bench):
    runs = [{"pairs_per_s": v, "tokens_per_s": 10 * v, "peak_memory_mb": 100.0, "seconds": 1 / v,
             "cpu_seconds": 2.0, "loss_step1": 0.69, "loss_final": 0.6, "dtype": "float32",
             "gradient_checkpointing": True, "model_flops_per_s": 2e9 * v, "hardware_flops_per_s": 3e9 * v}
            for v in (1.0, 4.0, 2.0)]  # fmt: skip
    line = bench.summary_line("ours", runs, {"float32": 10.0})
    assert (line["pairs_per_s"], line["pairs_per_s_min"], line["pairs_per_s_max"]) == (2.0, 1.0, 4.0)
    assert line["model_fraction_of_peak"] == pytest.approx(0.4)  # median(2, 8, 4) GFLOP/s / 10
    record = {"params": 10, "steps": 2, "batch_size": 3, "ref_pairs": 4, "gradient_checkpointing": True,
              "seconds": 2.0}  # fmt: skip
    f = bench.flops(record, tokens_per_pair=5.0)  # 30 trained tokens, 20 reference tokens
    assert f["model_flops"] == 6 * 10 * 30 + 2 * 10 * 20 and f["recompute_flops"] == 2 * 10 * 30
    assert f["hardware_flops_per_s"] == pytest.approx((1800 + 400 + 600) / 2)


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


def test_ratio_line_uses_medians_against_each_anchor_and_max_step_gap(bench):
    def run(impl, pps, mem, losses):
        return {"impl": impl, "pairs_per_s": pps, "peak_memory_mb": mem, "losses": losses}

    runs = [
        run("ours", 3.0, 100.0, [0.7, 0.5]), run("trl", 2.0, 200.0, [0.7, 0.4]),
        run("trl_tuned", 1.0, 50.0, [0.7, 0.45]), run("ours_gc_off", 6.0, 300.0, [0.7, 0.5]),
        run("trl_tuned_gc_off", 2.0, 100.0, [0.7, 0.5]), run("ours", 5.0, 100.0, [0.7, 0.5]),
        run("trl", 2.0, 200.0, [0.7, 0.4]), run("trl_tuned", 3.0, 50.0, [0.7, 0.45]),
    ]  # fmt: skip
    line = bench.ratio_line(runs, parity=True)
    assert line["ratio_pairs_per_s"] == pytest.approx(2.0)  # median(3, 5) / median(2, 2)
    assert line["ratio_peak_memory"] == pytest.approx(0.5)
    assert line["ratio_pairs_per_s_vs_trl_tuned"] == pytest.approx(2.0)  # 4 / median(1, 3)
    assert line["ratio_peak_memory_vs_trl_tuned"] == pytest.approx(2.0)
    assert (
        line["ratio_pairs_per_s_gc_off"] == pytest.approx(3.0) and line["anchor_gc_off"] == "trl_tuned_gc_off"
    )
    assert line["max_loss_diff"] == pytest.approx(0.1) and line[
        "max_loss_diff_vs_trl_tuned"
    ] == pytest.approx(0.05)
    assert bench.ratio_line(runs[:1], parity=False) is None
    alone = bench.ratio_line(runs[3:5], parity=False)  # a modified pair of rows without plain ours
    assert alone["ratio_pairs_per_s_gc_off"] == pytest.approx(3.0) and "ratio_pairs_per_s" not in alone
    assert alone["repeats"] == 1


def test_dtype_benchmark_times_every_mode_and_both_matmul_peaks(tmp_path):
    spec = importlib.util.spec_from_file_location("dtype_cpu", SCRIPT.parent / "dtype_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "dtype.json"
    result = module.main(
        ["--model", "tiny", "--batch", "1", "--seq", "16", "--repeats", "2", "--json-out", str(out)]
    )
    assert set(result["modes"]) == {"fp32", "bf16_autocast", "bf16_pure"}
    assert all(
        len(m["runs"]) == 2 and m["min_s"] <= m["median_s"] <= m["max_s"] for m in result["modes"].values()
    )
    assert result["modes"]["fp32"]["speedup_vs_fp32"] == 1.0
    assert set(result["matmul_gflops_1024"]) == {"float32", "bfloat16"}
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))


def test_a_bf16_row_computes_its_reference_as_its_policy(bench):
    """ours_bf16: fp32 master weights under bf16 autocast, and the reference pass the same way (as the
    ref_logps stage does), so the step-1 loss is ln 2; a bf16-weights reference is not."""
    argv = ["--model", "tiny", "--pairs", "4", "--batch-size", "2", "--max-length", "96", "--device", "cpu",
            "--rows", "ours_bf16"]  # fmt: skip  # a subprocess: accelerate's precision is set once per process
    run = bench.main(argv)[0]
    assert run["dtype"] == "bfloat16"
    assert run["loss_step1"] == pytest.approx(math.log(2), abs=1e-6)


def test_projection_fusion_times_both_layouts_and_writes_its_results(tmp_path):
    import subprocess

    out = tmp_path / "fusion.json"
    cmd = [sys.executable, str(SCRIPT.parent / "projection_fusion.py"), "--rows", "8,16", "--repeats", "2",
           "--results", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    data = json.loads(out.read_text())
    assert {(r["rows"], r["projection"]) for r in data["results"]} == {
        (n, p) for n in (8, 16) for p in ("qkv", "gate_up")
    }
    for r in data["results"]:
        assert r["separate_ms"] > 0 and r["fused_ms"] > 0
        assert r["speedup_fused"] == pytest.approx(r["separate_ms"] / r["fused_ms"], rel=1e-2)
    assert data["peak_matmul_gflops"]["float32"] > 0 and data["commit"]
