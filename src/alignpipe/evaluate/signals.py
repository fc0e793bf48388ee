"""Overfitting signals of the ``evaluate`` stage: repetitive answers, and forgetting of the SFT data.

- **distinct-2** (Li et al. 2016): distinct word bigrams over all bigrams of a model's answers, pooled over
  its answers (bigrams do not cross answers). Words: the answer lower-cased and split on whitespace.
  Lower means more repetitive, across answers as well as within them.
- **repeated 3-gram rate**: within each answer, the word trigrams that repeat an earlier trigram of the
  same answer, pooled: ``sum(trigrams - distinct trigrams) / sum(trigrams)`` (1 - Welleck et al.'s
  seq-rep-3 ratio, pooled). A loop such as "no no no no" scores high; answers under 3 words add nothing.
- **forgetting**: the mean NLL per token (nats; completion tokens, EOS included) of SFT demonstrations
  under each model, and its difference from the SFT model's (``demo_nll_delta``, 0 for SFT itself; > 0:
  the model lost some of what SFT taught). ``data/prepared/sft.parquet`` has no eval split (the sft stage
  trains on every row), so the demonstrations are a fixed slice: its first ``evaluate.forgetting_rows``
  rows. They are SFT training rows, so this measures how far a model moved away from the SFT fit, not
  held-out generalization. Tokenized as the eval answers are (``dpo.max_length``,
  ``dpo.max_prompt_length``), scored through :func:`alignpipe.core.logprobs.sequence_logps`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import ArtifactError, read_parquet
from alignpipe.core.chat import Encoded, TruncationError, encode_completion
from alignpipe.evaluate.results import DemoNll
from alignpipe.params import DpoParams, EvaluateParams

REPEAT_N = 3  # n of the repeated n-gram rate


def words(text: str) -> list[str]:
    return text.lower().split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(tokens[i:] for i in range(n)), strict=False))


def distinct_n(texts: Sequence[str], n: int = 2) -> float | None:
    """Distinct n-grams over all n-grams of ``texts`` (None when no text has n words)."""
    grams = [g for text in texts for g in ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngram_rate(texts: Sequence[str], n: int = REPEAT_N) -> float | None:
    """Share of the n-grams that repeat an earlier n-gram of the same text (None when no text has n words)."""
    total = repeats = 0
    for text in texts:
        grams = ngrams(words(text), n)
        total += len(grams)
        repeats += len(grams) - len(set(grams))
    return repeats / total if total else None


def load_demonstrations(
    path: str | os.PathLike, n_rows: int, columns: Any = schema.SFT
) -> list[dict[str, Any]]:
    """The first ``n_rows`` rows of the prepared SFT data (prompt and completion messages; ``columns``:
    the schema, a VLM's has images)."""
    rows = read_parquet(path, columns)[:n_rows]
    if not rows:
        raise ArtifactError(
            f"{path}: no SFT demonstrations for the forgetting signal (evaluate.forgetting_rows)"
        )
    return rows


def encode_demonstrations(
    tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int, max_prompt_length: int
) -> list[Encoded]:
    encoded = []
    for row in rows:
        try:
            encoded.append(encode_completion(tokenizer, row["prompt"], row["completion"], max_length,
                                             max_prompt_length))  # fmt: skip
        except TruncationError as exc:
            raise ValueError(
                f"evaluate: SFT demonstration id={row['id']}: {exc} (raise dpo.max_length)"
            ) from None
    return encoded


def demo_nll(
    model_dir: str | os.PathLike,
    rows: Sequence[dict[str, Any]],
    dtype: str,
    batch_size: int,
    max_length: int,
    max_prompt_length: int,
) -> DemoNll:
    """Mean NLL per completion token of ``rows`` under the model in ``model_dir`` (pooled over tokens)."""
    import torch

    from alignpipe.core.logprobs import load_reference, sequence_logps
    from alignpipe.core.models import load_tokenizer, pick_device

    tokenizer = load_tokenizer(model_dir)
    scorer = load_reference(model_dir, dtype, pick_device())
    try:
        seqs = encode_demonstrations(tokenizer, rows, max_length, max_prompt_length)
        logps = sequence_logps(
            scorer, seqs, batch_size, tokenizer.pad_token_id, True, f"nll {Path(model_dir).name}"
        )
    finally:
        del scorer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return pooled_nll(logps, seqs)


def pooled_nll(logps: Any, seqs: Sequence[Encoded]) -> DemoNll:
    """Mean NLL per completion token from the summed log-probs (S,) of ``seqs``, pooled over tokens."""
    tokens = sum(len(s.completion_ids) for s in seqs)
    return DemoNll(-logps.sum().item() / tokens, tokens, len(seqs))


def forgetting(
    models: Mapping[str, str | os.PathLike],
    sft_data: str | os.PathLike | None,
    params: EvaluateParams,
    dpo: DpoParams,
    columns: Any = schema.SFT,
    nll: Callable[..., DemoNll] = demo_nll,
) -> dict[str, DemoNll]:
    """NLL of the first ``evaluate.forgetting_rows`` SFT demonstrations under each model, one model in
    memory at a time ({} when there is no ``sft_data`` or the signal is off).

    ``columns`` and ``nll``: the SFT schema and :func:`demo_nll`'s counterpart of a VLM (with images).
    """
    if sft_data is None or params.forgetting_rows == 0:
        return {}
    from alignpipe.core.progress import Timer

    timer = Timer("evaluate: forgetting NLL")
    rows = load_demonstrations(sft_data, params.forgetting_rows, columns)
    args = (params.dtype, params.batch_size, dpo.max_length, dpo.max_prompt_length)
    out = {m: nll(folder, rows, *args) for m, folder in models.items()}
    timer.summary(len(rows) * len(out), "sequences", **{m: round(r.nll, 4) for m, r in out.items()})
    return out
