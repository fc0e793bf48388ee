"""The pairs stage on hand-built scored tables: strategies, filters, split, user pairs, report."""

from __future__ import annotations

import csv
import json

import pytest
from pairs_helpers import TEXTS, prompt, row, run_pairs, run_stage_script, table, user_pair, write_inputs

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_json, read_parquet
from alignpipe.pairs.build import (
    NoPairsError,
    build_pairs,
    eval_prompt_ids,
    similarity_at_least,
    user_pair_rows,
    user_prompt_id,
)
from alignpipe.pairs.stage import histogram
from alignpipe.pairs.unpaired import user_example_rows
from alignpipe.params import PairsParams


def run(scored, prefs=(), prompt_ids=None, **params):
    params.setdefault("eval_fraction", 0.0)
    ids = prompt_ids or sorted({r["prompt_id"] for r in scored})
    return build_pairs(scored, [prompt(p) for p in ids], list(prefs), PairsParams(**params))


def ids(rows) -> list[str]:
    return [r["pair_id"] for r in rows]


def test_best_vs_worst_exact_row():
    train, evals, report = run(table([0.5, 1.0, 0.0, 0.5]))
    assert evals == []
    assert train == [
        {
            "pair_id": "p1:1>2",
            "prompt_id": "p1",
            "prompt": [{"role": "user", "content": "question p1"}],
            "chosen": [{"role": "assistant", "content": TEXTS[1]}],
            "rejected": [{"role": "assistant", "content": TEXTS[2]}],
            "chosen_reward": 1.0,
            "rejected_reward": 0.0,
            "margin": 1.0,
            "source": "generated",
        }
    ]
    assert report["candidate_pairs"] == 6 and report["removed"]["tie"] == 1  # samples 0 and 3


def test_truncated_samples_leave_before_choosing():
    scored = table([0.5, 1.0, 0.0, 0.25])
    scored[2]["finish_reason"] = "length"  # the worst sample was cut: next worst is sample 3
    train, _, report = run(scored)
    assert ids(train) == ["p1:1>3"] and report["removed"]["truncated"] == 1
    assert report["candidate_pairs"] == 3
    train, _, report = run(scored, allow_truncated=True)
    assert ids(train) == ["p1:1>2"] and report["removed"]["truncated"] == 0


def test_best_vs_random_keeps_the_best_and_draws_the_rest():
    scored = [r for p in range(30) for r in table([0.2, 1.0, 0.0, 0.5], pid=f"p{p:02d}")]
    train, _, _ = run(scored, strategy="best_vs_random")
    assert len(train) == 30
    assert all(r["pair_id"].split(":")[1].startswith("1>") for r in train)
    rejected = {r["pair_id"].split(">")[1] for r in train}
    assert rejected == {"0", "2", "3"}  # 30 draws from 3 partners hit all of them
    again, _, _ = run(scored, strategy="best_vs_random")
    assert ids(again) == ids(train)
    other, _, _ = run(scored, strategy="best_vs_random", seed=1)
    assert ids(other) != ids(train)


def test_best_vs_random_chosen_is_the_best_with_a_surviving_pair():
    # Sample 1 is best but 5x longer than the others: both its pairs fail the length cap.
    scored = [row("p1", 0, 0.9, n_tokens=10), row("p1", 1, 1.0, n_tokens=50), row("p1", 2, 0.0, n_tokens=10)]
    train, _, _ = run(scored, strategy="best_vs_random", max_length_ratio=2.0)
    assert ids(train) == ["p1:0>2"]


def test_all_pairs_highest_margins_first_capped():
    # margins: 1>0 1.0, 1>3 .75, 1>2 .5, 2>0 .5, 2>3 .25, 3>0 .25; the .5 tie goes to the higher chosen.
    train, _, report = run(table([0.0, 1.0, 0.5, 0.25]), strategy="all_pairs", max_pairs_per_prompt=3)
    assert ids(train) == ["p1:1>0", "p1:1>3", "p1:1>2"]
    assert [r["margin"] for r in train] == [1.0, 0.75, 0.5]
    assert report["removed"]["cap"] == 3


def test_drop_ties():
    train, _, report = run(table([1.0, 1.0, 0.0]), strategy="all_pairs")
    assert ids(train) == ["p1:0>2", "p1:1>2"] and report["removed"]["tie"] == 1
    train, _, report = run(table([1.0, 1.0, 0.0]), strategy="all_pairs", drop_ties=False)
    assert ids(train) == ["p1:0>2", "p1:1>2", "p1:0>1"] and train[-1]["margin"] == 0.0
    assert report["removed"]["tie"] == 0


def test_min_margin():
    train, _, report = run(table([1.0, 0.8, 0.0]), strategy="all_pairs", min_margin=0.5)
    assert ids(train) == ["p1:0>2", "p1:1>2"] and report["removed"]["min_margin"] == 1
    # best_vs_worst with an unreachable margin: nothing, and the error says which param to relax
    with pytest.raises(NoPairsError, match=r"pairs.min_margin=1.5 removed 3 pairs.*Relax pairs.min_margin"):
        run(table([1.0, 0.8, 0.0]), min_margin=1.5)


def test_min_chosen_reward():
    train, _, report = run(table([0.4, 0.2, 0.0]), strategy="all_pairs", min_chosen_reward=0.3)
    assert ids(train) == ["p1:0>2", "p1:0>1"] and report["removed"]["min_chosen_reward"] == 1


def test_similarity_filter_hand_computed_ratio():
    # tokens [the, cat, sat, .] vs [the, dog, sat, .]: ratio = 2 * 3 matches / 8 tokens = 0.75
    a, b = "the cat sat.", "the dog sat."
    assert similarity_at_least(a, b, 0.75) and not similarity_at_least(a, b, 0.76)
    # punctuation is a token: [same] vs [same, .] = 2 * 1 / 3
    assert similarity_at_least("same", "same.", 0.66) and not similarity_at_least("same", "same.", 0.67)
    scored = [row("p1", 0, 1.0, a), row("p1", 1, 0.0, b)]
    train, _, _ = run(scored, max_similarity=0.76)
    assert ids(train) == ["p1:0>1"]
    with pytest.raises(NoPairsError, match="pairs.max_similarity=0.75 removed 1 pairs"):
        run(scored, max_similarity=0.75)


def test_similarity_1_drops_identical_only():
    scored = [row("p1", 0, 1.0, "same"), row("p1", 1, 0.5, "same."), row("p1", 2, 0.0, "same")]
    train, _, report = run(scored, strategy="all_pairs", max_similarity=1.0)
    # 0>2 (identical texts) is gone; the two 0.5 margins rank by the higher chosen reward
    assert ids(train) == ["p1:0>1", "p1:1>2"]
    assert report["removed"]["similarity"] == 1
    train, _, report = run(scored, strategy="best_vs_worst", max_similarity=1.0)
    assert ids(train) == ["p1:0>1"]  # the best-vs-worst pair was identical: the next-largest margin wins


def test_length_ratio_in_tokens():
    scored = [row("p1", 0, 1.0, n_tokens=30), row("p1", 1, 0.5, n_tokens=12), row("p1", 2, 0.0, n_tokens=10)]
    # 0>2: 30/10 = 3 and 0>1: 30/12 = 2.5 exceed 2; 1>2: 12/10 = 1.2 passes
    train, _, report = run(scored, max_length_ratio=2.0)
    assert ids(train) == ["p1:1>2"] and report["removed"]["length_ratio"] == 2
    train, _, _ = run(scored, max_length_ratio=3.0)
    assert ids(train) == ["p1:0>2"]


def test_no_pairs_error_names_every_filter_and_the_param():
    scored = table([1.0, 1.0, 0.5]) + table([0.5, 0.5], pid="p2")
    scored[2]["finish_reason"] = "length"
    with pytest.raises(NoPairsError) as err:
        run(scored)
    msg = str(err.value)
    assert "2 prompts, 5 samples, 2 candidate pairs" in msg
    assert "pairs.allow_truncated=False removed 1 samples" in msg
    assert "pairs.drop_ties=True removed 2 pairs" in msg
    assert "Relax pairs.drop_ties first" in msg
    with pytest.raises(NoPairsError, match="raise generate.n"):
        run(table([1.0]))


def test_split_by_prompt():
    scored = [r for p in range(50) for r in table([1.0, 0.0, 0.5], pid=f"q{p}")]
    train, evals, report = run(scored, strategy="all_pairs", eval_fraction=0.2)
    train_p, eval_p = {r["prompt_id"] for r in train}, {r["prompt_id"] for r in evals}
    assert len(eval_p) == 10 and len(train_p) == 40 and not train_p & eval_p
    assert len(evals) == 30 and report["pairs_eval"] == 30 and report["prompts_eval"] == 10
    again, evals2, _ = run(scored, strategy="all_pairs", eval_fraction=0.2)
    assert ids(evals2) == ids(evals)
    _, evals3, _ = run(scored, strategy="all_pairs", eval_fraction=0.2, seed=7)
    assert {r["prompt_id"] for r in evals3} != eval_p


def test_eval_prompt_ids_edges():
    assert eval_prompt_ids(["a"], 0.5, 0) == set()  # one prompt: all train
    assert len(eval_prompt_ids(["a", "b"], 0.01, 0)) == 1  # at least one eval prompt
    assert len(eval_prompt_ids(["a", "b"], 0.99, 0)) == 1  # at least one train prompt
    assert eval_prompt_ids(list("abcdef"), 0.0, 0) == set()
    assert eval_prompt_ids(list("abcdef"), 0.5, 3) == eval_prompt_ids(list("fedcba"), 0.5, 3)


def test_user_pairs_mixed_in_and_split_with_their_prompt():
    user_same = user_pair("u1", "question p1", "good", "bad")
    user_new = user_pair("u2", "mine", "good", "bad")
    scored = table([1.0, 0.0]) + table([1.0, 0.0], pid="p2")
    train, evals, report = run(scored, prefs=[user_same, user_new], eval_fraction=0.5)
    rows = {r["pair_id"]: r for r in train + evals}
    assert set(rows) == {"p1:0>1", "p2:0>1", "u1", "u2"}
    assert rows["u1"]["prompt_id"] == "p1" and rows["u2"]["prompt_id"].startswith("user-")
    assert (
        rows["u1"]["source"] == "user"
        and rows["u1"]["chosen_reward"] is None
        and rows["u1"]["margin"] is None
    )
    side = {r["pair_id"]: r in evals for r in train + evals}
    assert side["u1"] == side["p1:0>1"]  # same prompt, same side of the split
    assert report["pairs_user"] == 2 and report["pairs_generated"] == 2


def test_user_prompt_ids_are_pinned_and_the_same_for_pairs_and_unpaired_rows():
    """A new prompt gets "user-" + sha256(prompt key)[:16], the key being the JSON of its
    [role, content] list as written (non-ASCII kept), e.g. '[["user", "mine"]]'; a prompt of
    prompts.parquet keeps its id. The two ids were computed by hand (sha256 of the key) before the
    rule was shared: another id would move user rows across the split and stale their ref_logps."""
    mine = [{"role": "user", "content": "mine"}]
    accents = [{"role": "system", "content": "Sé breve."}, {"role": "user", "content": "¿Qué hora es?"}]
    known = {'[["user", "question p1"]]': "p1"}
    assert user_prompt_id(mine, {}) == "user-c8b93734efe83280"
    assert user_prompt_id(accents, {}) == "user-18610a7d7ad9cf58"
    assert user_prompt_id([{"role": "user", "content": "question p1"}], known) == "p1"
    pref = user_pair("u", "mine")
    example = {"example_id": "e", "prompt": accents, "completion": [], "label": True}
    assert user_pair_rows([pref], known)[0]["prompt_id"] == "user-c8b93734efe83280"
    assert user_example_rows([example], known)[0]["prompt_id"] == "user-18610a7d7ad9cf58"


def test_user_pairs_alone_are_enough():
    train, _, report = run(table([1.0, 1.0]), prefs=[user_pair("u1", "x")])
    assert ids(train) == ["u1"] and report["removed"]["tie"] == 1


def test_histogram_hand_computed():
    assert histogram([]) == []
    # few distinct values (a builtin reward): one row per value
    assert histogram([1.0, 0.0, 0.5, 0.5]) == [
        {"bin": 0.0, "count": 1},
        {"bin": 0.5, "count": 2},
        {"bin": 1.0, "count": 1},
    ]
    # 5 distinct values in 3 bins of width 1/3 over [0, 1]; the max falls in the last bin
    assert histogram([0.0, 0.2, 0.5, 0.9, 1.0], bins=3) == [
        {"bin": 0.166667, "count": 2},
        {"bin": 0.5, "count": 1},
        {"bin": 0.833333, "count": 2},
    ]


def test_stage_writes_pairs_report_and_plots(tmp_path):
    scored = [r for p in range(10) for r in table([1.0, 0.0, 0.5], pid=f"q{p}")]
    write_inputs(tmp_path, scored, prefs=[user_pair("u1", "x")])
    report = run_pairs(tmp_path, PairsParams(eval_fraction=0.2))
    train = read_parquet(tmp_path / "pairs/train.parquet", schema.PAIRS)
    evals = read_parquet(tmp_path / "pairs/eval.parquet", schema.PAIRS)
    assert len(train) + len(evals) == 11 and len(evals) >= 2
    assert read_json(tmp_path / "reports/pairs.json") == report
    assert report["prompts_in"] == 10 and report["samples_in"] == 30 and report["pairs_user"] == 1
    assert report["margin_mean"] == 1.0 and report["reward_mean"] == pytest.approx(0.5)
    with open(tmp_path / "reports/pairs/rewards.csv") as f:
        rewards = list(csv.DictReader(f))
    assert rewards == [
        {"bin": "0.0", "count": "10"},
        {"bin": "0.5", "count": "10"},
        {"bin": "1.0", "count": "10"},
    ]
    assert (tmp_path / "reports/pairs/margins.csv").read_text() == "bin,count\n1.0,10\n"


def test_stage_script_fails_in_one_line(tmp_path):
    write_inputs(tmp_path, table([1.0, 1.0]))
    (tmp_path / "params.yaml").write_text(json.dumps({"pairs": {"drop_ties": True}}))
    proc = run_stage_script(tmp_path)
    assert proc.returncode == 1
    assert (
        proc.stderr.startswith("error: no preference pair survived")
        and "Relax pairs.drop_ties" in proc.stderr
    )
    assert not (tmp_path / "pairs").exists() and not (tmp_path / "unpaired").exists()
