"""Unpaired (KTO) examples from hand-built scored tables: each label rule, each filter, the split,
user rows, the report and the stage's files. Expected labels are worked out by hand in each test."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from pairs_helpers import ROOT, prompt, row, run_pairs, run_stage_script, table, write_inputs

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_json, read_parquet
from alignpipe.pairs.stage import label_histogram
from alignpipe.pairs.unpaired import REMOVED, UnpairedError, build_unpaired
from alignpipe.params import PairsParams, ParamsError, UnpairedParams, validate

# A spec of the built-in task: all lowercase, at most 3 words.
SPEC = {"constraints": [{"family": "lowercase"}, {"family": "max_words", "n": 3}], "topic": None}
WORDS = " ".join(f"w{i}" for i in range(20))  # 20 distinct tokens
NEAR = WORDS.replace("w19", "x19")  # 19 of 20 tokens shared: difflib ratio 2*19/40 = 0.95


def run(scored, user=(), prompts=None, pair_prompts=None, pair_eval=None, **params):
    params.setdefault("eval_fraction", 0.0)
    prompts = prompts or [prompt(p) for p in sorted({r["prompt_id"] for r in scored})]
    return build_unpaired(scored, prompts, list(user), PairsParams(**params), pair_prompts, pair_eval)


def labels(rows) -> dict[str, bool]:
    return {r["example_id"]: r["label"] for r in rows}


def quantile(q: float) -> dict:
    return {"unpaired": {"label": "quantile", "quantile": q}}


def threshold(t: float) -> dict:
    return {"unpaired": {"label": "threshold", "threshold": t}}


# --- label rules ------------------------------------------------------------------------------------


def test_threshold_exact_rows():
    """t = 0.5: 0.9 and 0.5 (at the threshold) desirable, 0.49 undesirable, 1.0 desirable."""
    train, evals, report = run(table([0.9, 0.5, 0.49, 1.0]), **threshold(0.5))
    assert evals == []
    assert labels(train) == {"p1:0": True, "p1:1": True, "p1:2": False, "p1:3": True}
    assert train[2] == {
        "example_id": "p1:2",
        "prompt_id": "p1",
        "prompt": [{"role": "user", "content": "question p1"}],
        "completion": [{"role": "assistant", "content": "charlie three"}],
        "label": False,
        "reward": 0.49,
        "source": "generated",
    }
    assert report["desirable"] == 3 and report["undesirable"] == 1 and report["desirable_fraction"] == 0.75


def test_quantile_percentile_rank_with_ties_in_the_middle():
    """[0.5, 1.0, 0.0, 0.5], n = 4: p(0.0) = 0, p(0.5) = (2*1 + 2 - 1) / (2*3) = 1/2, p(1.0) = 1.
    q = 0.5: 1.0 desirable, 0.0 undesirable, both 0.5s dropped as middle (p = 1/2 is neither > nor <)."""
    train, _, report = run(table([0.5, 1.0, 0.0, 0.5]), **quantile(0.5))
    assert labels(train) == {"p1:1": True, "p1:2": False}
    assert report["removed"]["middle"] == 2


def test_quantile_a_tie_group_at_the_cut_is_labelled_or_dropped_whole():
    """[1, 1, 1, 0]: p(1) = (2*1 + 3 - 1) / 6 = 2/3, p(0) = 0.
    q = 0.5: 2/3 > 1/2, so all three ones are desirable (the cut at two samples does not split them);
    q = 0.25: 2/3 is not > 3/4, so all three are dropped; the zero is undesirable either way."""
    train, _, _ = run(table([1.0, 1.0, 1.0, 0.0]), **quantile(0.5))
    assert labels(train) == {"p1:0": True, "p1:1": True, "p1:2": True, "p1:3": False}
    train, _, report = run(table([1.0, 1.0, 1.0, 0.0]), **quantile(0.25))
    assert labels(train) == {"p1:3": False} and report["removed"]["middle"] == 3


def test_quantile_distinct_rewards_take_ceil_q_times_n_minus_1():
    """n = 5 distinct: p = 0, 1/4, 1/2, 3/4, 1. q = 0.5: top 2 / bottom 2, the median dropped;
    q = 0.25: p = 3/4 is not > 3/4 and p = 1/4 not < 1/4, so only the best and the worst."""
    scored = table([0.3, 0.1, 0.5, 0.2, 0.4])  # ranks: idx1 < idx3 < idx0 < idx4 < idx2
    train, _, _ = run(scored, **quantile(0.5))
    assert labels(train) == {"p1:1": False, "p1:3": False, "p1:4": True, "p1:2": True}
    train, _, report = run(scored, **quantile(0.25))
    assert labels(train) == {"p1:1": False, "p1:2": True} and report["removed"]["middle"] == 3


def test_quantile_cut_is_exact_for_decimal_q():
    """n = 11 distinct, q = 0.1: p = i/10; only i = 10 has p > 9/10 and only i = 0 has p < 1/10
    (in floats 1 - 0.1 and 9/10 are both 0.9; the rank arithmetic is exact either way)."""
    scored = [row("p1", i, float(i), text=f"answer number {i} " + "z" * i) for i in range(11)]
    train, _, report = run(scored, **quantile(0.1))
    assert labels(train) == {"p1:0": False, "p1:10": True} and report["removed"]["middle"] == 9


def test_quantile_all_tied_and_single_prompts_give_no_signal():
    scored = table([0.5, 0.5, 0.5], pid="tied") + table([0.7], pid="one") + table([1.0, 0.0], pid="ok")
    train, _, report = run(scored, **quantile(0.5))
    assert labels(train) == {"ok:0": True, "ok:1": False}
    assert report["removed"]["tied"] == 3 and report["removed"]["single"] == 1
    assert report["prompts_all_tied"] == 1
    # threshold and verifier label a tied prompt's samples: nothing is "tied" there
    _, _, report = run(scored, **threshold(0.6))
    assert report["removed"]["tied"] == 0 and report["prompts_all_tied"] == 0 and report["desirable"] == 2


def test_verifier_labels_by_the_builtin_spec_not_the_reward():
    """lowercase + at most 3 words: 'all lower here' and 'ok fine' pass; 'Upper case' fails lowercase,
    'far too many words here' fails max_words. The rewards (from some other model) do not matter."""
    texts = ["all lower here", "Upper case", "far too many words here", "ok fine"]
    scored = [
        row("p1", i, r, text=t) for i, (r, t) in enumerate(zip([0.1, 0.9, 0.8, 0.2], texts, strict=True))
    ]
    prompts = [{**prompt("p1"), "meta": json.dumps(SPEC)}]
    train, _, report = run(scored, prompts=prompts, unpaired={"label": "verifier"})
    assert labels(train) == {"p1:0": True, "p1:1": False, "p1:2": False, "p1:3": True}
    assert report["label"] == "verifier" and "quantile" not in report and "threshold" not in report


def test_verifier_refuses_prompts_without_a_spec_in_one_line():
    with pytest.raises(UnpairedError) as info:
        run(table([1.0, 0.0]), unpaired={"label": "verifier"})
    assert str(info.value) == (
        "pairs.unpaired.label 'verifier' needs built-in prompts (a constraint spec in the prompt's meta), "
        "and prompt 'p1' has none; use label threshold or quantile for your own prompts"
    )


def test_threshold_label_needs_a_threshold():
    with pytest.raises(ParamsError) as info:
        validate(PairsParams, {"unpaired": {"label": "threshold"}}, prefix="pairs")
    assert str(info.value) == (
        "params.yaml: pairs.unpaired: label 'threshold' needs pairs.unpaired.threshold (the reward at or "
        "above which a sample is desirable)"
    )
    for bad in (0.0, 0.6):
        with pytest.raises(ValueError, match="quantile"):
            UnpairedParams(quantile=bad)


# --- filters ----------------------------------------------------------------------------------------


def test_truncated_and_empty_samples_leave_before_labelling():
    """idx1 is cut by the length limit, idx2 is blank: left are 1.0 and 0.0 (q = 0.5: one and one)."""
    scored = [row("p1", 0, 1.0), row("p1", 1, 0.9, finish="length"), row("p1", 2, 0.5, text="  \n"),
              row("p1", 3, 0.0)]  # fmt: skip
    train, _, report = run(scored, **quantile(0.5))
    assert labels(train) == {"p1:0": True, "p1:3": False}
    assert report["removed"] == {
        "truncated": 1,
        "empty": 1,
        "single": 0,
        "tied": 0,
        "middle": 0,
        "min_chosen_reward": 0,
        "similarity": 0,
    }
    train, _, report = run(scored, allow_truncated=True, **quantile(0.5))
    # left: 1.0, 0.9, 0.0 -> p = 1, 1/2, 0: the truncated 0.9 is the median and dropped as middle
    assert labels(train) == {"p1:0": True, "p1:3": False} and report["removed"]["middle"] == 1


def test_near_identical_dropped_within_the_same_prompt_and_label_only():
    """t = 0.5: idx0 WORDS (1.0) kept; idx1 NEAR (1.0, ratio 0.95 to idx0, same label) dropped;
    idx2 NEAR again but 0.0: undesirable, nothing undesirable kept yet, so kept; idx3 distinct, kept.
    The same texts under another prompt are compared with that prompt's only."""
    rewards_texts = [(1.0, WORDS), (1.0, NEAR), (0.0, NEAR), (0.0, "short distinct")]
    scored = [row(pid, i, r, text=t) for pid in ("p1", "p2") for i, (r, t) in enumerate(rewards_texts)]
    train, _, report = run(scored, **threshold(0.5))
    assert labels(train) == {"p1:0": True, "p1:2": False, "p1:3": False, "p2:0": True, "p2:2": False,
                             "p2:3": False}  # fmt: skip
    assert report["removed"]["similarity"] == 2
    _, _, report = run(scored, max_similarity=0.96, **threshold(0.5))  # 0.95 < 0.96: all kept
    assert report["removed"]["similarity"] == 0 and report["examples_generated"] == 8


def test_min_chosen_reward_drops_weak_desirable_samples_only():
    """q = 0.5 on [0.3, 0.1] and [0.9, 0.2]: 0.3 and 0.9 are desirable; with a floor of 0.5 the 0.3
    leaves (its prompt keeps its undesirable 0.1), undesirable samples are never floored."""
    scored = table([0.3, 0.1]) + table([0.9, 0.2], pid="p2")
    train, _, report = run(scored, min_chosen_reward=0.5, **quantile(0.5))
    assert labels(train) == {"p1:1": False, "p2:0": True, "p2:1": False}
    assert report["removed"]["min_chosen_reward"] == 1


def test_every_sample_is_counted_once():
    scored = (
        [row("a", 0, 1.0), row("a", 1, 0.0, finish="length"), row("a", 2, 0.5, text=""), row("a", 3, 0.0)]
        + table([0.5, 0.5], pid="b")
        + [row("c", 0, 1.0, text=WORDS), row("c", 1, 1.0, text=NEAR), row("c", 2, 0.0)]
        + table([0.2, 0.4, 0.6], pid="d")
    )
    train, evals, report = run(scored, **quantile(0.5))
    # a: truncated 1, empty 1, then 1.0 / 0.0 labelled; b: 2 tied; c: ones p = 3/4 (desirable),
    # NEAR dropped as a near copy; d: p = 0, 1/2, 1 -> the 0.4 is middle
    assert report["removed"] == {
        "truncated": 1,
        "empty": 1,
        "single": 0,
        "tied": 2,
        "middle": 1,
        "min_chosen_reward": 0,
        "similarity": 1,
    }
    assert report["samples_in"] == 12 == sum(report["removed"].values()) + report["examples_generated"]
    assert len(train) + len(evals) == report["examples_generated"] == 6
    assert list(report["removed"]) == list(REMOVED)


# --- split, user rows, report ------------------------------------------------------------------------


def test_split_follows_the_pairs_and_splits_the_rest_alike():
    """Prompts with pairs keep their side; the 10 prompts without pairs: round(0.2 * 10) = 2 eval."""
    with_pairs = [f"q{i}" for i in range(20)]
    without = [f"t{i}" for i in range(10)]
    scored = [r for p in with_pairs for r in table([1.0, 0.0], pid=p)]
    scored += [r for p in without for r in table([1.0, 1.0], pid=p)]
    pair_eval = {"q3", "q7", "q11", "q19"}
    train, evals, report = run(
        scored, pair_prompts=set(with_pairs), pair_eval=pair_eval, eval_fraction=0.2, **threshold(0.5)
    )
    eval_p, train_p = {r["prompt_id"] for r in evals}, {r["prompt_id"] for r in train}
    assert not eval_p & train_p and eval_p & set(with_pairs) == pair_eval
    assert len(eval_p - set(with_pairs)) == 2 and len(train_p) == 24
    assert report["eval"]["prompts"] == 6 and report["train"]["prompts"] == 24
    _, evals2, _ = run(
        scored, pair_prompts=set(with_pairs), pair_eval=pair_eval, eval_fraction=0.2, **threshold(0.5)
    )
    assert evals2 == evals


def test_user_rows_mixed_in_unfiltered_with_their_prompt_side():
    same = {
        "example_id": "unpaired-aaa",
        "prompt": [{"role": "user", "content": "question p1"}],
        "completion": [{"role": "assistant", "content": "  "}],  # user rows skip the filters
        "label": True,
    }
    new = {
        **same,
        "example_id": "unpaired-bbb",
        "prompt": [{"role": "user", "content": "mine"}],
        "label": False,
    }
    scored = table([1.0, 0.0]) + table([1.0, 0.0], pid="p2")
    train, evals, report = run(
        scored, user=[same, new], pair_prompts={"p1", "p2"}, pair_eval={"p1"}, **threshold(0.5)
    )
    rows = {r["example_id"]: r for r in train + evals}
    assert rows["unpaired-aaa"] == {**same, "prompt_id": "p1", "reward": None, "source": "user"}
    assert rows["unpaired-aaa"] in evals  # p1 is an eval prompt of the pairs
    assert rows["unpaired-bbb"]["prompt_id"].startswith("user-") and rows["unpaired-bbb"]["label"] is False
    assert report["examples_user"] == 2 and report["eval"]["user"] == 1
    assert report["desirable"] == 3 and report["undesirable"] == 3


def test_report_exact():
    """Two prompts, q = 0.5: p1 [1.0, 0.0, 0.5] -> 1.0 desirable, 0.0 undesirable, 0.5 middle;
    p2 [0.2, 0.2] -> tied."""
    scored = table([1.0, 0.0, 0.5]) + table([0.2, 0.2], pid="p2")
    train, evals, report = run(scored)
    assert report == {
        "label": "quantile",
        "quantile": 0.5,
        "prompts_in": 2,
        "samples_in": 5,
        "removed": {"truncated": 0, "empty": 0, "single": 0, "tied": 2, "middle": 1, "min_chosen_reward": 0, "similarity": 0},
        "prompts_all_tied": 1,
        "examples_generated": 2,
        "examples_user": 0,
        "desirable": 1,
        "undesirable": 1,
        "desirable_fraction": 0.5,
        "train": {"examples": 2, "desirable": 1, "undesirable": 1, "desirable_fraction": 0.5, "prompts": 1,
                  "user": 0},
        "eval": {"examples": 0, "desirable": 0, "undesirable": 0, "desirable_fraction": None, "prompts": 0,
                 "user": 0},
        "reward_desirable_mean": 1.0,
        "reward_undesirable_mean": 0.0,
        "per_prompt": {"prompts": 2, "with_examples": 1, "both_labels": 1, "only_desirable": 0,
                       "only_undesirable": 0, "examples_mean": 1.0, "examples_min": 0, "examples_max": 2},
    }  # fmt: skip


def test_label_histogram_shares_bins_across_labels():
    rows = label_histogram([0.0, 1.0, 1.0, 0.5], [False, True, True, False])
    assert rows == [
        {"bin": 0.0, "label": "desirable", "count": 0},
        {"bin": 0.0, "label": "undesirable", "count": 1},
        {"bin": 0.5, "label": "desirable", "count": 0},
        {"bin": 0.5, "label": "undesirable", "count": 1},
        {"bin": 1.0, "label": "desirable", "count": 2},
        {"bin": 1.0, "label": "undesirable", "count": 0},
    ]
    wide = label_histogram([float(i) for i in range(40)], [i >= 30 for i in range(40)], bins=4)
    # 4 bins of width 39/4 = 9.75 from 0 (centres 4.875 + 9.75 k): 0-9, 10-19, 20-29, 30-39
    assert [(r["bin"], r["label"], r["count"]) for r in wide if r["count"]] == [
        (4.875, "undesirable", 10), (14.625, "undesirable", 10), (24.375, "undesirable", 10),
        (34.125, "desirable", 10),
    ]  # fmt: skip


# --- the stage --------------------------------------------------------------------------------------


def test_stage_writes_unpaired_files_report_and_label_plot(tmp_path):
    scored = [r for p in range(10) for r in table([1.0, 0.0, 0.5], pid=f"q{p}")]
    user = [{"example_id": "unpaired-1", "prompt": [{"role": "user", "content": "x"}],
             "completion": [{"role": "assistant", "content": "y"}], "label": True}]  # fmt: skip
    write_inputs(tmp_path, scored, user=user)
    report = run_pairs(tmp_path, PairsParams(eval_fraction=0.2), unpaired_dir=tmp_path / "unpaired")
    train = read_parquet(tmp_path / "unpaired/train.parquet", schema.UNPAIRED)
    evals = read_parquet(tmp_path / "unpaired/eval.parquet", schema.UNPAIRED)
    assert len(train) + len(evals) == 21  # 10 prompts x (1.0 desirable, 0.0 undesirable) + the user row
    pair_eval = {r["prompt_id"] for r in read_parquet(tmp_path / "pairs/eval.parquet", schema.PAIRS)}
    assert {r["prompt_id"] for r in evals if r["source"] == "generated"} == pair_eval
    assert read_json(tmp_path / "reports/pairs.json") == report
    u = report["unpaired"]
    assert u["removed"]["middle"] == 10 and u["desirable"] == 11 and u["undesirable"] == 10
    assert u["train"]["examples"] + u["eval"]["examples"] == 21
    with open(tmp_path / "reports/pairs/unpaired_labels.csv") as f:
        assert list(csv.DictReader(f)) == [
            {"bin": "0.0", "label": "desirable", "count": "0"},
            {"bin": "0.0", "label": "undesirable", "count": "10"},
            {"bin": "1.0", "label": "desirable", "count": "10"},
            {"bin": "1.0", "label": "undesirable", "count": "0"},
        ]  # the user row has no reward: not in the histogram


def test_stage_script_verifier_without_spec_fails_in_one_line_and_writes_nothing(tmp_path):
    write_inputs(tmp_path, table([1.0, 0.0]))
    (tmp_path / "params.yaml").write_text(json.dumps({"pairs": {"unpaired": {"label": "verifier"}}}))
    proc = run_stage_script(tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: pairs.unpaired.label 'verifier' needs built-in prompts (a constraint spec in the prompt's "
        "meta), and prompt 'p1' has none; use label threshold or quantile for your own prompts"
    ]
    assert not any((tmp_path / name).exists() for name in ("pairs", "unpaired", "pairs.json", "plots"))


# --- dvc ----------------------------------------------------------------------------------------------


def downstream_of(path: str, stages: dict) -> set[str]:
    """The stages of ``stages`` (dvc.yaml) that read ``path``, directly or through another's outputs."""

    def names(entries) -> list[str]:
        return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]

    def reads(dep: str, out: str) -> bool:
        return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")

    hit: set[str] = set()
    frontier = {path}
    while True:
        new = {n for n, s in stages.items() if n not in hit and any(reads(d, o) for d in names(s.get("deps"))
                                                                     for o in frontier)}  # fmt: skip
        if not new:
            return hit
        hit |= new
        for n in new:
            frontier |= {o for key in ("outs", "metrics", "plots") for o in names(stages[n].get(key))}


def test_downstream_of_follows_outputs():
    stages = {
        "a": {"deps": ["x"], "outs": ["data/a"]},
        "b": {"deps": ["data/a/train.parquet"], "metrics": [{"reports/b.json": {"cache": False}}]},
        "c": {"deps": ["reports/b.json"]},
        "d": {"deps": ["y"]},
    }
    assert downstream_of("x", stages) == {"a", "b", "c"} and downstream_of("data/a", stages) == {"b", "c"}


@pytest.mark.slow
def test_a_pairs_unpaired_change_reruns_pairs_and_the_readers_of_data_unpaired_only(tmp_path, tiny_model_dir):
    """dvc repro: changing pairs.unpaired reruns pairs and whatever reads data/unpaired, not score;
    data/pairs stays byte-identical, so the stages that read only the pairs stay cached."""
    import yaml
    from test_pipeline import REWARD_MODULE, TINY_PIPELINE
    from workspace import dvc, make_workspace, ran_stages, set_params

    ws = make_workspace(tmp_path / "ws", {"base_model": {"source": str(tiny_model_dir)}, **TINY_PIPELINE})
    (ws / "toy_reward.py").write_text(REWARD_MODULE)
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    readers = downstream_of("data/unpaired", stages)
    targets = ["pairs", *sorted(readers)]
    first = ran_stages(dvc(ws, "repro", *targets).stdout)
    assert "score" in first and "pairs" in first

    def digest(folder: str) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((ws / folder).iterdir())}

    pairs_before, unpaired_before = digest("data/pairs"), digest("data/unpaired")
    report = json.loads((ws / "reports/pairs.json").read_text())["unpaired"]
    assert report["label"] == "quantile" and report["samples_in"] == 16 * 4
    set_params(ws, {"pairs": {"unpaired": {"label": "threshold", "threshold": 2.0}}})
    again = ran_stages(dvc(ws, "repro", *targets).stdout)
    assert sorted(again) == sorted(["pairs", *readers]) and "score" not in again
    assert digest("data/pairs") == pairs_before and digest("data/unpaired") != unpaired_before
    report = json.loads((ws / "reports/pairs.json").read_text())["unpaired"]
    assert report["label"] == "threshold" and report["removed"]["middle"] == 0
    assert ran_stages(dvc(ws, "repro", *targets).stdout) == []


@pytest.mark.slow
def test_dvc_plots_show_draws_the_label_histogram(tmp_path):
    """`dvc plots show` accepts reports/pairs/unpaired_labels.csv with its template (configs/plots)."""
    import shutil

    for name in ("dvc.yaml", "params.yaml", "configs"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / name)
    scored = table([1.0, 0.0, 0.5]) + table([0.5, 0.0], pid="p2")
    write_inputs(tmp_path / "in", scored)
    run_pairs(tmp_path / "in", PairsParams(), plots_dir=tmp_path / "reports/pairs")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=tmp_path,
                          capture_output=True, text=True, check=True)  # fmt: skip
    shown = json.loads(proc.stdout)
    name = "reports/pairs/unpaired_labels.csv"
    assert not [e for e in shown.get("errors", []) if e["name"] == name]
    bars = shown["data"][name][0]["content"]
    assert bars["encoding"]["color"]["field"] == "label"
    # p1: 1.0 desirable, 0.0 undesirable (0.5 middle); p2: 0.5 desirable, 0.0 undesirable
    values = {(v["bin"], v["label"]): v["count"] for v in bars["data"]["values"]}
    assert values == {("0.0", "desirable"): "0", ("0.0", "undesirable"): "2", ("0.5", "desirable"): "1",
                      ("0.5", "undesirable"): "0", ("1.0", "desirable"): "1", ("1.0", "undesirable"): "0"}  # fmt: skip
