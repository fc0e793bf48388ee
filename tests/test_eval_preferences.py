"""evaluate.preferences: a held-out HH-format preference split through prepare, pairs, the ref_logps
cache and evaluate, its three figures checked against values worked out from direct log-probs.

``hh_test.jsonl`` is written by hand in Anthropic HH-RLHF's text format (``"\\n\\nHuman: ...
\\n\\nAssistant: ..."`` for chosen and rejected, the dialogue before the last reply shared):
a single turn, a multi-turn dialogue, Japanese text and a refusal preferred to a harmful answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_evaluate import direct_logp

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet, write_parquet
from alignpipe.evaluate.preferences import markdown, policy_figures, preference_split, sft_figures
from alignpipe.evaluate.stage import run_evaluate
from alignpipe.pairs.stage import pairs
from alignpipe.params import (
    DataParams,
    DpoParams,
    EvaluateParams,
    PairsParams,
    RefLogpsParams,
    RewardParams,
    SourceParams,
)
from alignpipe.prepare import prepare
from alignpipe.ref_logps import run_ref_logps
from alignpipe.testing import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT / "tests" / "fixtures" / "formats" / "hh_test.jsonl"
DPO = DpoParams(max_length=384, max_prompt_length=256, beta=0.5)  # nothing is cut here
HAIKU_PROMPT = [
    {"role": "user", "content": "Can you help me write a haiku?"},
    {"role": "assistant", "content": "Sure! What should it be about?"},
    {"role": "user", "content": "The sea."},
]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Models, the prepared data with the HH split, pairs (test.parquet) and the reference cache."""
    root = tmp_path_factory.mktemp("split")
    sft, dpo = save_tiny_model(root / "sft", seed=0), save_tiny_model(root / "dpo", seed=1)
    data = DataParams(builtin={"n_sft": 4, "n_prompts": 4, "n_eval": 2})
    metrics = prepare(data, root / "prepared", root / "prepare.json", SourceParams(source=str(HH)))
    assert metrics["eval_preferences"] == {"source": str(HH), "format": "hh", "rows": 4, "dropped": {}}
    prompts = read_parquet(root / "prepared" / "prompts.parquet", schema.PROMPTS)
    scored = [
        {"prompt_id": p["prompt_id"], "sample_idx": i, "completion": f"answer {i} to prompt {k}", "n_tokens": 5,
         "finish_reason": "stop", "logprob": None, "backend": "hf", "seed": 0, "reward": float(i),
         "reward_details": "{}"}
        for k, p in enumerate(prompts) for i in (0, 1)
    ]  # fmt: skip
    write_parquet(scored, root / "scored.parquet", schema.SCORED)
    report = pairs(root / "scored.parquet", root / "prepared" / "prompts.parquet", root / "prepared",
                   root / "pairs", root / "pairs.json", root / "plots", PairsParams(eval_fraction=0.25))  # fmt: skip
    assert report["pairs_test"] == 4 and report["pairs_train"] + report["pairs_eval"] == 4
    run_ref_logps(sft, root / "pairs", root / "ref_logps.parquet", RefLogpsParams(dtype="float32"),
                  DPO.max_length, DPO.max_prompt_length)  # fmt: skip
    return root, sft, dpo


def test_the_hh_split_is_read_as_pairs_and_kept_out_of_training(split):
    root, _, _ = split
    test = read_parquet(root / "pairs" / "test.parquet", schema.PAIRS)
    assert len(test) == 4 and {r["source"] for r in test} == {"user"}
    assert test[0]["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert test[0]["chosen"] == [{"role": "assistant", "content": "The capital of France is Paris."}]
    assert test[1]["prompt"] == HAIKU_PROMPT  # multi-turn: the dialogue before the last reply
    assert test[1]["rejected"] == [{"role": "assistant", "content": "The sea is big and wet."}]
    assert test[2]["chosen"][0]["content"] == "You say ありがとう (arigatō)."
    train = read_parquet(root / "pairs" / "train.parquet", schema.PAIRS)
    evals = read_parquet(root / "pairs" / "eval.parquet", schema.PAIRS)
    assert not {r["pair_id"] for r in test} & {r["pair_id"] for r in train + evals}
    cached = {r["pair_id"] for r in read_parquet(root / "ref_logps.parquet", schema.REF_LOGPS)}
    assert {r["pair_id"] for r in test + train + evals} == cached  # ref_logps covers the split too


def hand_figures(root: Path, sft: Path, dpo: Path) -> tuple[dict, dict]:
    """The figures of SFT and DPO from log-probs of a full forward each (test_evaluate.direct_logp)."""
    rows = read_parquet(root / "pairs" / "test.parquet", schema.PAIRS)
    s_c, s_r, d_c, d_r = ([direct_logp(m, r["prompt"], r[side][0]["content"], True) for r in rows]
                          for m, side in ((sft, "chosen"), (sft, "rejected"), (dpo, "chosen"), (dpo, "rejected")))  # fmt: skip
    n, beta = len(rows), DPO.beta
    margins = [beta * ((dc - sc) - (dr - sr)) for sc, sr, dc, dr in zip(s_c, s_r, d_c, d_r, strict=True)]
    assert all(abs(m) > 1e-3 for m in margins), "a margin this close to 0 would make the check weak"
    want_dpo = {
        "preference_accuracy": sum(m > 0 for m in margins) / n,
        "reward_margin": sum(margins) / n,
        "chosen_up_rejected_down": sum(
            dc > sc and dr < sr for sc, sr, dc, dr in zip(s_c, s_r, d_c, d_r, strict=True)
        )
        / n,
        "logp_accuracy": sum(c > r for c, r in zip(d_c, d_r, strict=True)) / n,
    }
    own = sum(c > r for c, r in zip(s_c, s_r, strict=True)) / n
    want_sft = {"preference_accuracy": own, "reward_margin": 0.0, "chosen_up_rejected_down": 0.0,
                "logp_accuracy": own}  # fmt: skip
    return want_sft, want_dpo


def test_evaluate_reports_the_three_figures_on_the_hh_split(split):
    root, sft, dpo = split
    params = EvaluateParams(backend="hf", max_new_tokens=4, max_prompts=1, dtype="float32", n_examples=0,
                            preferences=SourceParams(source=str(HH)))  # fmt: skip
    metrics = run_evaluate({"sft": sft, "dpo": dpo, "base": sft}, root / "prepared" / "eval_prompts.parquet",
                           root / "pairs" / "eval.parquet", root / "ref_logps.parquet", root / "reports", params,
                           RewardParams(), DPO, preferences=root / "pairs" / "test.parquet")  # fmt: skip
    got = metrics["preferences"]
    assert got["pairs"] == 4 and got["source"] == str(HH) and got["beta"] == 0.5
    want_sft, want_dpo = hand_figures(root, sft, dpo)
    assert got["sft"] == pytest.approx(want_sft, abs=1e-4)
    assert got["dpo"] == pytest.approx(want_dpo, abs=1e-4)
    saved = json.loads((root / "reports" / "eval.json").read_text())
    assert saved["preferences"] == got
    md = (root / "reports" / "eval.md").read_text()
    assert f"## Preference split (4 pairs of `{HH}`)" in md
    acc = f"| preference accuracy (β margin > 0) | {want_sft['preference_accuracy']:.3f} | "
    assert acc + f"{want_dpo['preference_accuracy']:.3f} |" in md


def test_a_policy_equal_to_its_reference_moves_nothing(split):
    """DPO = SFT: margins are fp32 noise (ties, misses), nothing goes up or down, logp accuracy as SFT's."""
    root, sft, _ = split
    params = EvaluateParams(dtype="float32", preferences=SourceParams(source=str(HH)))
    got = preference_split(sft, root / "pairs" / "test.parquet", root / "ref_logps.parquet", params, DPO)
    assert got is not None
    assert got["dpo"]["preference_accuracy"] == 0.0 and got["dpo"]["chosen_up_rejected_down"] == 0.0
    assert abs(got["dpo"]["reward_margin"]) < 1e-5
    assert got["dpo"]["logp_accuracy"] == got["sft"]["logp_accuracy"] == got["sft"]["preference_accuracy"]


def test_figures_on_hand_built_log_probs():
    import torch

    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # log-ratios (c, r): (+1, -1) up/down, margin 2; (+2, +1) both up, margin 1; (-1, 0) margin -1
    got = policy_figures(t(-9, -8, -12), t(-11, -9, -10), t(-10, -10, -11), t(-10, -10, -10), beta=0.1)
    assert got == pytest.approx({"preference_accuracy": 2 / 3, "reward_margin": 0.1 * (2 + 1 - 1) / 3,
                                 "chosen_up_rejected_down": 1 / 3, "logp_accuracy": 2 / 3})  # fmt: skip
    assert sft_figures(t(-10, -10, -11), t(-10, -12, -10)) == {
        "preference_accuracy": 1 / 3, "reward_margin": 0.0, "chosen_up_rejected_down": 0.0, "logp_accuracy": 1 / 3
    }  # fmt: skip  # a tie (-10 vs -10) is not a preference
    assert set(sft_figures(t(0, 0), t(0, 0)).values()) == {None}  # dpo.reference_free: no SFT log-probs
    assert markdown(None) == []


def test_an_eval_split_sharing_prompts_with_training_is_refused(tmp_path):
    from alignpipe.data.errors import DataError

    row = {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "Hi!"}],
           "rejected": [{"role": "assistant", "content": "No."}]}  # fmt: skip
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
    data = DataParams(builtin={"n_sft": 2, "n_prompts": 2, "n_eval": 2},
                      preferences=SourceParams(source=str(tmp_path / "p.jsonl")))  # fmt: skip
    with pytest.raises(
        DataError, match=r"1 evaluate.preferences prompt\(s\) also appear in data.preferences"
    ):
        prepare(data, tmp_path / "out", tmp_path / "m.json", SourceParams(source=str(tmp_path / "p.jsonl")))
