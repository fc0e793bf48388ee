"""Dependency pins that keep the tests honest (issue 16, item 5).

- TRL is pinned to the version whose private ``DPOTrainer._compute_loss`` the parity tests call;
  under CI=true a missing TRL fails the run (tests/ci_skips.py) instead of skipping 16 tests.
- transformers is bounded below the version that removes the ``past_key_values`` keyword the HF
  backend passes: the bound is read off the deprecation warning the backend really triggers.
"""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
TRL_PIN = "1.16.0"


def requirements(group: str | None = None) -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return {(r := Requirement(line)).name: r for line in listed}


def test_trl_is_pinned_to_the_version_the_parity_harness_follows():
    trl = requirements("dev")["trl"]
    assert str(trl.specifier) == f"=={TRL_PIN}"
    installed = pytest.importorskip("trl")  # CI=true: a skip here fails the run
    assert installed.__version__ == TRL_PIN
    from trl.trainer.dpo_trainer import DPOTrainer

    assert hasattr(DPOTrainer, "_compute_loss")


def test_transformers_bound_excludes_the_version_removing_what_the_hf_backend_uses(tokenizer, model):
    import transformers

    from alignpipe.generation.base import PromptRequest
    from alignpipe.generation.hf import HFBackend
    from alignpipe.params import SamplingParams

    spec = requirements()["transformers"].specifier
    assert spec.contains(transformers.__version__)
    backend = HFBackend(model, tokenizer, SamplingParams(max_new_tokens=3, temperature=0.0))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.generate([PromptRequest(text=text, token_ids=ids, seed=0)], n=1)
    removals = {
        Version(m.group(1))
        for w in caught
        if (
            m := re.search(
                r"`past_key_values` is deprecated and will be removed in version ([\d.]+)", str(w.message)
            )
        )
    }
    if Version(transformers.__version__) < Version("5.40"):
        assert removals, "the warning this bound is about changed: read it again (pytest -W always)"
    upper = [s for s in spec if s.operator in ("<", "<=")]
    assert upper, f"transformers has no upper bound in pyproject.toml: {spec}"
    for version in removals | {Version("5.40.0")}:
        assert not spec.contains(str(version)), f"transformers {version} removes what generation/hf.py uses"
