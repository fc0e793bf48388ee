"""Run the real stage scripts as subprocesses, alone or under ``accelerate launch`` (2 CPU processes, gloo).

On a machine without a GPU ``accelerate launch --multi_gpu --num_processes N`` starts N workers through
torchrun, and the stages join them over gloo (``alignpipe.core.models.cpu_only``). ``accelerate launch
--cpu --num_processes N`` would start one process only: accelerate 1.15 runs several CPU processes
through ``mpirun`` alone.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import write_parquet
from alignpipe.testing import pair_row

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages"
ACCELERATE = Path(sys.executable).parent / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(num_processes: int, config: str | None = None) -> list[str]:
    """The command a stage runs under: this interpreter, or ``accelerate launch`` with N processes."""
    if num_processes == 1 and config is None:
        return [sys.executable]
    cmd = [str(ACCELERATE), "launch", "--num_processes", str(num_processes), "--num_machines", "1"]
    cmd += ["--main_process_port", str(free_port())]  # other test runs on this machine may hold 29500
    if config is None:
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        cmd += ["--config_file", str(ROOT / "configs" / "accelerate" / f"{config}.yaml")]
    return cmd


def env(num_processes: int) -> dict[str, str]:
    out = dict(os.environ)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out["PYTHONPATH"] = str(ROOT / "src")
    out["HF_HUB_OFFLINE"] = "1"
    out["OMP_NUM_THREADS"] = str(max(1, 2 // num_processes))
    out.pop("ACCELERATE_USE_CPU", None)
    return out


def argv(stage: str, paths: dict[str, Path], num_processes: int = 1, config: str | None = None) -> list[str]:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in paths.items()]
    return [*launcher(num_processes, config), str(STAGES / f"{stage}.py"), *args]


def run_stage(
    cwd: Path, stage: str, section: dict[str, Any], paths: dict[str, Path], num_processes: int = 1, **kw: Any
) -> subprocess.CompletedProcess:
    """Write ``cwd/params.yaml`` with ``{stage: section}`` and run the stage script there."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "params.yaml").write_text(yaml.safe_dump(section))
    done = subprocess.run(
        argv(stage, paths, num_processes, kw.get("config")),
        cwd=cwd,
        env=env(num_processes),
        capture_output=True,
        text=True,
        timeout=kw.get("timeout", 300),
    )
    assert done.returncode == 0, f"{stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def kill_when(cmd: list[str], cwd: Path, nproc: int, log: Path, trigger: Callable[[], bool]) -> float:
    """Run ``cmd``; SIGKILL the launcher process alone (not its group) once ``trigger`` holds.

    Returns the seconds from the kill until no process of the launcher's session was left.
    """
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env(nproc), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while not trigger():
            assert proc.poll() is None, f"ended before the kill:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.005)
        workers = children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        while any(alive(pid) for pid in workers):
            assert time.monotonic() - killed < 30, f"workers {workers} outlived the launcher"
            time.sleep(0.05)
    return time.monotonic() - killed


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the workers torchrun started), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def tsv(path: Path) -> list[float]:
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    name = path.stem
    return [float(r[name]) for r in rows]


def metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.json").read_text())


# --- data ---------------------------------------------------------------------------------------


def sft_row(i: int) -> dict:
    return {
        "id": f"sft-{i}",
        "prompt": [{"role": "user", "content": "Describe the ocean" + " in words" * (i % 4)}],
        "completion": [{"role": "assistant", "content": "The ocean is vast." + " Waves." * i}],
        "meta": None,
    }


def save_model(out: Path, **overrides: Any) -> Path:
    """A tiny model folder; ``overrides`` change its config (bitsandbytes' CPU NF4 kernels need
    ``hidden_size`` >= 64, its block size)."""
    from alignpipe.testing import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, **overrides)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_data(root: Path, n_train: int = 16, n_eval: int = 4, n_sft: int = 16) -> None:
    write_parquet([pair_row(i, "t") for i in range(n_train)], root / "pairs" / "train.parquet", schema.PAIRS)
    write_parquet([pair_row(i, "e") for i in range(n_eval)], root / "pairs" / "eval.parquet", schema.PAIRS)
    write_parquet([sft_row(i) for i in range(n_sft)], root / "sft.parquet", schema.SFT)
