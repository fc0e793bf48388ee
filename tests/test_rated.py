"""Rated sets (data.rated) into scored.parquet: the ratings are the reward, generate samples nothing.

The fixtures are written by hand after openbmb/UltraFeedback's raw rows and nvidia/HelpSteer2's
rows; every reward below is worked out by hand from them, per rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from workspace import dvc, make_workspace, ran_stages

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet
from alignpipe.pairs.build import build_pairs
from alignpipe.params import DataParams, PairsParams, SourceParams
from alignpipe.prepare import prepare
from alignpipe.score import ScorePaths
from alignpipe.score import run as run_score


def _completion(model: str, response: str, ratings: dict[str, str], overall: float) -> dict:
    annotations = {aspect: {"Rating": r, "Rationale": "..."} for aspect, r in ratings.items()}
    return {"model": model, "principle": "helpfulness", "custom_system_prompt": "Be helpful.",
            "response": response, "annotations": annotations, "critique": "...", "overall_score": overall}  # fmt: skip


def _aspects(h: str, ho: str, i: str, t: str) -> dict[str, str]:
    return {"helpfulness": h, "honesty": ho, "instruction_following": i, "truthfulness": t}


ULTRAFEEDBACK = [
    {"source": "evol_instruct", "instruction": "Name a prime number.", "completions": [
        _completion("gpt-4", "7.", _aspects("5", "5", "4", "5"), 8.5),
        _completion("alpaca-7b", "9.", _aspects("2", "4", "4", "1"), 3.0),
        _completion("wizardlm-7b", "2 is the smallest prime.", _aspects("4", "N/A", "5", "5"), 7.0),
    ]},
    {"source": "ultrachat", "instruction": "Dis bonjour en français, s'il te plaît.", "completions": [
        _completion("gpt-3.5-turbo", "Bonjour !", _aspects("5", "5", "5", "5"), 9.0),
        _completion("falcon-40b-instruct", "Hello.", _aspects("1", "5", "1", "5"), 2.5),
    ]},
]  # fmt: skip
# reward per rule, in file order (N/A is left out of the mean; honesty N/A leaves the completion out)
UF_REWARDS = {
    "overall": [8.5, 3.0, 7.0, 9.0, 2.5],
    "mean": [4.75, 2.75, 14 / 3, 5.0, 3.0],
    "helpfulness": [5.0, 2.0, 4.0, 5.0, 1.0],
    "honesty": [5.0, 4.0, None, 5.0, 5.0],
}
HELPSTEER = [
    {"prompt": "What is 3*4?", "response": "12", "helpfulness": 4, "correctness": 4, "coherence": 4,
     "complexity": 1, "verbosity": 1},
    {"prompt": "What is 3*4?", "response": "34", "helpfulness": 0, "correctness": 0, "coherence": 3,
     "complexity": 0, "verbosity": 1},
    {"prompt": "What is 3*4?", "response": "3*4 is 12, since 3+3+3+3 = 12.", "helpfulness": 3,
     "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 3},
]  # fmt: skip
HS_REWARDS = {
    "helpfulness": [4.0, 0.0, 3.0],  # auto
    "mean": [2.8, 0.8, 3.0],  # (4+4+4+1+1)/5, (0+0+3+0+1)/5, (3+4+4+1+3)/5
    "correctness": [4.0, 0.0, 4.0],
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def prepare_and_score(tmp_path: Path, source: Path, rating: str) -> list[dict]:
    data = DataParams(
        builtin={"n_sft": 4, "n_prompts": 4, "n_eval": 2},
        prompts=SourceParams(source=None),
        rated=SourceParams(source=str(source), rating=rating),
    )
    prepared = tmp_path / f"prepared-{rating}"
    metrics = prepare(data, prepared, tmp_path / "prepare.json")
    assert metrics["rated"]["rule"] == {"auto": "helpfulness"}.get(rating, rating)
    assert metrics["prompts"]["rows"] == metrics["rated"]["prompts"]
    paths = ScorePaths(tmp_path / "no-generations", prepared / "prompts.parquet", tmp_path / "scored.parquet",
                       tmp_path / "score.json", rated=prepared / "rated.parquet")  # fmt: skip
    run_score(None, paths)  # type: ignore[arg-type]  # no reward runs
    return read_parquet(tmp_path / "scored.parquet", schema.SCORED)


@pytest.mark.parametrize("rule", ["overall", "mean", "helpfulness", "honesty"])
def test_ultrafeedback_into_scored_rows_per_rule(tmp_path, rule):
    source = write_jsonl(tmp_path / "uf.jsonl", ULTRAFEEDBACK)
    rows = prepare_and_score(tmp_path, source, rule)
    want = [(t, r) for t, r in zip(["7.", "9.", "2 is the smallest prime.", "Bonjour !", "Hello."],
                                   UF_REWARDS[rule], strict=True) if r is not None]  # fmt: skip
    assert [(r["completion"], r["reward"]) for r in rows] == [(t, pytest.approx(w)) for t, w in want]
    prompts = read_parquet(tmp_path / f"prepared-{rule}" / "prompts.parquet", schema.PROMPTS)
    assert [p["prompt"] for p in prompts] == [
        [{"role": "user", "content": "Name a prime number."}],
        [{"role": "user", "content": "Dis bonjour en français, s'il te plaît."}],
    ]
    first = prompts[0]["prompt_id"]
    assert [(r["prompt_id"] == first, r["sample_idx"]) for r in rows][:2] == [(True, 0), (True, 1)]
    assert {r["backend"] for r in rows} == {"rated"} and {r["finish_reason"] for r in rows} == {"stop"}
    assert all(r["n_tokens"] is None and r["logprob"] is None for r in rows)
    details = json.loads(rows[0]["reward_details"])
    assert details["format"] == "ultrafeedback" and details["rule"] == rule and details["model"] == "gpt-4"
    assert details["scores"]["overall"] == 8.5 and details["scores"]["instruction_following"] == 4.0
    report = json.loads((tmp_path / "score.json").read_text())
    assert report["reward"] == f"rated:ultrafeedback:{rule}" and report["samples"] == len(want)
    assert report["prompts"] == 2 and len(report["reward_hash"]) == 64


@pytest.mark.parametrize("rating", ["auto", "mean", "correctness"])
def test_helpsteer_into_scored_rows_per_rule(tmp_path, rating):
    source = write_jsonl(tmp_path / "hs.jsonl", HELPSTEER)
    rows = prepare_and_score(tmp_path, source, rating)
    rule = "helpfulness" if rating == "auto" else rating
    assert [r["completion"] for r in rows] == [h["response"] for h in HELPSTEER]
    assert [r["reward"] for r in rows] == pytest.approx(HS_REWARDS[rule])
    assert [r["sample_idx"] for r in rows] == [0, 1, 2] and len({r["prompt_id"] for r in rows}) == 1
    assert json.loads(rows[0]["reward_details"])["rule"] == rule


def test_pairs_apply_to_the_rated_completions(tmp_path):
    """pairs.strategy, its filters and the split act on the ratings as on generated rewards."""
    rows = prepare_and_score(tmp_path, write_jsonl(tmp_path / "uf.jsonl", ULTRAFEEDBACK), "mean")
    prompts = read_parquet(tmp_path / "prepared-mean" / "prompts.parquet", schema.PROMPTS)
    train, evals, report = build_pairs(rows, prompts, [], PairsParams(eval_fraction=0.0))
    got = [(r["chosen"][0]["content"], r["rejected"][0]["content"], r["margin"]) for r in train]
    assert got == [("7.", "9.", pytest.approx(2.0)), ("Bonjour !", "Hello.", pytest.approx(2.0))]
    assert evals == [] and report["samples_in"] == 5
    # all_pairs over the means 4.75, 2.75, 14/3: margins 2, 1.9167 pass min_margin 1.9; 0.0833 does not
    params = PairsParams(eval_fraction=0.0, strategy="all_pairs", min_margin=1.9)
    train, _, report = build_pairs(rows, prompts, [], params)
    got = [(r["chosen"][0]["content"], r["rejected"][0]["content"], r["margin"]) for r in train]
    assert got == [
        ("7.", "9.", pytest.approx(2.0)),
        ("2 is the smallest prime.", "9.", pytest.approx(14 / 3 - 2.75)),
        ("Bonjour !", "Hello.", pytest.approx(2.0)),
    ]
    assert report["removed"]["min_margin"] == 1 and report["candidate_pairs"] == 4


def test_rated_and_prompts_sources_together_are_refused():
    with pytest.raises(ValueError, match=r"set data.prompts.source: null"):
        DataParams(rated=SourceParams(source="uf.jsonl"))
    with pytest.raises(ValueError, match=r"data.prompts.source must be set"):
        DataParams(prompts=SourceParams(source=None))
    from alignpipe.params import Params

    # generate.n: 1 is no error with a rated set: generate samples nothing, the set has the N completions
    rated = {"prompts": {"source": None}, "rated": {"source": "uf.jsonl"}}
    assert Params(data=rated, generate={"n": 1, "temperature": 0}).data.rated.source == "uf.jsonl"


@pytest.mark.slow
def test_dvc_with_a_rated_set_generates_nothing_and_pairs_the_ratings(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", {
        "base_model": {"source": str(tiny_model_dir)},
        "data": {"builtin": {"n_sft": 4, "n_eval": 2}, "prompts": {"source": None},
                 "rated": {"source": "uf.jsonl", "rating": "overall"}},
        "sft": {"enabled": False},
        "pairs": {"eval_fraction": 0.5},
    })  # fmt: skip
    write_jsonl(ws / "uf.jsonl", ULTRAFEEDBACK)
    proc = dvc(ws, "repro", "pairs")
    assert sorted(ran_stages(proc.stdout)) == sorted(
        ["base_model", "prepare", "sft", "generate", "reward_model", "score", "pairs"]
    )
    assert "generate: skipped: rated set (5 rated completions of 2 prompts" in proc.stdout
    assert sorted(p.name for p in (ws / "data/generations").iterdir()) == ["SKIPPED.json"]
    report = json.loads((ws / "reports/generate.json").read_text())
    assert report["skipped"] == "rated set" and report["samples_generated"] == 0
    assert json.loads((ws / "reports/score.json").read_text())["reward"] == "rated:ultrafeedback:overall"
    pairs = read_parquet(ws / "data/pairs/train.parquet", schema.PAIRS)
    pairs += read_parquet(ws / "data/pairs/eval.parquet", schema.PAIRS)
    got = sorted((r["chosen"][0]["content"], r["rejected"][0]["content"], r["margin"]) for r in pairs)
    assert got == [("7.", "9.", 5.5), ("Bonjour !", "Hello.", 6.5)]  # best vs worst by overall_score
    assert {r["source"] for r in pairs} == {"generated"}


def test_generate_writes_the_marker_for_a_rated_set_and_samples_again_without_one(tmp_path, tiny_model_dir):
    from alignpipe.artifacts.generations import read_generations
    from alignpipe.artifacts.io import write_parquet
    from alignpipe.generate import SKIPPED, GeneratePaths
    from alignpipe.generate import run as run_generate
    from alignpipe.params import GenerateParams

    prompts = [{"prompt_id": "p0", "prompt": [{"role": "user", "content": "hello"}], "meta": None}]
    write_parquet(prompts, tmp_path / "prompts.parquet", schema.PROMPTS)
    rated = [{"prompt_id": "p0", "sample_idx": i, "completion": t, "reward": r, "reward_details": "{}"}
             for i, (t, r) in enumerate([("hi", 1.0), ("go away", 0.0)])]  # fmt: skip
    write_parquet(rated, tmp_path / "rated.parquet", schema.RATED)
    out, metrics = tmp_path / "generations", tmp_path / "generate.json"
    (out / "old-chunk").mkdir(parents=True)  # whatever an earlier run left in the persist out
    paths = GeneratePaths(
        tiny_model_dir, tmp_path / "prompts.parquet", out, metrics, tmp_path / "rated.parquet"
    )
    params = GenerateParams(backend="hf", n=2, max_new_tokens=3)
    got = run_generate(params, paths)
    assert got["skipped"] == "rated set" and got["rated_completions"] == 2 and got["samples_generated"] == 0
    assert [p.name for p in out.iterdir()] == [SKIPPED] and json.loads(metrics.read_text()) == got
    marker = (out / SKIPPED).read_bytes()
    run_generate(params, paths)
    assert (out / SKIPPED).read_bytes() == marker  # a constant: score's input does not change
    write_parquet([], tmp_path / "rated.parquet", schema.RATED)  # the rated set is gone: sample again
    got = run_generate(params, paths)
    assert got["samples_generated"] == 2 and not (out / SKIPPED).exists()
    assert len(read_generations(out)) == 2
