"""Rated multi-completion sets (raw UltraFeedback, HelpSteer2), from hand-written fixtures.

``ultrafeedback.jsonl`` follows openbmb/UltraFeedback's raw rows: ``instruction``,
``completions`` with ``model``, ``response``, ``annotations`` (Rating strings, ``N/A``, one
aspect given as a list), ``overall_score``. Line 1 has four completions scored 9.0, 7.5, 4.0 and
an empty one; line 2 (Chinese) two completions tied at 6.5; line 3 a Rating of "five".
``helpsteer2.jsonl`` follows nvidia/HelpSteer2: one response a row, consecutive rows share a
prompt, a multi-turn prompt with ``<extra_id_1>`` markers, an empty response, a bad score.
"""

from __future__ import annotations

import pytest
from formats_helpers import asst, first_error, fixture, read, user

from alignpipe.data.convert import FormatOptions, ScoredCompletion, scored_completions
from alignpipe.data.errors import DataError
from alignpipe.data.formats.pairing import pick_pairs

UF = fixture("ultrafeedback.jsonl")
HS = fixture("helpsteer2.jsonl")
PHOTO = [user("Explain photosynthesis in one sentence.")]
GPT4 = asst("Plants use sunlight to turn water and CO₂ into glucose and oxygen.")
LLAMA = asst("Photosynthesis is how plants make food from light, I believe, using chlorophyll.")
FALCON = asst("Photosynthesis happens in animals' lungs.")
HAIKU = [user("写一首关于秋天的俳句。")]


def test_ultrafeedback_best_vs_worst_by_overall_score() -> None:
    rows, dropped, fmt = read(UF, "preferences")
    assert fmt == "ultrafeedback"
    assert rows == [{"prompt": PHOTO, "chosen": [GPT4], "rejected": [FALCON]}]  # 9.0 vs 4.0
    assert dropped == {"empty_completion": 1, "tie": 1, "wrong_type": 1}


def test_ultrafeedback_all_pairs_and_sft() -> None:
    rows, _, _ = read(UF, "preferences", pairs="all_pairs")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ([GPT4], [LLAMA]),
        ([GPT4], [FALCON]),
        ([LLAMA], [FALCON]),
    ]
    sft, _, _ = read(UF, "sft")
    assert sft == [
        {"prompt": PHOTO, "completion": [GPT4]},
        {"prompt": HAIKU, "completion": [asst("秋风起 / 落叶轻舞 / 月色凉")]},  # the tie: the first
    ]
    prompts, _, _ = read(UF, "prompts")
    assert prompts == [{"prompt": PHOTO}, {"prompt": HAIKU}]


def test_ultrafeedback_named_aspect_and_mean() -> None:
    # honesty: 5, 4 (a list of one annotation), N/A (unrated)
    rows, dropped, _ = read(UF, "preferences", rating="honesty")
    assert rows == [{"prompt": PHOTO, "chosen": [GPT4], "rejected": [LLAMA]}]
    assert dropped["unrated"] == 1 and dropped["tie"] == 1  # the haiku answers: honesty 5 and 5
    # helpfulness breaks the haiku tie: 4 > 3
    rows, _, _ = read(UF, "preferences", rating="helpfulness")
    assert rows[1] == {
        "prompt": HAIKU,
        "chosen": [asst("秋风起 / 落叶轻舞 / 月色凉")],
        "rejected": [asst("Autumn leaves fall down.")],
    }


def test_ultrafeedback_bad_row_message() -> None:
    assert first_error(UF, "sft") == (
        f"{UF}: line 3: field 'completions[1].annotations.helpfulness.Rating': expected a number or 'N/A', "
        "got 'five'"
    )


def test_scored_completions_give_every_rated_completion_its_reward() -> None:
    items, dropped, fmt = scored_completions(UF, on_invalid="drop")
    assert fmt == "ultrafeedback"
    assert [(i.completion, i.reward) for i in items] == [
        (GPT4["content"], 9.0),
        (LLAMA["content"], 7.5),
        (FALCON["content"], 4.0),
        ("秋风起 / 落叶轻舞 / 月色凉", 6.5),
        ("Autumn leaves fall down.", 6.5),
    ]
    assert items[1] == ScoredCompletion(
        prompt=PHOTO,
        completion=LLAMA["content"],
        reward=7.5,
        details={
            "model": "llama-2-7b-chat",
            "scores": {
                "helpfulness": 4.0,
                "honesty": 4.0,
                "instruction_following": 3.0,
                "truthfulness": 5.0,
                "overall": 7.5,
            },
        },
    )
    assert dict(dropped) == {"empty_completion": 1, "wrong_type": 1}
    means, _, _ = scored_completions(UF, FormatOptions(rating="mean"), on_invalid="drop")
    assert [round(i.reward, 4) for i in means[:3]] == [5.0, 4.0, round(7 / 3, 4)]  # N/A left out of the mean


def test_helpsteer_groups_rows_by_prompt_and_splits_turns() -> None:
    rows, dropped, fmt = read(HS, "preferences")
    assert fmt == "helpsteer"
    high_level = "C# is a high-level, object-oriented programming language developed by Microsoft as part of its .NET initiative."
    assert rows == [
        {"prompt": [user("c#")], "chosen": [asst(high_level)], "rejected": [asst("C# is a musical note.")]}
    ]
    assert dropped == {"tie": 1, "empty_completion": 1, "wrong_type": 1}  # helpfulness 4 = 4
    times = [user("What is 2+2?"), asst("4"), user("And times 3?")]
    rows, _, _ = read(HS, "preferences", rating="mean")  # 3.0 > 2.8
    assert rows[1] == {"prompt": times, "chosen": [asst("(2+2)×3 = 12.")], "rejected": [asst("12")]}
    sft, dropped, _ = read(HS, "sft")
    assert dropped == {"empty_completion": 1, "no_rated_completion": 1, "wrong_type": 1}  # the Greek prompt
    assert sft == [
        {"prompt": [user("c#")], "completion": [asst(high_level)]},
        {"prompt": times, "completion": [asst("12")]},
    ]
    prompts, _, _ = read(HS, "prompts")
    assert prompts == [
        {"prompt": [user("c#")]},
        {"prompt": times},
        {"prompt": [user("Ελάτε, πες μου ένα ανέκδοτο.")]},
    ]
    assert (
        first_error(HS, "sft") == f"{HS}: line 6: field 'helpfulness': expected a number or 'N/A', got 'high'"
    )


def test_a_rating_the_set_does_not_have_is_refused() -> None:
    with pytest.raises(DataError) as info:
        read(HS, "sft", rating="overall")
    assert str(info.value) == (
        f"{HS}: rating 'overall' is not a score of helpsteer rows; use one of auto, mean, helpfulness, "
        "correctness, coherence, complexity, verbosity"
    )


@pytest.mark.parametrize(
    ("scores", "strategy", "pairs", "ties"),
    [
        ([3, 1, 2], "best_vs_worst", [("a", "b")], 0),
        ([2, 2], "best_vs_worst", [], 1),
        ([2, 1, 1], "best_vs_worst", [("a", "c")], 0),  # the last of the worst
        ([1, 3, 3], "all_pairs", [("b", "a"), ("c", "a")], 1),
        ([5], "all_pairs", [], 0),
    ],
)
def test_pick_pairs(scores: list[float], strategy: str, pairs: list, ties: int) -> None:
    items = list(zip(scores, "abc", strict=False))
    assert pick_pairs(items, strategy) == (pairs, ties)  # type: ignore[arg-type]


def test_scored_completions_refuse_a_source_without_ratings() -> None:
    with pytest.raises(DataError) as info:
        scored_completions(fixture("sharegpt_sft.jsonl"))
    assert str(info.value) == (
        f"{fixture('sharegpt_sft.jsonl')}: format 'sharegpt' has no ratings (expected ultrafeedback or helpsteer)"
    )
