"""sft and dpo under ``accelerate launch`` with 2 CPU processes (gloo), against 1 process at the same
global batch; a SIGKILL of the launcher mid-run, then a rerun, against an uninterrupted run.

Tolerance: 2 processes sum the gradients of their halves in gloo's all-reduce, 1 process in one
backward, so the fp32 results differ by rounding only: losses and grad norms within 1e-5 relative,
weights within 1e-5 absolute (measured: about 1e-7). The stages run as subprocesses (tests/launch.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from launch import ROOT, argv, kill_when, metrics, run_stage, tsv, write_data
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignpipe.testing import save_tiny_model

REL = 1e-5
DPO = dict(
    max_length=64, max_prompt_length=32, batch_size=8, learning_rate=1e-3, lr_scheduler="constant",
    dtype="float32", logging_steps=1, eval_steps=2, save_steps=100, max_steps=4, gradient_checkpointing=False,
)  # fmt: skip  # 16 train pairs / global batch 8 = 2 steps an epoch: 4 steps cross an epoch
SFT = dict(
    max_steps=3, batch_size=8, learning_rate=1e-2, logging_steps=1, save_steps=100, dtype="float32",
    max_length=64,
)  # fmt: skip  # 16 rows / 8 = 2 steps an epoch


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    """A tiny model, 16 sft rows, 16 train and 4 eval pairs, their reference log-probs (one process)."""
    root = tmp_path_factory.mktemp("mp")
    save_tiny_model(root / "model")
    write_data(root)
    paths = {"model": root / "model", "pairs": root / "pairs", "out": root / "ref_logps.parquet"}
    section = {"ref_logps": {"batch_size": 4, "dtype": "float32"}, "dpo": DPO}
    run_stage(root / "ref", "ref_logps", section, paths)
    return SimpleNamespace(root=root, model=root / "model", pairs=root / "pairs", ref=paths["out"], runs={})


def dpo_paths(ws: SimpleNamespace, run: Path) -> dict[str, Path]:
    return {"model": ws.model, "pairs": ws.pairs, "ref_logps": ws.ref, "out": run / "out",
            "checkpoints": run / "ckpt", "metrics_dir": run / "reports"}  # fmt: skip


def dpo_run(ws: SimpleNamespace, name: str, nproc: int, **overrides) -> Path:
    """Run dpo once per (name) in the module; per-process batch = global batch / nproc."""
    if name not in ws.runs:
        run = ws.root / name
        section = {"dpo": {**DPO, "batch_size": DPO["batch_size"] // nproc, **overrides}}
        run_stage(run, "dpo", section, dpo_paths(ws, run), nproc)
        ws.runs[name] = run
    return ws.runs[name]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_close_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, f"weights differ by {worst}"


def assert_rel(a: float, b: float, rel: float = REL) -> None:
    assert math.isclose(a, b, rel_tol=rel), (a, b)


def test_dpo_two_processes_equal_one_at_the_same_global_batch(ws):
    one, two = dpo_run(ws, "dpo-1", 1), dpo_run(ws, "dpo-2", 2)
    m1, m2 = metrics(one / "reports"), metrics(two / "reports")
    assert m2["train_pairs"] == 16 and m2["steps"] == 4
    for key in ("loss", "grad_norm"):
        for a, b in zip(tsv(one / f"reports/plots/metrics/{key}.tsv"), tsv(two / f"reports/plots/metrics/{key}.tsv"), strict=True):  # fmt: skip
            assert_rel(a, b)
    assert_rel(m1["eval"]["loss"], m2["eval"]["loss"])
    assert_rel(m1["logps"]["chosen"], m2["logps"]["chosen"])  # the same pairs in the last step
    assert m1["loss"] != pytest.approx(math.log(2), abs=1e-3)  # it trained
    assert_close_weights(one / "out", two / "out")
    model = AutoModelForCausalLM.from_pretrained(two / "out")  # a plain HF folder
    assert model.config.model_type == "llama"


def sft_paths(ws: SimpleNamespace, run: Path) -> dict[str, Path]:
    return {"model": ws.model, "data": ws.root / "sft.parquet", "out": run / "out",
            "checkpoints": run / "ckpt", "metrics_dir": run / "reports"}  # fmt: skip


def sft_run(ws: SimpleNamespace, nproc: int) -> Path:
    if f"sft-{nproc}" not in ws.runs:
        run = ws.root / f"sft-{nproc}"
        run_stage(
            run, "sft", {"sft": {**SFT, "batch_size": SFT["batch_size"] // nproc}}, sft_paths(ws, run), nproc
        )
        ws.runs[f"sft-{nproc}"] = run
    return ws.runs[f"sft-{nproc}"]


def test_sft_two_processes_equal_one_at_the_same_global_batch(ws):
    runs = {n: sft_run(ws, n) for n in (1, 2)}
    for key in ("loss", "grad_norm"):
        a, b = (tsv(runs[n] / f"reports/plots/metrics/train/{key}.tsv") for n in (1, 2))
        assert len(a) == len(b) == 3
        for x, y in zip(a, b, strict=True):
            assert_rel(x, y)
    m1, m2 = metrics(runs[1] / "reports"), metrics(runs[2] / "reports")
    assert m1["tokens"] == m2["tokens"]  # every process's tokens are counted
    assert_close_weights(runs[1] / "out", runs[2] / "out")
    AutoModelForCausalLM.from_pretrained(runs[2] / "out")


def test_sft_resumes_after_a_sigkill_of_the_launcher_to_the_uninterrupted_result(ws):
    straight, run = sft_run(ws, 2), ws.root / "sft-killed"
    section = {"sft": {**SFT, "batch_size": 4, "save_steps": 1}}
    run.mkdir()
    (run / "params.yaml").write_text(yaml.safe_dump(section))
    paths = sft_paths(ws, run)
    first = paths["checkpoints"] / "checkpoint-1" / "trainer_state.json"  # written last: complete
    kill_when(argv("sft", paths, 2), run, 2, run / "killed.log", first.exists)
    assert not paths["out"].exists(), "the killed run wrote its output"
    run_stage(run, "sft", section, paths, 2)
    assert metrics(paths["metrics_dir"])["resumed_from_step"] in (1, 2)
    assert_close_weights(straight / "out", paths["out"], atol=0.0)


KILLED = {**DPO, "batch_size": 4, "save_steps": 1}  # 2 processes, a checkpoint every step


def killed_and_resumed(ws: SimpleNamespace) -> SimpleNamespace:
    """2 processes; the launcher alone is SIGKILLed when the first checkpoint appears; then a rerun."""
    if "killed" not in ws.runs:
        run = ws.root / "dpo-killed"
        run.mkdir()
        (run / "params.yaml").write_text(yaml.safe_dump({"dpo": KILLED}))
        paths = dpo_paths(ws, run)
        kill_when(argv("dpo", paths, 2), run, 2, run / "killed.log", (paths["checkpoints"] / "step-1").exists)
        left = sorted(p.name for p in paths["checkpoints"].glob("step-*"))
        wrote_out = paths["out"].exists()
        done = run_stage(run, "dpo", {"dpo": KILLED}, paths, 2)
        ws.runs["killed"] = SimpleNamespace(
            run=run, paths=paths, left=left, wrote_out=wrote_out, log=done.stdout
        )
    return ws.runs["killed"]


def test_dpo_resumes_after_a_sigkill_of_the_launcher_to_the_uninterrupted_result(ws):
    """The launcher's workers die with it (``alignpipe.cli.exit_with_launcher``: torchrun starts them
    in sessions of their own), so nothing is written after the kill; the rerun resumes and ends at the
    weights and curves of the uninterrupted 2-process run."""
    straight, killed = dpo_run(ws, "dpo-2", 2), killed_and_resumed(ws)
    assert not killed.wrote_out, "the killed run wrote its output"
    assert killed.left and killed.left[-1] != "step-4", killed.left
    assert "dpo: resuming from" in killed.log
    assert metrics(killed.paths["metrics_dir"])["resumed_from"] >= 1
    assert_close_weights(straight / "out", killed.paths["out"], atol=0.0)
    for key in ("loss", "grad_norm"):
        a, b = (
            tsv(r / f"plots/metrics/{key}.tsv") for r in (straight / "reports", killed.paths["metrics_dir"])
        )
        assert a == pytest.approx(b, rel=1e-6)


def test_a_checkpoint_from_another_process_count_is_not_resumed(ws):
    """The dpo fingerprint includes the number of processes: the 2-process checkpoint that the resumed
    run leaves (step 3 of 4) is stale for 1 process with the same params."""
    killed = killed_and_resumed(ws)
    assert (killed.paths["checkpoints"] / "step-3").is_dir()
    killed.paths["out"].rename(killed.run / "out-2")
    done = run_stage(killed.run, "dpo", {"dpo": KILLED}, killed.paths, 1)
    assert "resuming" not in done.stdout and "stale checkpoint" in done.stdout
    assert metrics(killed.paths["metrics_dir"])["resumed_from"] == 0


def test_ref_logps_and_evaluate_run_as_one_process():
    """They do no training: dvc.yaml runs them with plain ``python`` (not under a launcher)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("ref_logps", "evaluate"):
        assert stages[name]["cmd"].startswith(f"python stages/{name}.py"), stages[name]["cmd"]
    for name in ("sft", "dpo"):
        assert stages[name]["cmd"].startswith(f"${{{name}.launcher}} stages/{name}.py")
