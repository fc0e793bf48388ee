"""``dtype: auto`` on CPU (alignpipe.training.precision): bf16 only with AMX, or where the opt-in
start-up probe finds bf16 clearly faster; fp32 otherwise; decided once and logged once. The capability
inputs are mocked (cpuinfo flags, torch's AMX check, the probe's timing), never the decision.

Tolerances of bf16 against fp32 on a tiny llama (8 AdamW steps of the LM loss on one fixed batch,
fp32 master weights): bf16 autocast stays within 2e-3 of fp32 at every step, pure bf16 weights within
1e-2, while the loss moves by more than 0.2 (measured: 1e-4 and 3.5e-3)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from alignpipe.training import precision as P


@pytest.fixture
def fresh(monkeypatch):
    """No cached decision, no probe asked for; the test sets the capability inputs."""
    P.cpu_facts.cache_clear()
    P._cpu_auto.cache_clear()
    monkeypatch.delenv(P.PROBE_ENV, raising=False)
    yield monkeypatch
    P.cpu_facts.cache_clear()
    P._cpu_auto.cache_clear()


def cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: X\nflags\t\t: {flags}\nbugs\t\t: none\n\nflags\t: other\n")
    return path


def test_the_rule():
    assert P.cpu_auto_dtype(P.CpuFacts(amx_bf16=True))[0] == torch.bfloat16
    assert P.cpu_auto_dtype(P.CpuFacts(amx_bf16=False))[0] == torch.float32
    assert P.cpu_auto_dtype(P.CpuFacts(False, probe_speedup=2.0))[0] == torch.bfloat16
    assert P.cpu_auto_dtype(P.CpuFacts(False, probe_speedup=P.PROBE_MIN_SPEEDUP))[0] == torch.bfloat16
    assert P.cpu_auto_dtype(P.CpuFacts(False, probe_speedup=1.1))[0] == torch.float32  # inside the noise
    assert P.cpu_auto_dtype(P.CpuFacts(False, probe_speedup=0.2))[0] == torch.float32  # AVX2: emulated bf16
    assert P.cpu_auto_dtype(P.CpuFacts(True, probe_speedup=0.5))[0] == torch.bfloat16  # AMX is enough


def test_cpuinfo_flags_reads_the_first_flags_line(tmp_path):
    flags = P.cpuinfo_flags(cpuinfo(tmp_path, "fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile"))
    assert {"avx512_bf16", "amx_bf16", "amx_tile"} <= flags and "other" not in flags
    assert P.cpuinfo_flags(tmp_path / "missing") == set()


def test_avx512_bf16_without_amx_is_not_amx(tmp_path):
    """AMD EPYC (Zen 4/5) has avx512_bf16 but no AMX: not enough on its own."""
    assert not P.has_amx(P.cpuinfo_flags(cpuinfo(tmp_path, "avx2 avx512f avx512_bf16")), torch_amx=False)
    assert P.has_amx(set(), torch_amx=True)


@pytest.mark.parametrize(
    ("flags", "torch_amx", "probe", "speedup", "expected"),
    [
        ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile", False, None, None, torch.bfloat16),  # Sapphire Rapids
        ("avx2 avx512f", True, None, None, torch.bfloat16),  # torch sees AMX tiles
        ("avx2 avx512f avx512_bf16", False, None, None, torch.float32),  # EPYC: no AMX, no probe
        ("avx2 avx512f avx512_bf16", False, "1", 2.4, torch.bfloat16),  # EPYC, probe asked: bf16 faster
        ("avx2", False, "1", 0.22, torch.float32),  # AVX2 only, probe asked: bf16 4.5x slower
    ],
)
def test_auto_on_cpu_from_the_capability_inputs(fresh, tmp_path, flags, torch_amx, probe, speedup, expected):
    path, read = cpuinfo(tmp_path, flags), P.cpuinfo_flags
    fresh.setattr(P, "cpuinfo_flags", lambda: read(path))
    fresh.setattr(P, "_torch_amx", lambda: torch_amx)
    probed = []
    fresh.setattr(P, "probe_bf16_speedup", lambda: probed.append(1) or speedup)
    if probe:
        fresh.setenv(P.PROBE_ENV, probe)
    assert P.resolve_dtype("auto", "cpu") == expected
    assert len(probed) == (1 if probe and not P.has_amx(read(path), torch_amx) else 0)  # AMX: no probe
    assert (
        P.resolve_dtype("float32", "cpu") == torch.float32
        and P.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    )


def test_decided_and_logged_once(fresh, capsys):
    calls = []
    fresh.setattr(P, "cpuinfo_flags", lambda: calls.append(1) or set())
    fresh.setattr(P, "_torch_amx", lambda: False)
    assert P.resolve_dtype("auto", "cpu") == P.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert len(calls) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "dtype auto on CPU" in line]
    assert lines == ["alignpipe: dtype auto on CPU is float32: no AMX (set ALIGNPIPE_CPU_BF16_PROBE=1 to "
                     "let a start-up matmul probe decide)"]  # fmt: skip


def test_a_gpu_is_bf16_without_reading_the_cpu(fresh):
    fresh.setattr(P, "cpuinfo_flags", lambda: pytest.fail("read the CPU flags for a GPU"))
    assert P.resolve_dtype("auto", "cuda") == torch.bfloat16


def test_the_probe_measures_both_dtypes():
    speedup = P.probe_bf16_speedup(n=64, repeats=2)
    assert speedup > 0 and speedup == speedup  # a ratio of two real timings (finite, not NaN)


def test_the_stages_share_the_one_policy():
    from alignpipe.core import models

    assert models.resolve_dtype is P.resolve_dtype


def _train(mode: str) -> list[float]:
    from alignpipe.testing import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (4, 48))
    model = tiny_model(tokenizer, seed=0)
    if mode == "pure":
        model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        auto = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
        with auto:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_bf16_loss_parity_with_fp32_on_a_tiny_model():
    fp32, autocast, pure = _train("fp32"), _train("autocast"), _train("pure")
    assert fp32[0] - fp32[-1] > 0.2  # the loss moves: the comparison is not vacuous
    assert max(abs(a - b) for a, b in zip(fp32, autocast, strict=True)) < 2e-3
    assert max(abs(a - b) for a, b in zip(fp32, pure, strict=True)) < 1e-2
    assert autocast != fp32 or pure != fp32  # bf16 really ran (different rounding)
