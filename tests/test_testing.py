"""The command lines of the tiny-model modules (``python -m alignpipe.testing OUT_DIR``, and
``alignpipe.testing_vlm``): one shared parser, the seed reaches the model, the folder is printed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from alignpipe import testing, testing_vlm


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("module", "save"), [(testing, testing.save_tiny_model), (testing_vlm, testing_vlm.save_tiny_vlm)]
)
def test_main_writes_the_seeded_folder_and_prints_it(tmp_path, capsys, module, save):
    module.main([str(tmp_path / "cli"), "--seed", "3"])
    assert capsys.readouterr().out.splitlines()[-1] == str(tmp_path / "cli")  # (deepspeed may log before)
    cli = _weights(tmp_path / "cli")
    assert _same(cli, _weights(save(tmp_path / "seed3", seed=3)))
    assert not _same(cli, _weights(save(tmp_path / "seed0", seed=0)))  # the seed is not ignored


def test_save_cli_defaults_to_seed_0_and_returns_the_folder(tmp_path, capsys):
    calls = []

    def save(out_dir, seed):
        calls.append((out_dir, seed))
        return tmp_path / out_dir

    assert testing.save_cli(save, "a tiny model", ["m"]) == tmp_path / "m"
    assert calls == [("m", 0)] and capsys.readouterr().out == f"{tmp_path / 'm'}\n"
    with pytest.raises(SystemExit):
        testing.save_cli(save, "a tiny model", [])  # OUT_DIR is required
