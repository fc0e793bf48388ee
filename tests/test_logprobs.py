"""The shared log-prob path: hand computations, masking, EOS, chunking, packing, the ref_logps stage."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import ArtifactError, read_parquet, write_parquet
from alignpipe.artifacts.pairs import PairDataError, encode_pair, encode_pairs
from alignpipe.artifacts.ref_logps import PairScores
from alignpipe.core.logprobs import CompletionScorer, collate_pairs, pair_logps, pair_scores
from alignpipe.params import RefLogpsParams
from alignpipe.ref_logps import run_ref_logps
from alignpipe.testing import pair_row


@pytest.fixture()
def pairs(tokenizer):
    return encode_pairs(tokenizer, [pair_row(i) for i in range(3)], 64, 32, where="test")


def manual_logps(model, encoded) -> float:
    """Sum over completion tokens t of log_softmax(logits[t - 1])[token t], one sequence at a time."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([encoded.input_ids])).logits[0].double(), dim=-1)
    p = len(encoded.prompt_ids)
    return sum(logp[t - 1, encoded.input_ids[t]].item() for t in range(p, len(encoded.input_ids)))


LAYOUTS = {"one-row": (True, None), "binned": (True, 0), "padded": (False, None)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logps_equal_a_full_log_softmax_masked_sum(model, tokenizer, pairs, layout):
    batch = collate_pairs(pairs, LAYOUTS[layout][0], tokenizer.pad_token_id, LAYOUTS[layout][1])
    with torch.no_grad():
        out = pair_logps(CompletionScorer(model), batch)
    want_c = [manual_logps(model, p.chosen) for p in pairs]
    want_r = [manual_logps(model, p.rejected) for p in pairs]
    torch.testing.assert_close(
        out.chosen_logps.double(), torch.tensor(want_c, dtype=torch.double), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        out.rejected_logps.double(), torch.tensor(want_r, dtype=torch.double), atol=1e-4, rtol=0
    )
    assert out.chosen_tokens.tolist() == [len(p.chosen.completion_ids) for p in pairs]


def test_prompt_tokens_are_never_scored(tokenizer, pairs):
    """Every scored target is a completion token; scored positions are exactly the completion's."""
    batch = collate_pairs(pairs, True, tokenizer.pad_token_id)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    want = [tok for s in seqs for tok in s.completion_ids]
    assert batch.target_ids.tolist() == want
    # each target sits right after its predicting position in the packed row
    assert torch.equal(batch.input_ids.view(-1)[batch.predict_index + 1], batch.target_ids)
    assert batch.completion_tokens.tolist() == [len(s.completion_ids) for s in seqs]


def test_each_completion_is_scored_with_exactly_one_final_eos(tokenizer, pairs):
    batch = collate_pairs(pairs, False, tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    for i in range(2 * len(pairs)):
        targets = batch.target_ids[batch.sequence_index == i].tolist()
        assert targets.count(eos) == 1 and targets[-1] == eos


def test_chunked_lm_head_equals_unchunked_in_value_and_gradient(model, tokenizer, pairs):
    batch = collate_pairs(pairs, True, tokenizer.pad_token_id)
    results = []
    for budget in (10**9, 3 * model.config.vocab_size):  # one chunk vs chunks of 3 tokens
        model.zero_grad()
        out = pair_logps(CompletionScorer(model, logit_budget=budget), batch)
        (out.chosen_logps - 2 * out.rejected_logps).sum().backward()
        results.append((out.chosen_logps.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("padding_free", "share"), [(True, False), (False, False), (True, True)],
                         ids=["packed", "padded", "shared-prompt"])  # fmt: skip
def test_head_over_every_position_gives_the_same_logps_and_gradients(
    model, tokenizer, pairs, padding_free, share
):
    """The ablation ``head_all_positions`` (bench --ablate completion_head) only adds work: same
    values and gradients (every weight) as the head on completion positions, chunked (3 tokens) or
    not; with shared prompts the prompt's last position predicts both sides' first token."""
    batch = collate_pairs(pairs, padding_free, tokenizer.pad_token_id, None, share)
    assert (batch.segments is not None) == share
    results = []
    for every, budget in ((False, 10**9), (True, 10**9), (True, 3 * model.config.vocab_size)):
        model.zero_grad()
        out = pair_logps(CompletionScorer(model, logit_budget=budget, head_all_positions=every), batch)
        (out.chosen_logps - 2 * out.rejected_logps).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((out.chosen_logps.detach(), out.rejected_logps.detach(), *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row_tokens", [None, 0], ids=["one-row", "binned"])
def test_packed_equals_padded_within_1e5_fp32(model, tokenizer, pairs, row_tokens):
    scorer = CompletionScorer(model)
    packed_batch = collate_pairs(pairs, True, tokenizer.pad_token_id, row_tokens)
    with torch.no_grad():
        packed = pair_logps(scorer, packed_batch)
        padded = pair_logps(scorer, collate_pairs(pairs, False, tokenizer.pad_token_id))
    assert packed_batch.attention_mask is None
    torch.testing.assert_close(packed.chosen_logps, padded.chosen_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.rejected_logps, padded.rejected_logps, atol=1e-5, rtol=0)


def test_binned_rows_hold_several_sequences_and_no_row_exceeds_the_longest(tokenizer):
    """First-fit decreasing: lengths 9, 5, 4, 3, 3 (capacity 9) -> rows [9], [5, 4], [3, 3]."""
    from alignpipe.core.logprobs import _row_starts

    rows, row_len, starts = _row_starts([3, 9, 5, 4, 3], padding_free=True, row_tokens=0)
    assert (rows, row_len) == (3, 9)
    assert sorted(starts) == [0, 9, 14, 18, 21] and starts[1] == 0
    assert _row_starts([3, 9], True, None) == (1, 12, [0, 3])
    assert _row_starts([3, 9], False, None) == (2, 9, [0, 9])


@pytest.mark.parametrize("row_tokens", [None, 10**4], ids=["one-row", "one-big-bin"])
def test_packed_sequences_do_not_attend_to_each_other(model, tokenizer, pairs, row_tokens):
    """transformers builds a block-diagonal mask from restarting position ids: changing the first
    sequence of the row leaves the others' log-probs unchanged (and does change its own)."""
    other = encode_pair(
        tokenizer, {**pair_row(0), "prompt": [{"role": "user", "content": "sleep water"}]}, 64, 32
    )
    scorer = CompletionScorer(model)
    with torch.no_grad():
        a = pair_logps(scorer, collate_pairs(pairs, True, tokenizer.pad_token_id, row_tokens))
        b = pair_logps(scorer, collate_pairs([other, *pairs[1:]], True, tokenizer.pad_token_id, row_tokens))
    assert not torch.allclose(a.chosen_logps[0], b.chosen_logps[0])
    torch.testing.assert_close(a.chosen_logps[1:], b.chosen_logps[1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(a.rejected_logps[1:], b.rejected_logps[1:], atol=1e-5, rtol=0)


def test_aligned_logps_for_wpo_match_a_hand_computation(model, tokenizer, pairs):
    """aligned = sum_t log p(y_t) - log sum_v p(v)^2 over completion tokens."""
    with torch.no_grad():
        out = pair_logps(
            CompletionScorer(model), collate_pairs(pairs[:1], True, tokenizer.pad_token_id), aligned=True
        )
        enc = pairs[0].chosen
        logp = torch.log_softmax(model(torch.tensor([enc.input_ids])).logits[0].double(), -1)
    p = len(enc.prompt_ids)
    want = sum(
        logp[t - 1, enc.input_ids[t]].item() - math.log(logp[t - 1].exp().pow(2).sum().item())
        for t in range(p, len(enc.input_ids))
    )
    assert out.chosen_aligned_logps.item() == pytest.approx(want, abs=1e-4)


def test_bad_completion_names_the_file_pair_and_field(tokenizer):
    row = {**pair_row(0), "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}
    with pytest.raises(PairDataError, match=r"pairs.parquet: pair p0: field 'chosen'"):
        encode_pair(tokenizer, row, 64, 32, where="pairs.parquet")


def test_pair_scores_follow_input_order_whatever_the_batching(model, tokenizer, pairs):
    scorer = CompletionScorer(model).eval()
    scores = pair_scores(scorer, pairs, batch_size=2, pad_token_id=tokenizer.pad_token_id)
    assert scores.pair_ids == ["p0", "p1", "p2"]
    alone = pair_scores(scorer, pairs[2:], batch_size=1, pad_token_id=tokenizer.pad_token_id)
    assert scores.chosen[2].item() == pytest.approx(alone.chosen[0].item(), abs=1e-5)
    counts = [len(p.chosen.completion_ids) for p in pairs]
    assert scores.chosen_tokens.tolist() == counts and scores.chosen.dtype == torch.float64


def test_pair_scores_round_trip_through_the_file_and_align_to_pairs(model, tokenizer, pairs, tmp_path):
    scores = pair_scores(CompletionScorer(model).eval(), pairs, 2, tokenizer.pad_token_id)
    scores.write(tmp_path / "ref.parquet")
    back = PairScores.read(tmp_path / "ref.parquet")
    assert back.pair_ids == scores.pair_ids and torch.equal(back.chosen, scores.chosen)
    assert torch.equal(back.rejected_tokens, scores.rejected_tokens)
    flipped = back.aligned(pairs[::-1], "ref.parquet")
    assert flipped.pair_ids == ["p2", "p1", "p0"] and torch.equal(flipped.rejected, scores.rejected.flip(0))
    with pytest.raises(ArtifactError, match="no reference log-probs for pair 'x'"):
        back.aligned([replace(pairs[0], pair_id="x")], "ref.parquet")
    longer = replace(
        pairs[0], chosen=replace(pairs[0].chosen, completion_ids=[*pairs[0].chosen.completion_ids, 1])
    )
    with pytest.raises(ArtifactError, match="stale ref_logps"):
        back.aligned([longer], "ref.parquet")


def test_ref_logps_stage_writes_every_train_and_eval_pair(tiny_model_dir, tmp_path):
    write_parquet([pair_row(i, "t") for i in range(3)], tmp_path / "pairs" / "train.parquet", schema.PAIRS)
    write_parquet([pair_row(i, "e") for i in range(2)], tmp_path / "pairs" / "eval.parquet", schema.PAIRS)
    out = tmp_path / "ref_logps.parquet"
    run_ref_logps(
        tiny_model_dir, tmp_path / "pairs", out, RefLogpsParams(batch_size=2, dtype="float32"), 64, 32
    )
    rows = read_parquet(out, schema.REF_LOGPS)
    assert [r["pair_id"] for r in rows] == ["t0", "t1", "t2", "e0", "e1"]
    assert all(r["ref_chosen_logps"] < 0 and r["chosen_tokens"] > 0 for r in rows)
