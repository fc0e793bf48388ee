"""Rewards (builtin, python, hf on a tiny in-process reward model) and the score stage."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from transformers import LlamaForSequenceClassification

from alignpipe.artifacts import schema
from alignpipe.artifacts.generations import MANIFEST, write_chunk
from alignpipe.artifacts.io import read_json, read_parquet, write_json, write_parquet
from alignpipe.core.models import ModelFolderError
from alignpipe.params import RewardParams
from alignpipe.rewards.base import RewardError, RewardResult, score_completions
from alignpipe.rewards.hf import HFReward, pooling_pad_id
from alignpipe.rewards.load import get_reward
from alignpipe.score import score, score_metrics
from alignpipe.testing import tiny_config, tiny_tokenizer

USER = [{"role": "user", "content": "Describe the ocean."}]
# A template that is not ChatML, and ends on <|im_end|> (the pad id of the tiny tokenizer).
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}<|im_end|>{% endfor %}"


def save_reward_model(path, template=None, num_labels=1, seed=0):
    tok = tiny_tokenizer()
    if template:
        tok.chat_template = template
    torch.manual_seed(seed)
    # initializer_range 0.2 spreads the scores, so reading the wrong token shows.
    cfg = tiny_config(len(tok), num_labels=num_labels, pad_token_id=tok.pad_token_id, initializer_range=0.2)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return save_reward_model(tmp_path_factory.mktemp("rm") / "chatml")


@pytest.fixture(scope="module")
def plain_rm_dir(tmp_path_factory):
    return save_reward_model(tmp_path_factory.mktemp("rm") / "plain", template=PLAIN_TEMPLATE)


COMPLETIONS = [
    "yes",
    "The ocean is vast and deep.",
    "- waves\n- salt\n- fish",
    "blue",
    "It covers most of the planet",
]


def reference_score(path, prompt, completion, template):
    """The model's score at the last token of the conversation, scored alone, built by hand."""
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    model.config.pad_token_id = None  # batch of one: the head reads position -1
    tok = tiny_tokenizer()
    text = tok.apply_chat_template([*prompt, {"role": "assistant", "content": completion}], tokenize=False,
                                   chat_template=template)  # fmt: skip
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, 0].item(), ids


def test_hf_renders_with_its_own_template_and_matches_a_hand_forward(plain_rm_dir):
    rm = HFReward(str(plain_rm_dir), batch_size=4, device=torch.device("cpu"))
    expected, ids = reference_score(plain_rm_dir, USER, "blue", PLAIN_TEMPLATE)
    assert rm.tokenizer.decode(ids) == "USER: Describe the ocean.<|im_end|>ASSISTANT: blue<|im_end|>"
    assert rm.encode(USER, "blue") == (ids, None)
    assert ids[-1] == rm.pad_id  # ends on the pad id: pooling must still read the last token
    (result,) = rm.score([USER], ["blue"], [None])
    assert result.reward == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("fixture", ["rm_dir", "plain_rm_dir"])
def test_hf_batched_equals_one_by_one(fixture, request):
    path = request.getfixturevalue(fixture)
    rm = HFReward(str(path), batch_size=3, device=torch.device("cpu"))
    prompts = [USER] * len(COMPLETIONS)
    batched = [r.reward for r in rm.score(prompts, COMPLETIONS, [None] * 5)]
    alone = [rm.score([USER], [c], [None])[0].reward for c in COMPLETIONS]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert max(alone) - min(alone) > 1e-3  # the scores differ, so a mix-up would show
    lengths = {len(rm.encode(USER, c)[0]) for c in COMPLETIONS}
    assert len(lengths) >= 4  # batches really hold padding


def test_hf_truncation_cuts_the_prompt_text_keeps_the_template_and_is_counted(rm_dir):
    uncut = HFReward(str(rm_dir), device=torch.device("cpu"))
    full, short = uncut.encode(USER, COMPLETIONS[1])[0], uncut.encode(USER, "a")[0]
    n = len(full) - 2  # the short conversation fits, the long one once its prompt lost two tokens' text
    assert len(short) <= n
    rm = HFReward(str(rm_dir), max_length=n, device=torch.device("cpu"))
    ids, part = rm.encode(USER, COMPLETIONS[1])
    text = rm.tokenizer.decode(ids)
    assert part == "prompt" and len(ids) <= n
    assert text.startswith("<|im_start|>user\n") and text.endswith(
        f"<|im_start|>assistant\n{COMPLETIONS[1]}<|im_end|>\n"
    )
    results = rm.score([USER, USER], [COMPLETIONS[1], "a"], [None, None])
    assert [r.details for r in results] == [
        {"tokens": len(ids), "truncated": True, "truncated_part": "prompt"},
        {"tokens": len(short), "truncated": False},
    ]
    assert results[0].reward == pytest.approx(rm.forward([ids])[0], abs=1e-6)
    metrics = score_metrics("hf", [{"prompt_id": "p"}] * 2, results)
    assert metrics["truncated"] == 1
    assert metrics["truncation"] == {"rows": 2, "prompt": 1, "completion": 0, "both": 0}


def test_pooling_pad_id():
    assert pooling_pad_id([[4, 5], [6, 7]], pad_id=2) == 2
    assert pooling_pad_id([[4, 2], [6, 0]], pad_id=2) == 1  # 2 and 0 end rows: the smallest free id


def test_hf_rejects_multi_label_and_pickled_models(tmp_path):
    path = save_reward_model(tmp_path / "two", num_labels=2)
    with pytest.raises(RewardError, match="num_labels=2.*single score"):
        HFReward(str(path), device=torch.device("cpu"))
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="safetensors"):
        HFReward(str(path), device=torch.device("cpu"))


def test_hf_via_get_reward(rm_dir):
    reward = get_reward(RewardParams(kind="hf", model=str(rm_dir), batch_size=2, max_length=64))
    results = score_completions(reward, [USER, USER], ["a", "b"], [None, None])
    assert reward.name == f"hf:{rm_dir}" and all(math.isfinite(r.reward) for r in results)
    reward.close()


# --- builtin -----------------------------------------------------------------------------------


def builtin_rows(split, n):
    from alignpipe.prepare import builtin_rows as rows

    return rows(split, n, seed=0)


def test_builtin_rewards_demonstrations_one_and_empty_zero():
    rows = builtin_rows("sft", 12)
    reward = get_reward(RewardParams(kind="builtin"))
    prompts, metas = [r["prompt"] for r in rows], [r["meta"] for r in rows]
    good = score_completions(reward, prompts, [r["completion"][0]["content"] for r in rows], metas)
    assert [r.reward for r in good] == [1.0] * 12
    bad = score_completions(reward, prompts, [""] * 12, metas)
    assert [r.reward for r in bad] == [0.0] * 12
    for row, res in zip(rows, good, strict=True):
        families = [c["family"] for c in json.loads(row["meta"])["constraints"]]
        assert sorted(res.details) == sorted({f: 1 for f in families}) and all(res.details.values())


def test_builtin_half_reward_keeps_details():
    spec = {"constraints": [{"family": "lowercase"}, {"family": "no_commas"}], "topic": "the ocean"}
    (res,) = score_completions(get_reward(RewardParams()), [USER], ["Waves, waves"], [json.dumps(spec)])
    assert res == RewardResult(0.0, {"lowercase": False, "no_commas": False})
    (res,) = score_completions(get_reward(RewardParams()), [USER], ["Waves roll"], [json.dumps(spec)])
    assert res == RewardResult(0.5, {"lowercase": False, "no_commas": True})


def test_builtin_needs_builtin_prompts():
    with pytest.raises(RewardError, match=r"^\(p7, 1\): reward.kind 'builtin' needs built-in prompts"):
        score_completions(get_reward(RewardParams()), [USER], ["x"], [None], labels=["(p7, 1)"])


# --- python ------------------------------------------------------------------------------------


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        textwrap.dedent("""
        def length(prompts, completions):
            return [len(c) + len(p) for p, c in zip(prompts, completions)]
        def short(prompts, completions):
            return [1.0]
        def words(prompts, completions):
            return ["high" for c in completions]
        def nan(prompts, completions):
            return [float("nan") if c == "bad" else 0.0 for c in completions]
        def boom(prompts, completions):
            return 1 / 0
        NOT_CALLABLE = 3
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards_mod"


def test_python_reward(user_module):
    reward = get_reward(RewardParams(kind="python", function=f"{user_module}:length"))
    results = score_completions(reward, [USER, USER * 2], ["abc", "hello"], None)
    assert results == [RewardResult(4.0), RewardResult(7.0)]


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("{m}:missing", "has no attribute 'missing'"),
        ("{m}:NOT_CALLABLE", "'NOT_CALLABLE' is not callable"),
        ("{m}:short", "returned 1 rewards for 2 completions"),
        ("{m}:words", r"^\(p1, 0\): reward.function .* returned str 'high'"),
        ("{m}:boom", "raised ZeroDivisionError: division by zero"),
        ("{m}:nan", r"non-finite reward\(s\): \(p1, 1\): nan$"),
    ],
)
def test_python_reward_errors(user_module, function, message):
    with pytest.raises(RewardError, match=message):
        reward = get_reward(RewardParams(kind="python", function=function.format(m=user_module)))
        score_completions(reward, [USER, USER], ["ok", "bad"], None, labels=["(p1, 0)", "(p1, 1)"])


# --- the score stage ---------------------------------------------------------------------------


def gen(pid, idx, completion, finish="stop"):
    return {"prompt_id": pid, "sample_idx": idx, "completion": completion, "n_tokens": len(completion.split()),
            "finish_reason": finish, "logprob": -1.5, "backend": "hf", "seed": 7}  # fmt: skip


def write_generations(out_dir, chunks: list[list[dict]], n: int) -> None:
    """A finished generate output: chunk files and the manifest that alignpipe.artifacts.generations reads."""
    names = [f"chunk-{k:05d}.parquet" for k in range(len(chunks))]
    for name, rows in zip(names, chunks, strict=True):
        write_chunk(out_dir / name, rows, "fp")
    n_prompts = len({r["prompt_id"] for rows in chunks for r in rows})
    write_json({"fingerprint": "fp", "n": n, "prompts": n_prompts, "files": names}, out_dir / MANIFEST)


def test_score_stage_keeps_every_column(tmp_path):
    prompts = builtin_rows("prompts", 2)
    demo = builtin_rows("sft", 1)[0]
    prompts.append({"prompt_id": "demo", "prompt": demo["prompt"], "meta": demo["meta"]})
    write_parquet(prompts, tmp_path / "prompts.parquet", schema.PROMPTS)
    good = demo["completion"][0]["content"]
    shard0 = [
        gen("demo", 1, ""),
        gen(prompts[0]["prompt_id"], 0, "hello"),
        gen(prompts[0]["prompt_id"], 1, ""),
    ]
    shard1 = [gen("demo", 0, good, finish="length")]
    write_generations(tmp_path / "gen", [shard0, shard1], n=2)
    metrics = score(tmp_path / "gen", tmp_path / "prompts.parquet", tmp_path / "scored.parquet",
                    tmp_path / "score.json", RewardParams())  # fmt: skip
    rows = read_parquet(tmp_path / "scored.parquet", schema.SCORED)
    # sorted by prompt order, then sample_idx; generation columns untouched
    first = prompts[0]["prompt_id"]
    assert [(r["prompt_id"], r["sample_idx"]) for r in rows] == [
        (first, 0),
        (first, 1),
        ("demo", 0),
        ("demo", 1),
    ]
    assert {k: v for k, v in rows[2].items() if k not in ("reward", "reward_details")} == shard1[0]
    assert [r["reward"] for r in rows[2:]] == [1.0, 0.0] and rows[1]["reward"] == 0.0
    assert all(json.loads(rows[2]["reward_details"]).values())
    assert metrics == read_json(tmp_path / "score.json")
    assert metrics["samples"] == 4 and metrics["prompts"] == 2 and metrics["truncated"] == 0


def test_score_stage_names_non_finite_rows(tmp_path, user_module):
    write_parquet(
        [{"prompt_id": "p1", "prompt": USER, "meta": None}], tmp_path / "prompts.parquet", schema.PROMPTS
    )
    write_generations(tmp_path / "gen", [[gen("p1", 0, "fine"), gen("p1", 1, "bad")]], n=2)
    with pytest.raises(RewardError, match=r"1 non-finite reward\(s\): \(prompt_id=p1, sample_idx=1\): nan"):
        score(tmp_path / "gen", tmp_path / "prompts.parquet", tmp_path / "scored.parquet", tmp_path / "s.json",
              RewardParams(kind="python", function=f"{user_module}:nan"))  # fmt: skip
    assert not (tmp_path / "scored.parquet").exists()
