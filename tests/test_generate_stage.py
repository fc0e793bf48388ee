"""The generate stage: chunk and shard plan, resume after a crash, stale chunks, completeness checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from alignpipe.artifacts.generations import MANIFEST, plan_chunks, read_generations, write_chunk
from alignpipe.artifacts.io import ArtifactError, read_json, write_parquet
from alignpipe.artifacts.schema import PROMPTS
from alignpipe.generate import run_generate, shard_chunks
from alignpipe.params import GenerateParams

ROOT = Path(__file__).resolve().parents[1]
N_PROMPTS = 7


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    rows = [
        dict(prompt_id=f"p{i}", prompt=[{"role": "user", "content": "hello world " * (i % 3 + 1)}], meta=None)
        for i in range(N_PROMPTS)
    ]
    write_parquet(rows, path, PROMPTS)
    return path


def _params(**kw) -> GenerateParams:
    base = dict(backend="hf", n=2, max_new_tokens=4, temperature=1.0, chunk_prompts=3, batch_size=2)
    return GenerateParams(**{**base, **kw})


def _run(model_dir, prompts_file, out, **kw):
    run_kw = {k: kw.pop(k) for k in ("shard", "after_chunk", "metrics_path") if k in kw}
    return run_generate(model_dir, prompts_file, out, _params(**kw), progress=False, **run_kw)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts_file, tmp_path_factory):
    """An uninterrupted, unsharded run: the rows every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "generations"
    metrics = _run(tiny_model_dir, prompts_file, out, metrics_path=out.parent / "generate.json")
    return read_generations(out), metrics, out


@pytest.mark.parametrize(("n", "size", "shards"), [(7, 3, 1), (7, 3, 2), (10, 4, 3), (3, 5, 4), (64, 8, 5)])
def test_shards_cover_every_prompt_exactly_once(n, size, shards):
    chunks = plan_chunks(n, size)
    covered = sorted(
        i for s in range(shards) for c in shard_chunks(chunks, shards, s) for i in range(c.start, c.stop)
    )
    assert covered == list(range(n))


def test_chunk_plan_by_hand():
    chunks = plan_chunks(7, 3)
    assert [(c.index, c.start, c.stop, c.path_name) for c in chunks] == [
        (0, 0, 3, "chunk-00000.parquet"),
        (1, 3, 6, "chunk-00001.parquet"),
        (2, 6, 7, "chunk-00002.parquet"),
    ]
    assert [c.index for c in shard_chunks(chunks, 2, 0)] == [0, 2]
    assert [c.index for c in shard_chunks(chunks, 2, 1)] == [1]
    with pytest.raises(ValueError, match="out of range"):
        shard_chunks(chunks, 2, 2)


def test_full_run_writes_all_samples_and_metrics(reference):
    rows, metrics, out = reference
    assert [(r["prompt_id"], r["sample_idx"]) for r in rows] == [
        (f"p{i}", j) for i in range(N_PROMPTS) for j in range(2)
    ]
    assert {r["backend"] for r in rows} == {"hf"} and all(
        r["finish_reason"] in ("stop", "length") for r in rows
    )
    manifest = read_json(out / MANIFEST)
    assert (
        manifest["files"] == [f"chunk-0000{k}.parquet" for k in range(3)] and manifest["prompts"] == N_PROMPTS
    )
    written = read_json(out.parent / "generate.json")
    assert written == metrics and metrics["complete"] and metrics["samples"] == 2 * N_PROMPTS
    assert metrics["tokens_generated"] == sum(r["n_tokens"] for r in rows) and metrics["tokens_per_s"] > 0


def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny_model_dir, prompts_file, reference, tmp_path):
    out = tmp_path / "generations"

    def crash_after_chunk_1(chunk):
        if chunk.index == 1:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _run(tiny_model_dir, prompts_file, out, after_chunk=crash_after_chunk_1)
    assert sorted(p.name for p in out.iterdir()) == ["chunk-00000.parquet", "chunk-00001.parquet"]
    with pytest.raises(ArtifactError, match="incomplete"):
        read_generations(out)
    (out / ".chunk-00002.parquet.x1.tmp").mkdir()  # what a SIGKILL inside an atomic write leaves
    metrics = _run(tiny_model_dir, prompts_file, out)
    assert metrics["chunks_generated"] == 1 and metrics["chunks_reused"] == 2
    assert read_generations(out) == reference[0]
    assert sorted(p.name for p in out.iterdir()) == [f"chunk-0000{k}.parquet" for k in range(3)] + [MANIFEST]


def test_shards_run_apart_then_combined_equal_one_run(tiny_model_dir, prompts_file, reference, tmp_path):
    out = tmp_path / "generations"
    assert not _run(tiny_model_dir, prompts_file, out, num_shards=2, shard=1)["complete"]
    assert sorted(p.name for p in out.iterdir()) == ["chunk-00001.parquet"]
    assert _run(tiny_model_dir, prompts_file, out, num_shards=2, shard=0)[
        "complete"
    ]  # the last shard finalizes
    assert read_generations(out) == reference[0]
    again = _run(tiny_model_dir, prompts_file, out, num_shards=2)  # nothing left: no sampling
    assert again["chunks_generated"] == 0 and again["complete"]


def test_samples_do_not_depend_on_chunk_or_batch_size(tiny_model_dir, prompts_file, reference, tmp_path):
    rows = read_generations(_run_to(tiny_model_dir, prompts_file, tmp_path, chunk_prompts=2, batch_size=1))
    assert [(r["completion"], r["n_tokens"], r["seed"]) for r in rows] == [
        (r["completion"], r["n_tokens"], r["seed"]) for r in reference[0]
    ]
    assert [r["logprob"] for r in rows] == pytest.approx([r["logprob"] for r in reference[0]], abs=1e-4)


def _run_to(model_dir, prompts_file, tmp_path, **kw):
    out = tmp_path / "generations"
    _run(model_dir, prompts_file, out, **kw)
    return out


def test_chunks_from_other_settings_are_discarded(tiny_model_dir, prompts_file, reference, tmp_path):
    out = tmp_path / "generations"
    _run(tiny_model_dir, prompts_file, out, temperature=0.5, num_shards=3, shard=0)
    write_chunk(out / "chunk-00001.parquet", reference[0][:2], fp="another-run")
    metrics = _run(tiny_model_dir, prompts_file, out)
    assert metrics["chunks_generated"] == 3  # both the T=0.5 chunk and the foreign one were redone
    assert read_generations(out) == reference[0]


def test_speed_only_settings_keep_finished_chunks(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "generations"
    _run(tiny_model_dir, prompts_file, out, num_shards=3, shard=0)
    metrics = _run(tiny_model_dir, prompts_file, out, batch_size=3, gpu_memory_utilization=0.5)
    assert metrics["chunks_generated"] == 2


def test_read_generations_checks_completeness(reference, tmp_path):
    rows, _, source = reference
    out = tmp_path / "generations"
    out.mkdir()
    manifest = read_json(source / MANIFEST)
    fp = manifest["fingerprint"]
    write_chunk(out / "chunk-00000.parquet", rows[:6], fp)
    write_chunk(out / "chunk-00001.parquet", rows[6:12], fp)
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="chunk-00002.parquet: missing"):
        read_generations(out)
    write_chunk(out / "chunk-00002.parquet", rows[10:12], fp)  # duplicates instead of the last prompt
    with pytest.raises(ArtifactError, match="expected 7 prompts x 2 samples"):
        read_generations(out)
    write_chunk(out / "chunk-00002.parquet", rows[12:], "stale")
    with pytest.raises(ArtifactError, match="from another run"):
        read_generations(out)


def test_stage_cli_reports_a_bad_shard_in_one_line(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch, capsys
):
    from importlib import util

    spec = util.spec_from_file_location("generate_stage", ROOT / "stages" / "generate.py")
    stage = util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    params = tmp_path / "params.yaml"
    params.write_text("generate:\n  backend: hf\n  n: 2\n  max_new_tokens: 2\n  num_shards: 2\n")
    argv = [
        "generate.py",
        "--model",
        str(tiny_model_dir),
        "--prompts",
        str(prompts_file),
        "--out",
        str(tmp_path / "out"),
        "--params",
        str(params),
        "--shard",
        "5",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("ALIGNPIPE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        stage.main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        "error: --shard 5 is out of range: generate.num_shards is 2 (shards 0..1)"
    )
    monkeypatch.setattr(sys, "argv", argv[:-2] + ["--metrics", str(tmp_path / "m.json")])
    stage.main()
    assert len(read_generations(tmp_path / "out")) == 2 * N_PROMPTS
    # a rule across sections stops generate itself, before any sampling (not pairs, after it)
    params.write_text("generate:\n  backend: hf\n  n: 1\n  max_new_tokens: 2\n")
    monkeypatch.setattr(sys, "argv", [*argv[:-4], "--out", str(tmp_path / "out1"), "--params", str(params)])
    with pytest.raises(SystemExit) as exit_info:
        stage.main()
    assert exit_info.value.code == 1
    assert "generate.n: 1 sample per prompt gives no pairs to compare" in capsys.readouterr().err
    assert not (tmp_path / "out1").exists()
