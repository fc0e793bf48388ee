"""Bad inputs get one clear line that names what and where, and lose no earlier artifact.

Most cases call the library (fast): each builder makes one bad input in ``tmp_path`` and returns
the call that must fail, the fragments its message must hold (the file, key or row), and the
files that must survive unchanged. ``cli.stage_main`` prints such an error as ``error: <message>``
without a traceback hint (checked through ``_is_ours``). A representative subset runs the stage
scripts themselves (slow): exit code 1, one ``error:`` line last on stderr, no traceback (unless
ALIGNPIPE_DEBUG=1), earlier artifacts byte-identical, no temporary file left.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from faults import file_size_limit, limit_file_size_in_child, stage_argv, temp_leftovers
from workspace import env, make_workspace, set_params

from alignpipe.artifacts import schema
from alignpipe.artifacts.generations import read_generations
from alignpipe.artifacts.io import read_parquet, write_json, write_parquet
from alignpipe.artifacts.pairs import encode_pair, read_pairs
from alignpipe.cli import DEBUG_ENV, _is_ours
from alignpipe.core.models import load_causal_lm, load_tokenizer
from alignpipe.dpo.stage import check_loss
from alignpipe.generate import run_generate
from alignpipe.pairs.stage import pairs
from alignpipe.params import DataParams, RewardParams, load_section
from alignpipe.prepare import prepare
from alignpipe.ref_logps import run_ref_logps
from alignpipe.rewards.hf import load_reward_model
from alignpipe.rewards.load import get_reward
from alignpipe.score import score, score_rows
from alignpipe.sft.data import encode_rows
from alignpipe.testing import tiny_config, tiny_tokenizer
from alignpipe.training.loop import save_model

USER = [{"role": "user", "content": "Say hi."}]
SFT_LINE = json.dumps({"prompt": "Say hi.", "completion": "hi"})


@dataclass
class Case:
    action: Callable[[], Any]
    names: list[str]  # fragments the one-line message must contain
    intact: list[Path] = field(default_factory=list)  # files that must be byte-identical afterwards


@dataclass
class Ctx:
    tmp: Path
    tiny: Path  # read-only tiny model folder
    monkeypatch: pytest.MonkeyPatch

    def model(self, name: str = "model") -> Path:
        return Path(shutil.copytree(self.tiny, self.tmp / name))

    def params(self, text: str) -> Path:
        path = self.tmp / "params.yaml"
        path.write_text(text)
        return path

    def earlier(self, rel: str) -> Path:
        """An earlier artifact that a failing run must leave alone."""
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"earlier artifact\n")
        return path


CASES: dict[str, Callable[[Ctx], Case]] = {}


def case(builder: Callable[[Ctx], Case]) -> Callable[[Ctx], Case]:
    CASES[builder.__name__] = builder
    return builder


# ------------------------------------------------------------------ user data files (prepare)


def _prepare_with(c: Ctx, source: str, content: bytes, kind: str = "sft") -> Case:
    (c.tmp / source).write_bytes(content)
    fields: dict[str, Any] = {"builtin": {"n_sft": 2, "n_prompts": 2, "n_eval": 2}}
    fields[kind] = {"source": str(c.tmp / source)}
    earlier = c.earlier("prepared/sft.parquet")
    return Case(
        lambda: prepare(DataParams(**fields), c.tmp / "prepared", c.tmp / "prepare.json"), [source], [earlier]
    )


@case
def data_truncated_parquet(c: Ctx) -> Case:
    pq.write_table(pa.table({"prompt": ["Say hi."] * 50, "completion": ["hi"] * 50}), c.tmp / "full.parquet")
    data = (c.tmp / "full.parquet").read_bytes()
    result = _prepare_with(c, "cut.parquet", data[: len(data) // 2])
    result.names.append("not a readable parquet file")
    return result


@case
def data_wrongly_typed_column_jsonl(c: Ctx) -> Case:
    result = _prepare_with(c, "typed.jsonl", f'{SFT_LINE}\n{{"prompt": 5, "completion": "hi"}}\n'.encode())
    return Case(result.action, [*result.names, "line 2", "field 'prompt'", "got int"], result.intact)


@case
def data_wrongly_typed_column_parquet(c: Ctx) -> Case:
    pq.write_table(pa.table({"prompt": [1, 2], "completion": ["a", "b"]}), c.tmp / "typed.parquet")
    result = _prepare_with(c, "typed.parquet", (c.tmp / "typed.parquet").read_bytes())
    return Case(result.action, [*result.names, "row 0", "field 'prompt'"], result.intact)


@case
def data_non_utf8_jsonl(c: Ctx) -> Case:
    result = _prepare_with(
        c, "latin1.jsonl", SFT_LINE.encode() + b'\n{"prompt": "caf\xe9", "completion": "x"}\n'
    )
    return Case(result.action, [*result.names, "line 2", "UTF-8"], result.intact)


@case
def data_non_utf8_csv(c: Ctx) -> Case:
    result = _prepare_with(c, "latin1.csv", b"prompt,completion\nhi,there\ncaf\xe9,x\n")
    return Case(result.action, [*result.names, "line 3", "UTF-8"], result.intact)


@case
def data_malformed_json_line(c: Ctx) -> Case:
    result = _prepare_with(c, "broken.jsonl", f"{SFT_LINE}\n{{oops\n".encode())
    return Case(result.action, [*result.names, "line 2", "malformed JSON"], result.intact)


@case
def data_empty_file(c: Ctx) -> Case:
    result = _prepare_with(c, "empty.jsonl", b"")
    return Case(result.action, [*result.names, "no valid sft rows"], result.intact)


@case
def data_preference_missing_rejected(c: Ctx) -> Case:
    line = json.dumps({"prompt": "Say hi.", "chosen": "hi"}).encode()
    result = _prepare_with(c, "prefs.jsonl", line + b"\n", kind="preferences")
    return Case(result.action, [*result.names, "line 1", "field 'rejected'"], result.intact)


@case
def data_missing_file(c: Ctx) -> Case:
    params = DataParams(sft={"source": str(c.tmp / "nowhere.jsonl")})
    return Case(lambda: prepare(params, c.tmp / "prepared", c.tmp / "m.json"), ["nowhere.jsonl", "not found"])


# ------------------------------------------------------------------ artifacts between stages


def _pair_row(pair_id: str = "p0", chosen: list | None = None) -> dict[str, Any]:
    return {"pair_id": pair_id, "prompt_id": "q0", "prompt": USER,
            "chosen": chosen or [{"role": "assistant", "content": "hi"}],
            "rejected": [{"role": "assistant", "content": "no"}], "chosen_reward": 1.0,
            "rejected_reward": 0.0, "margin": 1.0, "source": "generated"}  # fmt: skip


@case
def artifact_truncated_parquet(c: Ctx) -> Case:
    path = c.tmp / "pairs/train.parquet"
    write_parquet([_pair_row(f"p{i}") for i in range(40)], path, schema.PAIRS)
    path.write_bytes(path.read_bytes()[:-100])
    return Case(
        lambda: read_pairs(path, tiny_tokenizer(), 64, 32), [str(path), "not a readable parquet file"]
    )


@case
def artifact_wrongly_typed_column(c: Ctx) -> Case:
    path = c.tmp / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": ["a"], "prompt": ["Say hi."], "meta": [None]}), path)
    return Case(lambda: read_parquet(path, schema.PROMPTS), [str(path), "column 'prompt'", "is string"])


@case
def artifact_missing_column(c: Ctx) -> Case:
    path = c.tmp / "train.parquet"
    pq.write_table(pa.Table.from_pylist([_pair_row()]).drop_columns(["chosen"]), path)
    return Case(lambda: read_pairs(path, tiny_tokenizer(), 64, 32), [str(path), "missing column(s) chosen"])


@case
def artifact_duplicate_pair_id(c: Ctx) -> Case:
    path = c.tmp / "train.parquet"
    write_parquet([_pair_row("p0"), _pair_row("p0")], path, schema.PAIRS)
    return Case(lambda: read_pairs(path, tiny_tokenizer(), 64, 32), [str(path), "row 1", "duplicate id 'p0'"])


@case
def artifact_pair_with_two_answers(c: Ctx) -> Case:
    two = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    return Case(lambda: encode_pair(tiny_tokenizer(), _pair_row("p7", two), 64, 32, "train.parquet"),
                ["train.parquet", "pair p7", "field 'chosen'"])  # fmt: skip


@case
def artifact_unfinished_generations(c: Ctx) -> Case:
    folder = c.tmp / "generations"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([], schema=schema.GENERATIONS), folder / "chunk-00000.parquet")
    return Case(lambda: read_generations(folder), [str(folder), "incomplete", "manifest.json"])


@case
def artifact_ref_logps_missing_a_pair(c: Ctx) -> Case:
    from alignpipe.dpo.data import load_split

    write_parquet([_pair_row("p0"), _pair_row("p1")], c.tmp / "pairs/train.parquet", schema.PAIRS)
    ref = c.tmp / "ref_logps.parquet"
    p0 = encode_pair(tiny_tokenizer(), _pair_row("p0"), 64, 32)
    counts = {
        "chosen_tokens": len(p0.chosen.completion_ids),
        "rejected_tokens": len(p0.rejected.completion_ids),
    }
    write_parquet([{"pair_id": "p0", "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0, **counts}], ref,
                  schema.REF_LOGPS)  # fmt: skip
    return Case(lambda: load_split(c.tmp / "pairs", "train", ref, tiny_tokenizer(), 64, 32),
                [str(ref), "pair 'p1'", "rerun ref_logps"])  # fmt: skip


@case
def sft_row_with_empty_completion(c: Ctx) -> Case:
    rows = [{"id": "r0", "prompt": USER, "completion": [], "meta": None}]
    return Case(lambda: encode_rows(tiny_tokenizer(), rows, 64, where="sft.parquet"),
                ["sft.parquet", "row 0", "'r0'", "field 'completion'"])  # fmt: skip


@case
def sft_every_prompt_longer_than_max_length(c: Ctx) -> Case:
    rows = [{"id": "r0", "prompt": [{"role": "user", "content": "word " * 500}],
             "completion": [{"role": "assistant", "content": "ok"}], "meta": None}]  # fmt: skip
    return Case(lambda: encode_rows(tiny_tokenizer(), rows, 64, "drop", where="sft.parquet"),
                ["sft.parquet", "sft.max_length=64", "dropped"])  # fmt: skip


# ------------------------------------------------------------------ rewards


def _score_with(c: Ctx, body: str) -> Case:
    module = f"user_reward_{c.tmp.name}"  # one module per case: imports are cached in sys.modules
    (c.tmp / f"{module}.py").write_text(f"def reward(prompts, completions):\n    {body}\n")
    c.monkeypatch.syspath_prepend(str(c.tmp))
    rows = [{"prompt_id": "q0", "sample_idx": i, "completion": f"answer {i}", "n_tokens": 2,
             "finish_reason": "stop", "logprob": None, "backend": "hf", "seed": i} for i in range(3)]  # fmt: skip
    prompts = {"q0": {"prompt_id": "q0", "prompt": USER, "meta": None}}
    reward = get_reward(RewardParams(kind="python", function=f"{module}:reward"))
    return Case(lambda: score_rows(reward, rows, prompts), [f"{module}:reward"])


@case
def reward_nan(c: Ctx) -> Case:
    result = _score_with(c, "return [0.0, float('nan'), 1.0]")
    return Case(result.action, [*result.names, "(prompt_id=q0, sample_idx=1): nan"])


@case
def reward_inf(c: Ctx) -> Case:
    result = _score_with(c, "return [float('-inf'), 0.0, 1.0]")
    return Case(result.action, [*result.names, "(prompt_id=q0, sample_idx=0): -inf"])


@case
def reward_wrong_count(c: Ctx) -> Case:
    result = _score_with(c, "return [1.0]")
    return Case(result.action, [*result.names, "returned 1 rewards for 3 completions"])


@case
def reward_not_a_number(c: Ctx) -> Case:
    result = _score_with(c, "return ['good', 'bad', 'ok']")
    return Case(result.action, [*result.names, "(prompt_id=q0, sample_idx=0)", "expected a number"])


@case
def reward_function_raises(c: Ctx) -> Case:
    result = _score_with(c, "return [1 / 0] * len(completions)")
    return Case(result.action, [*result.names, "raised ZeroDivisionError"])


@case
def reward_module_not_importable(c: Ctx) -> Case:
    params = RewardParams(kind="python", function="no_such_reward_module:fn")
    return Case(lambda: get_reward(params), ["no_such_reward_module:fn", "cannot import module"])


def _classifier(c: Ctx, num_labels: int) -> Path:
    from transformers import LlamaForSequenceClassification

    tokenizer = tiny_tokenizer()
    config = tiny_config(len(tokenizer), num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    folder = c.tmp / f"rm{num_labels}"
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@case
def reward_model_with_two_labels(c: Ctx) -> Case:
    folder = _classifier(c, 2)
    return Case(lambda: load_reward_model(str(folder), torch.float32), [str(folder), "num_labels=2"])


@case
def reward_model_is_a_causal_lm(c: Ctx) -> Case:
    folder = c.model()
    return Case(
        lambda: load_reward_model(str(folder), torch.float32), [str(folder), "not a sequence-classification"]
    )


# ------------------------------------------------------------------ model folders


@case
def model_folder_missing(c: Ctx) -> Case:
    return Case(lambda: load_causal_lm(c.tmp / "models/sft", device="cpu"), ["models/sft", "folder missing"])


@case
def model_folder_without_config(c: Ctx) -> Case:
    folder = c.model()
    (folder / "config.json").unlink()
    return Case(lambda: load_causal_lm(folder, device="cpu"), [str(folder), "no config.json"])


@case
def model_folder_missing_weights(c: Ctx) -> Case:
    folder = c.model()
    (folder / "model.safetensors").unlink()
    return Case(lambda: load_causal_lm(folder, device="cpu"), [str(folder), "no *.safetensors"])


@case
def model_folder_with_truncated_weights(c: Ctx) -> Case:
    folder = c.model()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return Case(lambda: load_causal_lm(folder, device="cpu"), [str(folder), "cannot load the model"])


@case
def tokenizer_without_pad_or_eos(c: Ctx) -> Case:
    folder = c.model()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    config.pop("eos_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Case(lambda: load_tokenizer(folder), [str(folder), "neither a pad token nor an EOS token"])


@case
def tokenizer_without_chat_template(c: Ctx) -> Case:
    from alignpipe.generation.load import load_chat_tokenizer

    folder = c.model()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return Case(lambda: load_chat_tokenizer(folder), [str(folder), "no chat template"])


# ------------------------------------------------------------------ params.yaml


def _params_case(c: Ctx, text: str, section: str, names: list[str]) -> Case:
    path = c.params(text)
    return Case(lambda: check_loss(load_section(section, path)) if section == "dpo" else load_section(section, path),
                names)  # fmt: skip


@case
def params_unknown_loss_type(c: Ctx) -> Case:
    return _params_case(
        c, "dpo:\n  loss_type: sigmoidd\n", "dpo", ["loss_type 'sigmoidd'", "did you mean 'sigmoid'"]
    )


@case
def params_unknown_loss_option(c: Ctx) -> Case:
    return _params_case(
        c, "dpo:\n  loss_options: {gamma: 1.0}\n", "dpo", ["loss option 'gamma'", "simpo_gamma"]
    )


@case
def params_beta_zero(c: Ctx) -> Case:
    return _params_case(c, "dpo:\n  beta: 0\n", "dpo", ["params.yaml", "dpo.beta", "greater than 0"])


@case
def params_beta_negative(c: Ctx) -> Case:
    return _params_case(c, "dpo:\n  beta: -0.1\n", "dpo", ["params.yaml", "dpo.beta", "greater than 0"])


@case
def params_label_smoothing_half(c: Ctx) -> Case:
    return _params_case(c, "dpo:\n  label_smoothing: 0.5\n", "dpo", ["dpo.label_smoothing", "less than 0.5"])


@case
def params_typo_in_a_key(c: Ctx) -> Case:
    return _params_case(c, "dpo:\n  betta: 0.1\n", "dpo", ["dpo.betta: unknown key (did you mean 'beta'?)"])


@case
def params_wrong_type(c: Ctx) -> Case:
    return _params_case(c, "sft:\n  batch_size: eight\n", "sft", ["params.yaml", "sft.batch_size", "integer"])


@case
def params_prompt_not_shorter_than_max_length(c: Ctx) -> Case:
    text = "dpo:\n  max_length: 64\n  max_prompt_length: 64\n"
    return _params_case(c, text, "dpo", ["dpo.max_prompt_length must be smaller than dpo.max_length"])


@case
def params_hf_reward_without_model(c: Ctx) -> Case:
    return _params_case(
        c, "reward:\n  kind: hf\n", "reward", ["params.yaml", "reward.kind 'hf' needs reward.model"]
    )


@case
def params_not_yaml(c: Ctx) -> Case:
    return _params_case(c, "dpo:\n  beta: [0.1\n", "dpo", ["params.yaml", "not valid YAML"])


@case
def params_unknown_section(c: Ctx) -> Case:
    return _params_case(
        c, "dpoo:\n  beta: 0.1\n", "dpo", ["params.yaml", "dpoo: unknown key (did you mean 'dpo'?)"]
    )


# ------------------------------------------------------------------ outputs: unwritable, full disk


@case
def output_folder_is_a_file(c: Ctx) -> Case:
    (c.tmp / "data").write_text("a file where the output folder should be")
    out = c.tmp / "data/scored.parquet"
    return Case(
        lambda: write_parquet([], out, schema.SCORED), [str(out), "cannot write here"], [c.tmp / "data"]
    )


@case
def output_folder_not_writable(c: Ctx) -> Case:
    """EACCES as a read-only folder gives it (simulated: chmod does not bind root)."""
    import tempfile

    def denied(*args: Any, **kwargs: Any) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    earlier = c.earlier("reports/score.json")
    c.monkeypatch.setattr(tempfile, "mkdtemp", denied)
    return Case(lambda: write_json({"a": 1}, earlier), [str(earlier), "Permission denied"], [earlier])


@case
def output_folder_read_only(c: Ctx) -> Case:
    """A real read-only folder (root ignores permissions: there the simulated case above stands in)."""
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    earlier = c.earlier("reports/score.json")
    earlier.parent.chmod(0o555)  # pytest's tmp_path cleanup restores write permission to delete it
    return Case(lambda: write_json({"a": 1}, earlier), [str(earlier), "Permission denied"], [earlier])


@case
def output_disk_full_parquet(c: Ctx) -> Case:
    """ENOSPC after half the bytes are written."""
    real = pq.write_table

    def half_then_full(table: pa.Table, where: Any, **kwargs: Any) -> None:
        real(table, where, **kwargs)
        Path(where).write_bytes(Path(where).read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    earlier = c.earlier("data/scored.parquet")
    c.monkeypatch.setattr(pq, "write_table", half_then_full)
    return Case(
        lambda: write_parquet([], earlier, schema.SCORED),
        [str(earlier), "No space left on device"],
        [earlier],
    )


@case
def output_disk_full_model(c: Ctx) -> Case:
    """The kernel refuses to grow any file past 16 KiB (RLIMIT_FSIZE) while the model is saved."""
    from transformers import AutoModelForCausalLM

    earlier = c.earlier("models/dpo/model.safetensors")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(c.tiny), tiny_tokenizer()

    def save() -> None:
        with file_size_limit(16 * 1024):
            save_model(model, None, tokenizer, earlier.parent)

    return Case(save, [str(earlier.parent), "File too large"], [earlier])


@case
def output_disk_full_json(c: Ctx) -> Case:
    earlier = c.earlier("reports/eval.json")

    def save() -> None:
        with file_size_limit(1024):
            write_json({"rows": list(range(1000))}, earlier)

    return Case(save, [str(earlier), "File too large"], [earlier])


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_with_one_line_naming_it_and_keeps_earlier_artifacts(
    name, tmp_path, tiny_model_dir, monkeypatch
):
    bad = CASES[name](Ctx(tmp_path, tiny_model_dir, monkeypatch))
    before = {path: path.read_bytes() if path.is_file() else None for path in bad.intact}
    with pytest.raises(Exception) as info:
        bad.action()
    message = " ".join(str(info.value).split())
    assert _is_ours(info.value), f"{type(info.value).__name__} would print a traceback hint: {message}"
    missing = [fragment for fragment in bad.names if fragment not in message]
    assert not missing, f"{missing} not in: {message}"
    for path, content in before.items():
        assert (path.read_bytes() if path.is_file() else None) == content, f"{path} changed"
    assert temp_leftovers(tmp_path) == []


# ------------------------------------------------------------------ inputs that are handled, not refused


def test_a_100k_token_completion_is_cut_to_max_length_and_counted():
    tokenizer = tiny_tokenizer()
    huge = "word " * 100_000  # ~100k tokens with the tiny tokenizer
    rows = [
        {"id": "r0", "prompt": USER, "completion": [{"role": "assistant", "content": huge}], "meta": None}
    ]
    data = encode_rows(tokenizer, rows, 64)
    assert (data.truncated, len(data.examples[0].input_ids)) == (1, 64)
    pair = encode_pair(tokenizer, _pair_row("p0", [{"role": "assistant", "content": huge}]), 64, 32)
    assert len(pair.chosen.input_ids) == 64 and len(pair.rejected.input_ids) <= 64


def test_a_prompt_longer_than_max_length_is_cut_and_counted():
    """SFT cuts the prompt inside its user turn and keeps the whole short answer; DPO caps the prompt at
    max_prompt_length (tests/test_truncation.py checks the template stays whole)."""
    tokenizer = tiny_tokenizer()
    long_prompt = [{"role": "user", "content": "word " * 500}]
    row = {
        "id": "r0",
        "prompt": long_prompt,
        "completion": [{"role": "assistant", "content": "ok"}],
        "meta": None,
    }
    data = encode_rows(tokenizer, [row], 64)
    example = data.examples[0]
    answer = encode_rows(tokenizer, [{**row, "prompt": USER}], 64).examples[0]
    answer_len = len(answer.input_ids) - answer.prompt_len
    assert (data.truncated, data.truncation.prompt) == (1, 1)
    assert len(example.input_ids) <= 64 and len(example.input_ids) - example.prompt_len == answer_len
    pair = encode_pair(tokenizer, {**_pair_row(), "prompt": long_prompt}, 64, 32)
    assert len(pair.chosen.prompt_ids) <= 32 and pair.chosen.completion_ids[-1] == tokenizer.eos_token_id


def test_a_tokenizer_without_pad_token_pads_with_eos(tmp_path, tiny_model_dir):
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None


def test_every_bad_input_case_is_counted():
    assert len(CASES) >= 25


# ------------------------------------------------------------------ the stage scripts themselves

SMALL = {
    "data": {"builtin": {"n_sft": 4, "n_prompts": 4, "n_eval": 2}},
    "generate": {"backend": "hf", "n": 2, "max_new_tokens": 8, "chunk_prompts": 2},
    "pairs": {
        "strategy": "all_pairs",
        "drop_ties": False,
        "max_similarity": 1.0,
        "allow_truncated": True,
        "eval_fraction": 0.0,
    },  # fmt: skip
    "dpo": {"max_length": 64, "max_prompt_length": 32},
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_dir) -> Path:
    """A workspace whose artifacts up to ref_logps exist (made in-process), plus an earlier models/dpo."""
    ws = make_workspace(tmp_path_factory.mktemp("bad") / "ws", SMALL)
    for name in ("base", "sft", "dpo"):
        shutil.copytree(tiny_model_dir, ws / "models" / name)
    params = ws / "params.yaml"
    prepare(load_section("data", params), ws / "data/prepared", ws / "reports/prepare.json")
    prompts = ws / "data/prepared/prompts.parquet"
    run_generate(
        ws / "models/sft", prompts, ws / "data/generations", load_section("generate", params), progress=False
    )
    score(ws / "data/generations", prompts, ws / "data/scored.parquet", ws / "reports/score.json",
          load_section("reward", params))  # fmt: skip
    pairs(ws / "data/scored.parquet", prompts, ws / "data/prepared", ws / "data/pairs", ws / "reports/pairs.json",
          ws / "reports/pairs", load_section("pairs", params))  # fmt: skip
    run_ref_logps(ws / "models/sft", ws / "data/pairs", ws / "data/ref_logps.parquet", load_section("ref_logps", params),
                  64, 32)  # fmt: skip
    return ws


def _nan_reward(ws: Path) -> dict[str, Any]:
    (ws / "nan_reward.py").write_text(
        "def score(prompts, completions):\n    return [float('nan')] * len(completions)\n"
    )
    return {"reward": {"kind": "python", "function": "nan_reward:score"}}


def _latin1_data(ws: Path) -> dict[str, Any]:
    (ws / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    return {"data": {"sft": {"source": "latin1.jsonl"}}}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-64])


STAGE_CASES: dict[str, tuple[str, Callable[[Path], dict[str, Any] | None], list[str], list[str]]] = {
    # name: (stage, make it bad (returns params overrides), fragments of the error line, artifacts kept)
    "prepare_non_utf8_data": (
        "prepare",
        _latin1_data,
        ["latin1.jsonl: line 1", "UTF-8"],
        ["data/prepared/sft.parquet", "reports/prepare.json"],
    ),
    "score_nan_reward": (
        "score",
        _nan_reward,
        ["non-finite reward", "(prompt_id=", "nan"],
        ["data/scored.parquet", "reports/score.json"],
    ),
    "score_disk_full": (
        "score",
        lambda ws: None,
        ["data/scored.parquet: write failed", "File too large"],
        ["data/scored.parquet", "reports/score.json"],
    ),  # fmt: skip
    "pairs_truncated_scored": (
        "pairs",
        lambda ws: _truncate(ws / "data/scored.parquet"),
        ["data/scored.parquet: not a readable parquet file"],
        ["data/pairs/train.parquet", "reports/pairs.json"],
    ),
    "pairs_params_typo": (
        "pairs",
        lambda ws: {"pairs": {"min_margn": 0.5}},
        ["params.yaml: pairs.min_margn: unknown key (did you mean 'min_margin'?)"],
        ["data/pairs/train.parquet"],
    ),
    "ref_logps_model_without_weights": (
        "ref_logps",
        lambda ws: (ws / "models/sft/model.safetensors").unlink(),
        ["models/sft: no *.safetensors weights"],
        ["data/ref_logps.parquet"],
    ),
    "dpo_unknown_loss_type": (
        "dpo",
        lambda ws: {"dpo": {"loss_type": "sigmoidd"}},
        ["unknown loss_type 'sigmoidd'", "did you mean 'sigmoid'"],
        ["models/dpo/model.safetensors"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGE_CASES))
def test_stage_script_prints_one_error_line_and_exits_1(name, artifacts, tmp_path):
    stage, make_bad, fragments, kept = STAGE_CASES[name]
    ws = Path(shutil.copytree(artifacts, tmp_path / "ws", symlinks=True))
    overrides = make_bad(ws)
    if overrides:
        set_params(ws, overrides)
    before = {rel: (ws / rel).read_bytes() for rel in kept}
    preexec = limit_file_size_in_child(1024) if name.endswith("disk_full") else None
    quiet = {k: v for k, v in env().items() if k != DEBUG_ENV}
    proc = subprocess.run(stage_argv(ws, stage), cwd=ws, env=quiet, capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert lines[-1].startswith("error: ") and [x for x in lines if x.startswith("error:")] == lines[-1:]
    assert "Traceback" not in proc.stderr and "set ALIGNPIPE_DEBUG" not in lines[-1]
    missing = [fragment for fragment in fragments if fragment not in lines[-1]]
    assert not missing, f"{missing} not in: {lines[-1]}"
    assert {rel: (ws / rel).read_bytes() for rel in kept} == before
    assert [p for p in temp_leftovers(ws) if not p.startswith(".git")] == []


@pytest.mark.slow
def test_debug_switch_shows_the_traceback(artifacts, tmp_path):
    ws = Path(shutil.copytree(artifacts, tmp_path / "ws", symlinks=True))
    _truncate(ws / "data/scored.parquet")
    proc = subprocess.run(stage_argv(ws, "pairs"), cwd=ws, env={**env(), DEBUG_ENV: "1"}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ArtifactError" in proc.stderr
