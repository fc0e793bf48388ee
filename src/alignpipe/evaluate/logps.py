"""The log-prob measurements of the ``evaluate`` stage, one path for a text model and a VLM.

KL(dpo || sft) on DPO's answers and the DPO implicit-reward accuracy on the eval pairs
(:func:`policy_logps`), and KL(policy || sft) of an earlier round (:func:`answers_kl`). How a model is
loaded, how answers and pairs become tokens and how they are scored is a :class:`Scoring`:
:class:`TextScoring` here (:mod:`alignpipe.core.logprobs`, the ``ref_logps`` and ``dpo`` path), a VLM's
(:class:`alignpipe.evaluate.vision.VisionScoring`) adds the prompts' pixel inputs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from alignpipe.artifacts.pairs import EncodedPair, count_truncation, read_pairs
from alignpipe.artifacts.ref_logps import PairScores
from alignpipe.core.chat import Encoded, Message, Truncation, TruncationError, encode_completion
from alignpipe.core.logprobs import CompletionScorer, load_reference, pair_scores, sequence_logps
from alignpipe.core.models import load_tokenizer, pick_device
from alignpipe.core.progress import Timer
from alignpipe.evaluate.compare import kl_estimate, pairs_metrics
from alignpipe.evaluate.results import Answer, Estimate, EvalPrompt, PairsResult
from alignpipe.params import DpoParams, EvaluateParams


def encode_answers(
    tokenizer: Any,
    prompts: Sequence[list[Message]],
    answers: Sequence[Answer],
    max_length: int,
    max_prompt_length: int,
    counts: Truncation | None = None,
) -> list[Encoded]:
    """Answers as (prompt, completion) tokens; one cut at max_new_tokens keeps no EOS (none was sampled).

    ``counts``: what dpo.max_length / dpo.max_prompt_length cut is added to it, per answer.
    """
    encoded = []
    for prompt, answer in zip(prompts, answers, strict=True):
        try:
            enc = encode_completion(
                tokenizer,
                prompt,
                [{"role": "assistant", "content": answer.completion}],
                max_length,
                max_prompt_length,
            )
        except TruncationError as exc:
            raise ValueError(
                f"evaluate: answer (prompt_id={answer.prompt_id}, sample_idx={answer.sample_idx}): {exc} "
                f"(dpo.max_length={max_length}, dpo.max_prompt_length={max_prompt_length}; raise them)"
            ) from None
        if answer.finish_reason == "length" and not enc.completion_cut and len(enc.completion_ids) > 1:
            enc = Encoded(enc.prompt_ids, enc.completion_ids[:-1], enc.prompt_cut, enc.completion_cut)
        if counts is not None:
            counts.count(enc.prompt_cut, enc.completion_cut)
        encoded.append(enc)
    return encoded


def score_pairs(
    scorer: CompletionScorer, pairs: Sequence[EncodedPair], batch_size: int, pad_token_id: int, desc: str
) -> PairScores:
    """Summed completion log-probs of each pair's two sides, in ``pairs`` order, through the
    ``ref_logps`` path (shared-prompt rows, no padding), so eval-pair margins use the reference's
    layout. On CPU it took 8.9 s where padded batches took 14.9 s (96 answers of SmolLM2-135M)."""
    return pair_scores(scorer, pairs, batch_size, pad_token_id, progress=True, desc=desc)


@contextlib.contextmanager
def loaded_scorer(model_dir: str | os.PathLike, dtype: str) -> Iterator[tuple[Any, CompletionScorer]]:
    """(tokenizer, frozen CompletionScorer) of a model folder, freed on exit."""
    tokenizer = load_tokenizer(model_dir)
    scorer = load_reference(model_dir, dtype, pick_device())
    try:
        yield tokenizer, scorer
    finally:
        del scorer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Scoring(Protocol):
    """How :func:`policy_logps` and :func:`answers_kl` load a model folder and score on it."""

    def load(self, model_dir: str | os.PathLike, dtype: str) -> contextlib.AbstractContextManager[Any]: ...

    def answer_logps(self, loaded: Any, prompts: Sequence[EvalPrompt], answers: Sequence[Answer],
                     params: EvaluateParams, dpo: DpoParams, counts: Truncation | None, desc: str) -> list[float]: ...  # fmt: skip

    def read_pairs(self, loaded: Any, path: Path, dpo: DpoParams) -> list[Any]: ...

    def pair_scores(
        self, loaded: Any, pairs: Sequence[Any], params: EvaluateParams, desc: str
    ) -> PairScores: ...


class TextScoring:
    """A text model: (tokenizer, CompletionScorer), answers and pairs cut at dpo.max_length and
    dpo.max_prompt_length."""

    @staticmethod
    def load(model_dir: str | os.PathLike, dtype: str) -> contextlib.AbstractContextManager[Any]:
        return loaded_scorer(model_dir, dtype)

    @staticmethod
    def answer_logps(
        loaded: tuple[Any, CompletionScorer],
        prompts: Sequence[EvalPrompt],
        answers: Sequence[Answer],
        params: EvaluateParams,
        dpo: DpoParams,
        counts: Truncation | None,
        desc: str,
    ) -> list[float]:
        """Summed log-probs of ``answers`` (each with its prompt) under ``loaded``."""
        tokenizer, scorer = loaded
        by_id = {p.prompt_id: p.prompt for p in prompts}
        texts = [by_id[a.prompt_id] for a in answers]
        seqs = encode_answers(tokenizer, texts, answers, dpo.max_length, dpo.max_prompt_length, counts)
        return sequence_logps(scorer, seqs, params.batch_size, tokenizer.pad_token_id, True, desc).tolist()

    @staticmethod
    def read_pairs(loaded: tuple[Any, CompletionScorer], path: Path, dpo: DpoParams) -> list[EncodedPair]:
        return read_pairs(path, loaded[0], dpo.max_length, dpo.max_prompt_length)

    @staticmethod
    def pair_scores(
        loaded: tuple[Any, CompletionScorer], pairs: Sequence[EncodedPair], params: EvaluateParams, desc: str
    ) -> PairScores:
        return score_pairs(loaded[1], pairs, params.batch_size, loaded[0].pad_token_id, desc)


TEXT = TextScoring()


def policy_logps(
    dpo_dir: str | os.PathLike,
    sft_dir: str | os.PathLike,
    prompts: Sequence[EvalPrompt],
    dpo_answers: Sequence[Answer],
    pairs_path: str | os.PathLike,
    ref_logps_path: str | os.PathLike,
    params: EvaluateParams,
    dpo: DpoParams,
    truncation: dict[str, Truncation] | None = None,
    scoring: Scoring = TEXT,
) -> tuple[Estimate, PairsResult]:
    """KL(dpo || sft) on DPO's answers, and the DPO implicit-reward accuracy on the eval pairs.

    ``truncation`` gets what dpo.max_length / dpo.max_prompt_length cut: "answers" and "pairs".
    """
    timer = Timer("evaluate: log-probs")
    answer_counts = Truncation()
    with scoring.load(dpo_dir, params.dtype) as loaded:
        dpo_logps = scoring.answer_logps(
            loaded, prompts, dpo_answers, params, dpo, answer_counts, "logps dpo"
        )
        pairs = scoring.read_pairs(loaded, Path(pairs_path), dpo)
        if truncation is not None:
            truncation.update(answers=answer_counts, pairs=count_truncation(pairs))
        ref = PairScores.read(ref_logps_path).aligned(pairs, where=str(ref_logps_path))
        policy = scoring.pair_scores(loaded, pairs, params, "eval pairs")
    del loaded  # one model in memory at a time
    with scoring.load(sft_dir, params.dtype) as loaded:
        sft_logps = scoring.answer_logps(loaded, prompts, dpo_answers, params, dpo, None, "logps sft")
    del loaded
    kl = kl_estimate(dpo_logps, sft_logps, [a.prompt_id for a in dpo_answers])
    pairs_result = pairs_metrics(policy.chosen, policy.rejected, ref.chosen, ref.rejected, dpo.beta)
    timer.summary(2 * len(dpo_answers) + 2 * len(pairs), "sequences")
    return kl, pairs_result


def answers_kl(
    policy_dir: str | os.PathLike,
    sft_dir: str | os.PathLike,
    prompts: Sequence[EvalPrompt],
    answers: Sequence[Answer],
    params: EvaluateParams,
    dpo: DpoParams,
    scoring: Scoring = TEXT,
) -> Estimate:
    """KL(policy || sft) on the policy's own answers, as :func:`policy_logps` (an earlier round's policy)."""
    logps = []
    for model_dir in (policy_dir, sft_dir):
        with scoring.load(model_dir, params.dtype) as loaded:
            logps.append(
                scoring.answer_logps(loaded, prompts, answers, params, dpo, None, f"logps {model_dir}")
            )
        del loaded
    return kl_estimate(logps[0], logps[1], [a.prompt_id for a in answers])
