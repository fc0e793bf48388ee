"""KTO end to end on the tiny model (fp32, CPU): reference log-probs of unpaired examples and their KL
mismatches, and the dpo stage training with ``dpo.loss_type: kto`` (metrics, resume, LoRA, evaluate)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet, write_parquet
from alignpipe.artifacts.pairs import PairDataError
from alignpipe.artifacts.unpaired import UnpairedScores, kl_partners
from alignpipe.core.chat import encode_completion
from alignpipe.core.logprobs import load_reference, sequence_logps, shares_prompt
from alignpipe.core.models import load_tokenizer
from alignpipe.params import RefLogpsParams
from alignpipe.ref_logps import run_ref_logps
from alignpipe.testing import pair_row, unpaired_row

LENGTHS = {"max_length": 64, "max_prompt_length": 32}


def write_data(root: Path, n_train: int = 8, n_eval: int = 4) -> None:
    write_parquet([pair_row(i, "t") for i in range(4)], root / "pairs" / "train.parquet", schema.PAIRS)
    rows = [unpaired_row(i, prefix="t") for i in range(n_train)]
    write_parquet(rows, root / "unpaired" / "train.parquet", schema.UNPAIRED)
    if n_eval:
        rows = [unpaired_row(i, prefix="e", prompt_id=f"e{i // 2}") for i in range(n_eval)]
        write_parquet(rows, root / "unpaired" / "eval.parquet", schema.UNPAIRED)


def ref_logps(model: Path, root: Path, batch_size: int = 3) -> Path:
    out = root / "ref_logps_unpaired.parquet"
    params = RefLogpsParams(batch_size=batch_size, dtype="float32")
    run_ref_logps(
        model, root / "pairs", root / "ref.parquet", params, **LENGTHS, unpaired=(root / "unpaired", out)
    )
    return out


def test_kl_partners_are_another_prompt_and_independent_of_file_order():
    rows = [unpaired_row(i) for i in range(10)]
    partner = kl_partners(rows, "t")
    assert all(rows[j]["prompt_id"] != rows[i]["prompt_id"] for i, j in enumerate(partner))
    assert len(set(partner)) > 2  # the mismatches spread over the examples, not one completion for all
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    again = kl_partners(shuffled, "t")
    assert {r["example_id"]: shuffled[j]["example_id"] for r, j in zip(shuffled, again, strict=True)} == {
        rows[i]["example_id"]: rows[j]["example_id"] for i, j in enumerate(partner)
    }
    with pytest.raises(PairDataError, match="at least two prompts"):
        kl_partners([unpaired_row(i, prompt_id="same") for i in range(3)], "f.parquet")


def test_ref_logps_of_examples_and_kl_mismatches_equal_separate_sequences(tiny_model_dir, tmp_path):
    """The shared-prompt pair path gives each example's and its mismatch's log-prob as if scored alone."""
    write_data(tmp_path)
    scores = UnpairedScores.read(ref_logps(tiny_model_dir, tmp_path))
    train = read_parquet(tmp_path / "unpaired" / "train.parquet", schema.UNPAIRED)
    evals = read_parquet(tmp_path / "unpaired" / "eval.parquet", schema.UNPAIRED)
    assert scores.example_ids == [r["example_id"] for r in train + evals]
    tokenizer = load_tokenizer(tiny_model_dir)
    by_id = {r["example_id"]: r for r in train + evals}
    seqs, kl_seqs = [], []
    for eid, kl_id in zip(scores.example_ids, scores.kl_ids, strict=True):
        row, other = by_id[eid], by_id[kl_id]
        assert other["prompt_id"] != row["prompt_id"]
        assert (eid[0], kl_id[0]) in {("t", "t"), ("e", "e")}  # mismatches stay within their split
        seqs.append(encode_completion(tokenizer, row["prompt"], row["completion"], **LENGTHS))
        kl_seqs.append(encode_completion(tokenizer, row["prompt"], other["completion"], **LENGTHS))
    scorer = load_reference(tiny_model_dir, "float32", torch.device("cpu"))
    assert shares_prompt(scorer)  # so ref_logps ran [prompt][completion][KL completion] rows
    alone = sequence_logps(scorer, seqs, 4, tokenizer.pad_token_id)
    kl_alone = sequence_logps(scorer, kl_seqs, 4, tokenizer.pad_token_id)
    torch.testing.assert_close(scores.logps, alone, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores.kl_logps, kl_alone, atol=1e-4, rtol=0)
    assert scores.tokens.tolist() == [len(s.completion_ids) for s in seqs]
    assert scores.kl_tokens.tolist() == [len(s.completion_ids) for s in kl_seqs]
    assert (scores.logps < 0).all() and not torch.equal(scores.logps, scores.kl_logps)


def test_ref_logps_without_unpaired_examples_writes_an_empty_file(tiny_model_dir, tmp_path):
    write_parquet([pair_row(i, "t") for i in range(4)], tmp_path / "pairs" / "train.parquet", schema.PAIRS)
    out = ref_logps(tiny_model_dir, tmp_path)  # no tmp_path/unpaired folder
    assert read_parquet(out, schema.REF_LOGPS_UNPAIRED) == []
    assert len(UnpairedScores.read(out)) == 0
