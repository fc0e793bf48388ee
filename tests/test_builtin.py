"""The built-in task: its verifier on hand-written answers, and the properties of its splits."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from alignpipe.data import builtin_families as fam
from alignpipe.data.builtin import EVAL_TOPICS, FAMILIES, TOPICS, TaskItem, Verdict, make_items, verify

SEEDS = range(12)


def _spec(family: str, **values: object) -> dict:
    return {"constraints": [{"family": family, **values}], "topic": "the ocean"}


VERIFIER_CASES = [
    ("lowercase", {}, "the ocean is vast and deep.", True),
    ("lowercase", {}, "  it is 12 km deep!\n", True),
    ("lowercase", {}, "The ocean is vast.", False),
    ("lowercase", {}, "the ocean covers EARTH.", False),
    ("max_words", {"n": 5}, "one two three four five", True),
    ("max_words", {"n": 5}, "  one  two\nthree\tfour five  ", True),
    ("max_words", {"n": 5}, "one two three four five six", False),
    ("include_keyword", {"keyword": "simple"}, "Keep it SIMPLE.", True),
    ("include_keyword", {"keyword": "simple"}, "Simple, and calm.", True),
    ("include_keyword", {"keyword": "simple"}, "It is simply fine.", False),
    ("include_keyword", {"keyword": "simple"}, "Nothing to see here.", False),
    ("bullets", {"n": 3}, "- a\n- b\n* c", True),
    ("bullets", {"n": 3}, "Here you go:\n  - a\n- b\n- c\nDone.", True),
    ("bullets", {"n": 3}, "- a\n- b", False),
    ("bullets", {"n": 3}, "- a\n- b\n- c\n- d", False),
    ("bullets", {"n": 3}, "1. a\n2. b\n3. c", False),
    ("arithmetic", {"a": 7, "b": 5, "answer": 12}, "12", True),
    ("arithmetic", {"a": 7, "b": 5, "answer": 12}, " 12.\n", True),
    ("arithmetic", {"a": 7, "b": 5, "answer": 12}, "The answer is 12.", False),
    ("arithmetic", {"a": 7, "b": 5, "answer": 12}, "13", False),
    ("arithmetic", {"a": 7, "b": 5, "answer": 12}, "7 + 5 = 12", False),
    ("json_keys", {"keys": ["topic", "fact"]}, '{"topic": "x", "fact": "y"}', True),
    ("json_keys", {"keys": ["topic", "fact"]}, '```json\n{"fact": 1, "topic": "x"}\n```', True),
    ("json_keys", {"keys": ["topic", "fact"]}, '{"topic": "x"}', False),
    ("json_keys", {"keys": ["topic", "fact"]}, '{"topic": "x", "fact": "y", "more": 1}', False),
    ("json_keys", {"keys": ["topic", "fact"]}, '["topic", "fact"]', False),
    ("json_keys", {"keys": ["topic", "fact"]}, "topic: x, fact: y", False),
    ("start_phrase", {"phrase": "Sure thing"}, "sure thing. The ocean is vast.", True),
    ("start_phrase", {"phrase": "Sure thing"}, "  Sure thing, here it is.", True),
    ("start_phrase", {"phrase": "Sure thing"}, "Well, sure thing.", False),
    ("start_phrase", {"phrase": "Sure thing"}, "Sure thingy.", False),
    ("end_phrase", {"phrase": "Hope this helps"}, "Rest well. hope this helps!  ", True),
    ("end_phrase", {"phrase": "Hope this helps"}, "Rest well.\nHope this helps", True),
    ("end_phrase", {"phrase": "Hope this helps"}, "Hope this helps you.", False),
    ("end_phrase", {"phrase": "Enjoy"}, "You will overenjoy.", False),
    ("no_commas", {}, "No commas here.", True),
    ("no_commas", {}, "One, two.", False),
]


@pytest.mark.parametrize(("family", "values", "response", "passes"), VERIFIER_CASES)
def test_verifier_hand_written_answers(family: str, values: dict, response: str, passes: bool) -> None:
    verdict = verify(_spec(family, **values), response)
    assert verdict == Verdict(score=float(passes), details={family: passes})


def test_verifier_cases_cover_every_family_both_ways() -> None:
    assert {(f, p) for f, _, _, p in VERIFIER_CASES} == {(f, p) for f in FAMILIES for p in (True, False)}


def test_score_is_the_fraction_of_constraints_and_repeats_get_suffixes() -> None:
    spec = {
        "constraints": [
            {"family": "no_commas"},
            {"family": "include_keyword", "keyword": "sun"},
            {"family": "include_keyword", "keyword": "moon"},
            {"family": "lowercase"},
        ],
        "topic": None,
    }
    verdict = verify(spec, "the sun rises, then sets.")
    assert verdict.details == {
        "no_commas": False,
        "include_keyword": True,
        "include_keyword_2": False,
        "lowercase": True,
    }
    assert verdict.score == 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_response_fails_every_family(family: str) -> None:
    values = {"n": 3, "keyword": "sun", "answer": 0, "keys": [], "phrase": "hi"}
    assert verify(_spec(family, **values), "  \n ").score == 0.0


@pytest.mark.parametrize("spec", [{"constraints": []}, {}, _spec("rhyme")])
def test_malformed_spec_is_rejected(spec: dict) -> None:
    with pytest.raises(ValueError):
        verify(spec, "anything")


@pytest.mark.parametrize("split", ["sft", "prompts", "eval"])
def test_items_are_deterministic_for_a_seed(split: str) -> None:
    assert make_items(split, 60, seed=3) == make_items(split, 60, seed=3)
    assert make_items(split, 60, seed=3) != make_items(split, 60, seed=4)
    assert make_items(split, 20, seed=3) == make_items(split, 60, seed=3)[:20]


@pytest.mark.parametrize("split", ["sft", "prompts", "eval"])
def test_items_ids_and_types(split: str) -> None:
    items = make_items(split, 50, seed=0)
    tag = {"sft": "sft", "prompts": "prompt", "eval": "eval"}[split]
    assert [it.id for it in items] == [f"bi-{tag}-{i:06d}" for i in range(50)]
    for it in items:
        assert isinstance(it, TaskItem)
        assert it.family == it.spec["constraints"][0]["family"]
        assert 1 <= len(it.spec["constraints"]) <= 2
        assert (it.demonstration is not None) == (split == "sft")


@pytest.mark.parametrize("split", ["sft", "prompts", "eval"])
@pytest.mark.parametrize("n", [9 * 14, 50])
def test_families_are_balanced(split: str, n: int) -> None:
    counts = Counter(it.family for it in make_items(split, n, seed=1))
    assert set(counts) == set(FAMILIES)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_some_items_have_two_constraints() -> None:
    items = make_items("prompts", 256, seed=0)
    share = sum(len(it.spec["constraints"]) == 2 for it in items) / len(items)
    assert 0.1 < share < 0.4


def test_demonstrations_satisfy_every_constraint_and_are_short() -> None:
    lengths = []
    for seed in SEEDS:
        for it in make_items("sft", 180, seed):
            assert verify(it.spec, it.demonstration).score == 1.0, (it.instruction, it.demonstration)
            lengths.append(len(it.demonstration.split()))
    assert max(lengths) <= 40
    assert sum(lengths) / len(lengths) < 20


def test_demonstrations_do_not_leak_eval_values() -> None:
    eval_words = set(fam.EVAL_KEYWORDS) | {t.name for t in EVAL_TOPICS}
    for it in make_items("sft", 400, seed=0):
        words = set(re.findall(r"[a-z]+", it.demonstration.lower()))
        assert not eval_words & words, it.demonstration


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{\w+\}", template)
    return re.compile(".+?".join(re.escape(p) for p in parts))


def test_eval_uses_held_out_templates_that_training_splits_never_use() -> None:
    training = [it for seed in SEEDS for split in ("sft", "prompts") for it in make_items(split, 90, seed)]
    evaluation = make_items("eval", 128, seed=0)
    for family in FAMILIES:
        held = [_template_regex(t) for t in fam.HELDOUT_TEMPLATES[family]]
        assert not any(rx.search(it.instruction) for it in training for rx in held), family
        primary = [it for it in evaluation if it.family == family]
        assert any(rx.search(it.instruction) for it in primary for rx in held), family
        assert any(it.spec["constraints"][0]["template"].startswith("t") for it in primary), family
    assert all(c["template"].startswith("t") for it in training for c in it.spec["constraints"])


def test_eval_instructions_do_not_overlap_training_instructions() -> None:
    for seed in SEEDS:
        training = {it.instruction for split in ("sft", "prompts") for it in make_items(split, 400, seed)}
        assert not training & {it.instruction for it in make_items("eval", 128, seed)}


def _values(items: list[TaskItem]) -> set[tuple]:
    out: set[tuple] = {("topic", it.spec["topic"]) for it in items if it.spec["topic"] is not None}
    for c in (c for it in items for c in it.spec["constraints"]):
        fields = {k: v for k, v in c.items() if k not in ("family", "template")}
        if c["family"] != "bullets" and fields:
            out.add((c["family"], json.dumps(fields, sort_keys=True)))
    return out


def test_eval_values_are_unseen_in_training() -> None:
    training = _values([it for seed in SEEDS for it in make_items("prompts", 200, seed)])
    evaluation = _values(make_items("eval", 128, seed=0))
    assert evaluation and not training & evaluation
    assert {t.name for t in TOPICS}.isdisjoint(t.name for t in EVAL_TOPICS)


def test_scores_are_fractions_in_unit_interval() -> None:
    items = make_items("sft", 90, seed=5)
    responses = [it.demonstration for it in items] + ["", "12", "- a\n- b", '{"topic": 1}']
    scores = set()
    for it in items:
        for response in responses:
            verdict = verify(it.spec, response)
            assert 0.0 <= verdict.score <= 1.0
            assert verdict.score == sum(verdict.details.values()) / len(it.spec["constraints"])
            scores.add(verdict.score)
    assert {0.0, 0.5, 1.0} <= scores


def test_spec_json_round_trip_gives_the_same_verdict() -> None:
    for split in ("sft", "prompts", "eval"):
        items = make_items(split, 60, seed=2)
        responses = [it.demonstration or "the sun. Hope this helps" for it in make_items("sft", 60, seed=2)]
        for it, response in zip(items, responses, strict=True):
            restored = json.loads(json.dumps(it.spec))
            assert restored == it.spec
            assert verify(restored, response) == verify(it.spec, response)


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="split"):
        make_items("train", 3, seed=0)  # type: ignore[arg-type]
