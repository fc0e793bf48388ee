"""Shared-prompt layout: each pair's prompt runs once, with the same log-probs and gradients as padded rows."""

from __future__ import annotations

import pytest
import torch

from alignpipe.artifacts.pairs import EncodedPair, encode_pairs
from alignpipe.core.attention import NAME, _tail_mask, enable_shared_prompt
from alignpipe.core.chat import Encoded
from alignpipe.core.logprobs import CompletionScorer, collate_pairs, pair_logps
from alignpipe.core.models import enable_activation_checkpointing
from alignpipe.testing import tiny_model


def row(i: int, prompt: str = "hello world") -> dict:
    return {
        "pair_id": f"p{i}",
        "prompt": [{"role": "user", "content": f"{prompt} " * (1 + i % 3)}],
        "chosen": [{"role": "assistant", "content": "the quick brown fox " * (1 + i % 2)}],
        "rejected": [{"role": "assistant", "content": "lazy dog" + " x" * i}],
    }


@pytest.fixture()
def pairs(tokenizer):
    return encode_pairs(tokenizer, [row(i) for i in range(3)], 64, 32, where="test")


def test_tail_mask_sees_the_whole_prefix_and_its_own_past():
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(_tail_mask(2, 3, torch.device("cpu"))[0, 0], expected)


def test_shared_layout_by_hand():
    """Prompt [1, 2], chosen [3, 4], rejected [5]: row 1 2 3 4 5, positions 0 1 2 3 2; token 3 and
    token 5 are both predicted from flat index 1 (the prompt's last token), token 4 from index 2."""
    pair = EncodedPair("a", Encoded([1, 2], [3, 4]), Encoded([1, 2], [5]))
    batch = collate_pairs([pair], True, 0, share_prompt=True)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert batch.segments == ((2, 2, 1),)
    assert batch.predict_index.tolist() == [1, 2, 1]
    assert batch.target_ids.tolist() == [3, 4, 5]
    assert batch.sequence_index.tolist() == [0, 0, 1]
    assert batch.n_tokens == 7 and batch.attention_mask is None


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_shared_prompt_equals_padded_in_value_and_gradient(tokenizer, pairs):
    results = []
    for share in (False, True):
        model = tiny_model(tokenizer)
        scorer = CompletionScorer(model)
        assert scorer.shares_prompt and model.config._attn_implementation == NAME
        out = pair_logps(scorer, collate_pairs(pairs, share, tokenizer.pad_token_id, share_prompt=share))
        (out.chosen_logps.sum() - 2 * out.rejected_logps.sum()).backward()
        results.append((out.chosen_logps.detach(), out.rejected_logps.detach(), grads(model)))
    for padded, shared in zip(*results, strict=True):
        torch.testing.assert_close(shared, padded, atol=1e-5, rtol=1e-4)


def test_rejected_tail_never_sees_the_chosen_tail(model, tokenizer, pairs):
    """Changing pair 0's chosen completion changes its chosen log-prob only."""
    other = encode_pairs(
        tokenizer, [{**row(0), "chosen": [{"role": "assistant", "content": "sleep water tip"}]}], 64, 32, "t"
    )[0]
    scorer = CompletionScorer(model)
    with torch.no_grad():
        a = pair_logps(scorer, collate_pairs(pairs, True, 0, share_prompt=True))
        b = pair_logps(scorer, collate_pairs([other, *pairs[1:]], True, 0, share_prompt=True))
    assert not torch.allclose(a.chosen_logps[0], b.chosen_logps[0])
    torch.testing.assert_close(a.rejected_logps, b.rejected_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.chosen_logps[1:], b.chosen_logps[1:], atol=1e-5, rtol=0)


def test_sides_with_different_prompts_share_only_their_common_prefix(model, tokenizer):
    """evaluate.sequence_logps pairs unrelated sequences: the layout must still score each exactly."""
    a, b = (
        encode_pairs(tokenizer, [row(i, prompt)], 64, 32, "t")[0] for i, prompt in ((0, "hi"), (1, "tea"))
    )
    mixed = [EncodedPair("m", a.chosen, b.rejected)]
    scorer = CompletionScorer(model)
    with torch.no_grad():
        shared = pair_logps(scorer, collate_pairs(mixed, True, 0, share_prompt=True))
        padded = pair_logps(scorer, collate_pairs(mixed, False, 0))
    torch.testing.assert_close(shared.chosen_logps, padded.chosen_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.rejected_logps, padded.rejected_logps, atol=1e-5, rtol=0)


def test_plain_forward_and_saved_config_are_unchanged(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        assert enable_shared_prompt(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize("change", ["eager", "sliding_window"])
def test_unsupported_models_keep_their_attention(tokenizer, change):
    model = tiny_model(tokenizer, attn_implementation="eager" if change == "eager" else "sdpa")
    if change == "sliding_window":
        model.config.sliding_window = 4
    before = model.config._attn_implementation
    assert not enable_shared_prompt(model)
    assert model.config._attn_implementation == before


def test_gradient_checkpointing_recomputes_the_same_shared_layout(tokenizer, pairs):
    """The segments ride in the layers' kwargs, so a checkpointed layer's recompute sees them too."""
    results = []
    for checkpointing in (False, True):
        model = tiny_model(tokenizer)
        if checkpointing:
            enable_activation_checkpointing(model)
        scorer = CompletionScorer(model).train()
        out = pair_logps(scorer, collate_pairs(pairs, True, 0, share_prompt=True))
        (out.chosen_logps.sum() - 2 * out.rejected_logps.sum()).backward()
        results.append(grads(model))
    torch.testing.assert_close(results[1], results[0], atol=1e-6, rtol=1e-5)
