"""Truncation is counted and shown, and never cuts through the chat template (issue 16, item 1).

The tiny tokenizer's template is ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, then
``<|im_start|>assistant\\n``. A cut prompt must still start with its system message and the user
turn's header and end with the assistant header; only the first user turn's text may shrink.
"""

from __future__ import annotations

import json

import pytest
import torch

from alignpipe.artifacts.io import read_json
from alignpipe.artifacts.pairs import PairDataError, count_truncation, encode_pair
from alignpipe.core.chat import Truncation, encode_completion
from alignpipe.evaluate.logps import encode_answers
from alignpipe.evaluate.results import Answer
from alignpipe.ref_logps import run_ref_logps
from alignpipe.rewards.base import RewardError
from alignpipe.rewards.hf import HFReward
from alignpipe.sft.data import SftDataError, encode_rows, warn_length_costs
from alignpipe.sft.stage import summarize
from alignpipe.testing import tiny_config, tiny_tokenizer

SYSTEM = {"role": "system", "content": "Be brief."}
LONG_USER = {"role": "user", "content": "word " * 300 + "QUESTION?"}
HEADER = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


def answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def sft_row(prompt, completion: str, row_id: str = "r0") -> dict:
    return {"id": row_id, "prompt": prompt, "completion": answer(completion), "meta": None}


def pair_row(prompt, chosen: str = "yes", rejected: str = "no", pair_id: str = "p0") -> dict:
    return {"pair_id": pair_id, "prompt": prompt, "chosen": answer(chosen), "rejected": answer(rejected)}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_sft_prompt_longer_than_max_length_keeps_the_template_and_the_whole_short_answer(tok):
    """Before: the prompt kept its last max_length - 1 tokens (header gone) and the answer one token."""
    whole = encode_completion(tok, [SYSTEM, {"role": "user", "content": "hi"}], answer("ok fine"))
    data = encode_rows(tok, [sft_row([SYSTEM, LONG_USER], "ok fine")], 64)
    (example,) = data.examples
    assert len(example.input_ids) <= 64
    assert example.input_ids[example.prompt_len :] == whole.completion_ids  # every answer token trained on
    prompt = tok.decode(example.input_ids[: example.prompt_len])
    assert prompt.startswith(HEADER) and prompt.endswith("QUESTION?" + ASSISTANT)  # the text's end stays
    assert data.truncation.as_dict() == {"rows": 1, "prompt": 1, "completion": 0, "both": 0}


def test_sft_long_answer_keeps_half_the_budget(tok):
    data = encode_rows(tok, [sft_row([SYSTEM, LONG_USER], "word " * 200)], 64)
    (example,) = data.examples
    assert len(example.input_ids) <= 64 and len(example.input_ids) - example.prompt_len >= 32
    assert tok.decode(example.input_ids[: example.prompt_len]).startswith(HEADER)
    assert data.truncation.both == 1


def test_dpo_prompt_is_cut_inside_the_user_turn_to_max_prompt_length(tok):
    """Before: the prompt kept its last 32 tokens, starting inside the user text (no system, no header)."""
    pair = encode_pair(tok, pair_row([SYSTEM, LONG_USER]), 64, 32)
    for side in (pair.chosen, pair.rejected):
        text = tok.decode(side.prompt_ids)
        assert len(side.prompt_ids) <= 32 and text.startswith(HEADER) and text.endswith(ASSISTANT)
        assert side.prompt_cut and not side.completion_cut and side.completion_ids[-1] == tok.eos_token_id
    assert pair.chosen.prompt_ids == pair.rejected.prompt_ids
    roomy = encode_pair(tok, pair_row([SYSTEM, LONG_USER]), 96, 48).chosen
    kept = tok.decode(roomy.prompt_ids)[len(HEADER) : -len(ASSISTANT)]
    assert kept.startswith("word word") and kept.endswith("QUESTION?")  # cut at a word boundary


def test_earlier_turns_are_dropped_when_emptying_the_first_user_turn_is_not_enough(tok):
    prompt = [SYSTEM, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b " * 100},
              {"role": "user", "content": "last question"}]  # fmt: skip
    enc = encode_completion(tok, prompt, answer("ok"), 96, 64)
    assert tok.decode(enc.prompt_ids) == HEADER + "last question" + ASSISTANT


def test_a_header_too_long_for_the_budget_is_refused_naming_row_and_key(tok):
    long_system = [{"role": "system", "content": "rule " * 80}, {"role": "user", "content": "hi"}]
    with pytest.raises(SftDataError) as sft:
        encode_rows(tok, [sft_row(long_system, "ok", row_id="r7")], 64, where="sft.parquet")
    with pytest.raises(PairDataError) as dpo:
        encode_pair(tok, pair_row(long_system, pair_id="p3"), 64, 32, where="train.parquet")
    for info, names in ((sft, ["sft.parquet", "row 0", "'r7'", "sft.max_length=64"]),
                        (dpo, ["train.parquet", "pair p3", "dpo.max_prompt_length=32"])):  # fmt: skip
        message = str(info.value)
        assert "\n" not in message and "nothing of the completion" in message
        assert all(name in message for name in names), message


def test_counts_per_reason_over_rows_and_pairs(tok):
    rows = [
        sft_row([{"role": "user", "content": "hi"}], "ok", "fits"),
        sft_row([LONG_USER], "ok", "prompt"),
        sft_row([{"role": "user", "content": "hi"}], "word " * 200, "completion"),
        sft_row([LONG_USER], "word " * 200, "both"),
    ]
    assert encode_rows(tok, rows, 64).truncation.as_dict() == {
        "rows": 4,
        "prompt": 1,
        "completion": 1,
        "both": 1,
    }
    pairs = [encode_pair(tok, pair_row([{"role": "user", "content": "hi"}]), 64, 32),
             encode_pair(tok, pair_row([LONG_USER]), 64, 32),
             encode_pair(tok, pair_row([{"role": "user", "content": "hi"}], rejected="word " * 200), 64, 32),
             encode_pair(tok, pair_row([LONG_USER], chosen="word " * 200), 64, 32)]  # fmt: skip
    assert count_truncation(pairs).as_dict() == {"rows": 4, "prompt": 1, "completion": 1, "both": 1}


def test_warning_is_one_line_above_five_percent_naming_counts_and_key(capsys):
    counts = Truncation()
    for i in range(20):
        counts.count(prompt_cut=i == 0, completion_cut=False)
    assert counts.warn("dpo", "pairs", "dpo.max_length") is None  # 1 of 20 = 5%: quiet
    counts.count(prompt_cut=True, completion_cut=True)
    line = counts.warn("dpo", "pairs", "dpo.max_length")
    err = capsys.readouterr().err
    assert err == line + "\n" and err.count("\n") == 1
    assert "2 of 21 pairs truncated" in line and "prompt 1, completion 0, both 1" in line
    assert "raise dpo.max_length" in line


def test_evaluate_counts_cut_answers_and_drops_eos_of_length_finished_ones(tok):
    counts = Truncation()
    answers = [Answer("a", 0, "fine", 2, "length"), Answer("b", 0, "word " * 200, 200, "length")]
    seqs = encode_answers(tok, [[LONG_USER], [{"role": "user", "content": "hi"}]], answers, 64, 32, counts)
    assert counts.as_dict() == {"rows": 2, "prompt": 1, "completion": 1, "both": 0}
    assert seqs[0].completion_ids[-1] != tok.eos_token_id  # cut by max_new_tokens: no EOS was sampled
    assert tok.decode(seqs[0].prompt_ids).startswith("<|im_start|>user\n")


def test_ref_logps_writes_its_truncation_counts_and_warns(tmp_path, tiny_model_dir, capsys):
    from alignpipe.artifacts import schema
    from alignpipe.artifacts.io import write_parquet
    from alignpipe.params import RefLogpsParams

    pairs_dir = tmp_path / "pairs"
    rows = [{**pair_row([LONG_USER if i % 2 else {"role": "user", "content": "hi"}], pair_id=f"p{i}"),
             "chosen_reward": 1.0, "rejected_reward": 0.0, "margin": 1.0, "source": "generated"}
            for i in range(4)]  # fmt: skip
    write_parquet(rows, pairs_dir / "train.parquet", schema.PAIRS)
    out, metrics = tmp_path / "ref.parquet", tmp_path / "ref_logps.json"
    run_ref_logps(tiny_model_dir, pairs_dir, out, RefLogpsParams(dtype="float32"), 64, 32, metrics)
    assert read_json(metrics)["truncation"] == {"rows": 4, "prompt": 2, "completion": 0, "both": 0}
    assert "warning: ref_logps: 2 of 4 pairs truncated" in capsys.readouterr().err


def test_sft_summary_keeps_its_truncation_counts(tok):
    data = encode_rows(
        tok, [sft_row([LONG_USER], "ok"), sft_row([{"role": "user", "content": "hi"}], "ok")], 64
    )
    state = type("State", (), {"log_history": [{"loss": 1.0, "step": 1}], "global_step": 1, "epoch": 1.0,
                               "num_input_tokens_seen": 10})()  # fmt: skip
    summary = summarize(state, data, 1.0, 1.0, 0, None)
    assert summary["truncation"] == {"rows": 2, "prompt": 1, "completion": 0, "both": 0}
    assert summary["truncated"] == 1


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("rm") / "rm"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForSequenceClassification(
        tiny_config(len(tok), num_labels=1, pad_token_id=tok.pad_token_id)
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def room_for_question(reward_dir, completion: str) -> int:
    """A max_length that holds the system prompt, "QUESTION?" and ``completion``, with 2 tokens to spare."""
    rm = HFReward(str(reward_dir), device=torch.device("cpu"))
    ids, _ = rm.encode([SYSTEM, {"role": "user", "content": "QUESTION?"}], completion)
    return len(ids) + 2


def test_reward_model_cuts_inside_the_text_keeps_its_template_or_refuses(reward_dir):
    """Before: the conversation kept its BOS and its last max_length - 1 tokens (system and headers gone)."""
    limit = room_for_question(reward_dir, "The ocean is deep.")
    rm = HFReward(str(reward_dir), max_length=limit, device=torch.device("cpu"))
    ids, part = rm.encode([SYSTEM, LONG_USER], "The ocean is deep.")
    text = rm.tokenizer.decode(ids)
    assert part == "prompt" and len(ids) <= limit
    assert text.startswith(HEADER) and text.endswith(
        "QUESTION?" + ASSISTANT + "The ocean is deep.<|im_end|>\n"
    )
    ids, part = rm.encode([SYSTEM, LONG_USER], "word " * 100)
    text = rm.tokenizer.decode(ids)
    assert part == "both" and len(ids) <= limit
    assert text.startswith(HEADER + ASSISTANT + "word word") and text.endswith("<|im_end|>\n")
    long_system = [{"role": "system", "content": "rule " * 80}, {"role": "user", "content": "hi"}]
    with pytest.raises(RewardError) as info:
        rm.score([[SYSTEM, LONG_USER], long_system], ["ok", "ok"], [None, None])
    assert info.value.index == 1 and "nothing of the completion" in str(info.value)
    assert f"reward.max_length={limit}" in str(info.value)


def test_reward_details_say_what_was_cut(reward_dir):
    from alignpipe.score import score_metrics

    rm = HFReward(str(reward_dir), max_length=room_for_question(reward_dir, "ok"), device=torch.device("cpu"))
    results = rm.score(
        [[SYSTEM, LONG_USER], [SYSTEM, LONG_USER], [SYSTEM]], ["ok", "word " * 100, "ok"], [None] * 3
    )
    assert [r.details.get("truncated_part") for r in results] == ["prompt", "both", None]
    metrics = score_metrics("hf", [{"prompt_id": str(i)} for i in range(3)], results)
    assert metrics["truncation"] == {"rows": 3, "prompt": 1, "completion": 0, "both": 1}
    json.dumps(metrics)  # the metrics file takes it


def test_sft_warns_when_many_rows_are_cut_or_dropped(tok, capsys):
    rows = [sft_row([{"role": "user", "content": "hi"}], "ok", f"r{i}") for i in range(9)]
    rows.append(sft_row([LONG_USER], "ok", "long"))
    assert warn_length_costs(encode_rows(tok, rows, 64), 64) == [
        "warning: sft: 1 of 10 rows truncated (10%: prompt 1, completion 0, both 0); raise sft.max_length to keep them whole"
    ]
    dropped = warn_length_costs(encode_rows(tok, rows, 64, truncation="drop"), 64)
    assert dropped == [
        "warning: sft: 1 of 10 rows dropped as longer than sft.max_length=64 (sft.truncation: drop); "
        "raise sft.max_length to keep them"
    ]
    assert warn_length_costs(encode_rows(tok, rows[:9], 64), 64) == []
    assert capsys.readouterr().err.count("warning: sft:") == 2
