"""ShareGPT (axolotl, LLaMA-Factory) and LLaMA-Factory v1 rows, from hand-written fixtures.

The fixtures follow LLaMA-Factory's data/README.md (sharegpt SFT and preference layouts, the
``system`` column, ``function_call``/``observation`` roles, ``images``) and its v1 data docs
(``messages``/``chosen_messages`` with ``{"type": "text", "value": ...}`` parts and ``loss_weight``).
Every expected row below is written out by hand.
"""

from __future__ import annotations

import pytest
from formats_helpers import asst, first_error, fixture, jsonl, read, system, user

SFT = fixture("sharegpt_sft.jsonl")
PREF = fixture("sharegpt_pref.json")
TOKYO_1 = "Wie spät ist es in Tokio, wenn es in Berlin 12:00 ist?"
TOKYO_2 = "Und wie schreibt man Tokio auf Japanisch?"
TERSE = system("You are a terse assistant.")


def test_sharegpt_sft_every_gpt_turn_is_a_row_and_bad_rows_are_counted() -> None:
    rows, dropped, fmt = read(SFT, "sft")
    assert fmt == "sharegpt"
    assert rows == [
        {"prompt": [TERSE, user(TOKYO_1)], "completion": [asst("20:00 — Tokio ist UTC+9, Berlin UTC+1.")]},
        {
            "prompt": [TERSE, user(TOKYO_1), asst("20:00 — Tokio ist UTC+9, Berlin UTC+1."), user(TOKYO_2)],
            "completion": [asst("東京 (Tōkyō)")],
        },
        # the system column becomes the first message
        {
            "prompt": [system("Answer with one number."), user("Name a prime number.")],
            "completion": [asst("7")],
        },
        # user/assistant role names are read too; an empty system column adds nothing
        {"prompt": [user("Capital of Peru?")], "completion": [asst("Lima.")]},
    ]
    # line 3 empty reply, line 4 an image, line 5 tool calls, line 6 two human turns in a row
    assert dropped == {"empty_completion": 1, "non_text_content": 1, "unsupported_role": 1, "bad_order": 1}


def test_sharegpt_prompts_drop_the_final_answer() -> None:
    rows, dropped, _ = read(SFT, "prompts")
    assert rows == [
        {"prompt": [TERSE, user(TOKYO_1), asst("20:00 — Tokio ist UTC+9, Berlin UTC+1."), user(TOKYO_2)]},
        {"prompt": [system("Answer with one number."), user("Name a prime number.")]},
        {"prompt": [user("Capital of Peru?")]},
    ]
    assert sum(dropped.values()) == 4


def test_sharegpt_sft_first_bad_row_message() -> None:
    assert first_error(SFT, "sft") == f"{SFT}: line 3: field 'conversations': turn 1: empty gpt reply"


def test_sharegpt_preferences_from_turn_objects_and_turn_lists() -> None:
    rows, dropped, fmt = read(PREF, "preferences")
    assert fmt == "sharegpt"
    assert rows == [
        {
            "prompt": [
                system("You are a translator."),
                user("Translate 'cat' to French."),
                asst("chat"),
                user("And to Japanese?"),
            ],
            "chosen": [asst("猫 (neko)")],
            "rejected": [asst("I do not speak Japanese.")],
        },
        {"prompt": [user("What is 2 + 2?")], "chosen": [asst("4")], "rejected": [asst("5")]},
    ]
    assert dropped == {"empty_completion": 1, "bad_role": 1, "bad_prompt": 1}
    assert first_error(PREF, "preferences") == f"{PREF}: row 2 (0-based): field 'chosen': empty completion"


def test_sharegpt_preference_rows_as_sft_train_on_chosen() -> None:
    rows, dropped, _ = read(PREF, "sft")
    assert [r["completion"] for r in rows] == [[asst("猫 (neko)")], [asst("4")]]
    assert dropped == {"empty_completion": 1, "bad_role": 1, "bad_prompt": 1}


BAD = [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{}]"},
     "field 'tools': tool descriptions are not supported (alignpipe trains plain chat)"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bing", "value": "a"}]},
     "field 'conversations': turn 1: unknown role 'bing'; expected one of system, human, user, prompter, gpt, "
     "assistant"),
    ({"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}]},
     "field 'conversations': turn 0: content must be a string, got int"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
     "field 'conversations': turn 0: expected {'from', 'value'}, got keys ['from']"),
    ({"conversations": "human: hi"}, "field 'conversations': expected a list of turns, got string"),
    ({"conversations": [{"from": "gpt", "value": "a"}]},
     "field 'conversations': turn 0: expected a human turn, got gpt (after an optional system turn, turns "
     "alternate human, gpt)"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": 3},
     "field 'system': expected a string, got int"),
]  # fmt: skip


@pytest.mark.parametrize(("record", "message"), BAD)
def test_sharegpt_bad_rows_say_file_line_field(tmp_path, record: dict, message: str) -> None:
    source = jsonl(tmp_path / "chat.jsonl", [record])
    assert first_error(source, "sft", format="sharegpt") == f"{source}: line 1: {message}"


# --- LLaMA-Factory v1 ----------------------------------------------------------------------------

LF_SFT = fixture("llamafactory_sft.jsonl")
LF_PREF = fixture("llamafactory_pref.jsonl")


def test_llamafactory_sft_rows_follow_loss_weight() -> None:
    rows, dropped, fmt = read(LF_SFT, "sft")
    assert fmt == "llamafactory"
    helpful, hello = system("You are a helpful assistant."), user("Hello, who are you?")
    assert rows == [
        {"prompt": [helpful, hello], "completion": [asst("I am an AI assistant.")]},
        {
            "prompt": [helpful, hello, asst("I am an AI assistant."), user("¿Hablas español?")],
            "completion": [asst("Sí, un poco.")],
        },
        # loss_weight 0 on the first answer: context only; two text parts joined as they are
        {
            "prompt": [user("hi"), asst("Hello! I am {{name}}."), user("Tell me about Kyoto.")],
            "completion": [asst("Kyoto was Japan's capital for over a thousand years.")],
        },
        # no loss_weight: assistant turns learn (LLaMA-Factory's default)
        {"prompt": [user("Default weights?")], "completion": [asst("Assistant turns learn, others do not.")]},
    ]
    assert dropped == {"non_text_content": 1, "empty_completion": 1, "bad_loss_weight": 1}


def test_llamafactory_sft_bad_row_messages(tmp_path) -> None:
    assert first_error(LF_SFT, "sft") == (
        f"{LF_SFT}: line 3: field 'messages': message 0: content part 1 has type 'image_url'; "
        "only text parts are supported"
    )
    half = jsonl(tmp_path / "half.jsonl", [{"messages": [user("q"), {**asst("a"), "loss_weight": 0.5}]}])
    assert first_error(half, "sft") == (
        f"{half}: line 1: field 'messages': message 1: loss_weight 0.5 is not supported; alignpipe trains a "
        "turn fully (1) or not at all (0)"
    )
    on_user = jsonl(tmp_path / "u.jsonl", [{"messages": [{**user("q"), "loss_weight": 1}, asst("a")]}])
    assert first_error(on_user, "sft", format="llamafactory") == (
        f"{on_user}: line 1: field 'messages': message 0: loss_weight 1 on a user turn; alignpipe trains "
        "assistant turns only"
    )


def test_llamafactory_preferences_share_the_prompt() -> None:
    rows, dropped, fmt = read(LF_PREF, "preferences")
    assert fmt == "llamafactory"
    sky = [system("Answer in one word."), user("用户提问：天空是什么颜色？")]
    numbers = [user("Pick a number."), asst("7"), user("Another?")]
    assert rows == [
        {
            "prompt": sky,
            "chosen": [asst("蓝色")],
            "rejected": [asst("天空通常是蓝色的，但日落时会变成橙色。")],
        },
        {"prompt": numbers, "chosen": [asst("11")], "rejected": [asst("seven again")]},
    ]
    assert dropped == {"identical": 1, "non_text_content": 1}
    assert first_error(LF_PREF, "preferences") == (
        f"{LF_PREF}: line 3: field 'rejected_messages': chosen and rejected are identical"
    )


def test_llamafactory_preference_rows_as_prompts_and_sft() -> None:
    prompts, _, _ = read(LF_PREF, "prompts")
    assert prompts[:2] == [
        {"prompt": [system("Answer in one word."), user("用户提问：天空是什么颜色？")]},
        {"prompt": [user("Pick a number."), asst("7"), user("Another?")]},
    ]
    sft, _, _ = read(LF_PREF, "sft")
    assert [r["completion"] for r in sft] == [[asst("蓝色")], [asst("11")], [asst("Yes.")]]
