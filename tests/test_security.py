"""Security: no remote code unless asked, safetensors only, loopback UI, configured reward module only,
no secrets in artifacts or logs.

Each "never runs" test uses a marker file that the hostile code would create, and checks it is
absent; the spy test checks what the loaders pass to transformers.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from faults import stage_argv
from workspace import ROOT, env, make_workspace

from alignpipe.artifacts.generations import FINGERPRINT_KEY, MANIFEST
from alignpipe.artifacts.io import read_parquet
from alignpipe.artifacts.schema import GENERATIONS
from alignpipe.base_model import build_base_model, check_loadable
from alignpipe.core.models import ModelFolderError, check_model_folder, load_causal_lm, load_tokenizer
from alignpipe.params import BaseModelParams, RewardParams
from alignpipe.rewards.base import RewardError
from alignpipe.rewards.hf import load_reward_model
from alignpipe.rewards.load import get_reward
from alignpipe.rewards.python import load_function

EVIL = """\
open({marker!r}, "w").write("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


class Unpickled:
    """Creates ``marker`` when unpickled (what a hostile pytorch_model.bin does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def with_custom_code(folder: Path, marker: Path, model_type: str | None = None) -> Path:
    """Point the folder's config and tokenizer at ``evil.py`` through ``auto_map``."""
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        name: "evil.EvilModel" for name in ("AutoModelForCausalLM", "AutoModelForSequenceClassification")
    }
    config["auto_map"]["AutoConfig"] = "evil.EvilConfig"
    if model_type:
        config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return folder


def test_custom_code_of_a_known_architecture_is_not_run(tmp_path, tiny_model_dir):
    """A Llama folder whose auto_map points at custom code loads as plain Llama, without running it."""
    marker = tmp_path / "ran"
    folder = with_custom_code(Path(shutil.copytree(tiny_model_dir, tmp_path / "m")), marker)
    assert type(load_tokenizer(folder)).__module__.startswith("transformers")
    assert type(load_causal_lm(folder, device=torch.device("cpu"))).__name__ == "LlamaForCausalLM"
    check_loadable(folder, trust_remote_code=False)
    out = build_base_model(BaseModelParams(source=str(folder)), tmp_path / "base")
    assert not (out / "evil.py").exists()  # the code is not even copied into models/base
    assert not marker.exists()


def test_custom_code_only_architecture_is_refused_without_trust_remote_code(tmp_path, tiny_model_dir):
    marker = tmp_path / "ran"
    folder = with_custom_code(
        Path(shutil.copytree(tiny_model_dir, tmp_path / "m")), marker, model_type="evil"
    )
    with pytest.raises(ModelFolderError, match="custom code"):
        load_causal_lm(folder, device=torch.device("cpu"))
    with pytest.raises(RewardError, match="custom code"):
        load_reward_model(str(folder), torch.float32)
    assert not marker.exists()


class Called(Exception):
    """Raised by the spies: the call was recorded, stop here."""


@pytest.fixture()
def spied(monkeypatch) -> list[tuple[str, Any]]:
    """Record ``trust_remote_code`` of every transformers Auto*.from_pretrained call."""
    import transformers

    calls: list[tuple[str, Any]] = []
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):

        def spy(*args: Any, _name: str = name, **kwargs: Any) -> Any:
            calls.append((_name, kwargs.get("trust_remote_code", "<not passed>")))
            raise Called(_name)

        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", spy)
    return calls


def test_loaders_pass_trust_remote_code_false_by_default_and_true_only_when_asked(spied, tiny_model_dir):
    for load in (
        lambda: load_tokenizer(tiny_model_dir),
        lambda: load_causal_lm(tiny_model_dir),
        lambda: check_loadable(tiny_model_dir, trust_remote_code=False),
        lambda: load_reward_model(str(tiny_model_dir), torch.float32),
        lambda: get_reward(RewardParams(kind="hf", model=str(tiny_model_dir))),
    ):
        with pytest.raises(Called):
            load()
    assert spied and all(value is False for _, value in spied), spied
    spied.clear()
    with pytest.raises(Called):
        get_reward(RewardParams(kind="hf", model=str(tiny_model_dir), trust_remote_code=True))
    assert spied == [("AutoConfig", True)]  # the hf reward reads the config first (a VLM's or a text model's)


def test_trust_remote_code_defaults_to_false_in_params():
    assert BaseModelParams().trust_remote_code is False and RewardParams().trust_remote_code is False


def test_a_folder_with_only_pickled_weights_is_refused_and_never_unpickled(tmp_path, tiny_model_dir):
    marker = tmp_path / "unpickled"
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Unpickled(marker)}))
    for load in (
        lambda: check_model_folder(folder),
        lambda: load_causal_lm(folder, device=torch.device("cpu")),
        lambda: build_base_model(BaseModelParams(source=str(folder)), tmp_path / "base"),
        lambda: load_reward_model(str(folder), torch.float32),
    ):
        with pytest.raises(ModelFolderError, match=r"no \*\.safetensors weights"):
            load()
    assert not marker.exists() and not (tmp_path / "base").exists()


def test_pickled_weights_next_to_safetensors_are_ignored(tmp_path, tiny_model_dir):
    marker = tmp_path / "unpickled"
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Unpickled(marker)}))
    load_causal_lm(folder, device=torch.device("cpu"))
    out = build_base_model(BaseModelParams(source=str(folder)), tmp_path / "base")
    assert not marker.exists() and not (out / "pytorch_model.bin").exists()


DOCS = ["README.md", "CONTRIBUTING.md", "Makefile", "prefect.yaml", "flows", "configs"]


def _doc_files() -> list[Path]:
    files = []
    for name in DOCS:
        path = ROOT / name
        files += (
            sorted(p for p in path.rglob("*") if p.is_file() and p.suffix != ".pyc")
            if path.is_dir()
            else [path]
        )
    return [f for f in files if f.exists()]


def test_the_prefect_server_is_only_ever_started_on_loopback():
    starts = []
    for path in _doc_files():
        text = path.read_text(errors="replace")
        assert "0.0.0.0" not in text, f"{path.relative_to(ROOT)} binds all interfaces"
        starts += [(path.name, line) for line in text.splitlines() if "prefect server start" in line]
    assert starts, "the README shows how to start the Prefect server"
    assert all(re.search(r"--host 127\.0\.0\.1\b", line) for _, line in starts), starts


def test_a_reward_function_is_imported_by_module_name_only(tmp_path, monkeypatch):
    """The configured module runs; a file shadowing a stdlib module next to it does not."""
    marker = tmp_path / "shadow-ran"
    (tmp_path / "json.py").write_text(f"open({str(marker)!r}, 'w')\n")  # shadows the stdlib json
    (tmp_path / "my_reward_mod.py").write_text(
        "import json\ndef score(p, c):\n    return [json.loads('1.5')] * len(c)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    fn = load_function("my_reward_mod:score")
    assert fn([[]], ["x"]) == [1.5]
    assert set(sys.modules) - before == {"my_reward_mod"}
    assert sys.path[-1] == str(tmp_path) and not marker.exists()  # cwd goes last, never ahead of the stdlib
    monkeypatch.delitem(sys.modules, "my_reward_mod")


def test_a_file_path_as_reward_function_is_not_executed(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/evil.py").write_text(f"open({str(marker)!r}, 'w')\ndef fn(p, c):\n    return []\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(RewardError, match="cannot import module"):
        load_function("sub/evil.py:fn")
    assert not marker.exists()


SECRET = "hf_securitySecretToken9876543210"


@pytest.mark.slow
def test_no_secret_in_the_outputs_or_logs_of_the_light_stages(tmp_path):
    """prepare, score and pairs with tokens in the environment (the heavy stages: test_reliability)."""
    ws = make_workspace(
        tmp_path / "ws",
        {"data": {"builtin": {"n_sft": 4, "n_prompts": 4, "n_eval": 2}}, "pairs": {"drop_ties": False}},
    )
    secrets = {**env(), "HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": SECRET, "WANDB_API_KEY": SECRET}
    proc = subprocess.run(stage_argv(ws, "prepare"), cwd=ws, env=secrets, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    logs = proc.stdout + proc.stderr
    generations = ws / "data/generations"  # hand-made: 4 samples of each prompt
    ids = [r["prompt_id"] for r in read_parquet(ws / "data/prepared/prompts.parquet")]
    rows = [{"prompt_id": pid, "sample_idx": i, "completion": "hello there " * i, "n_tokens": i + 1,
             "finish_reason": "stop", "logprob": None, "backend": "hf", "seed": i} for pid in ids for i in range(4)]  # fmt: skip
    generations.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATIONS.with_metadata({FINGERPRINT_KEY: b"f"})),
                   generations / "chunk-00000.parquet")  # fmt: skip
    (generations / MANIFEST).write_text(json.dumps({"fingerprint": "f", "prompts": len(ids), "n": 4,
                                                    "files": ["chunk-00000.parquet"]}))  # fmt: skip
    for stage in ("score", "pairs"):
        proc = subprocess.run(stage_argv(ws, stage), cwd=ws, env=secrets, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        logs += proc.stdout + proc.stderr
    leaks = [
        str(p.relative_to(ws)) for p in ws.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()
    ]
    assert leaks == [] and SECRET not in logs
    assert (ws / "data/pairs/train.parquet").exists()
