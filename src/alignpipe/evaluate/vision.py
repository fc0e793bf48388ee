"""The ``evaluate`` stage on a vision-language model (the SFT folder has a vision config).

The same measurements and reports as for text (:mod:`alignpipe.evaluate.stage`), with each eval prompt's
images (``eval_prompts.parquet``'s ``images`` column, written by ``prepare``):

- answers are sampled as ``generate`` samples a VLM (:mod:`alignpipe.vision.backend`: the processor's
  chat template, transformers' ``generate`` with the pixel inputs or vLLM's ``multi_modal_data`` as
  ``evaluate.backend`` says, seeds keyed by prompt id, so SFT and DPO draw the same numbers);
- a ``python`` reward gets ``images=`` (per answer, its prompt's images), as in ``score``;
- KL(dpo || sft) on DPO's answers and the forgetting NLL of SFT demonstrations (``sft.parquet`` with its
  images) go through :func:`alignpipe.vision.logprobs.vision_sequence_logps`; the eval pairs and a
  held-out preference split through :func:`~alignpipe.vision.logprobs.vision_pair_scores` (the
  ``ref_logps`` path of a VLM, so margins use the reference's layout).

A prompt with images is never cut (:mod:`alignpipe.vision.models`): only ``dpo.max_length`` applies.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet
from alignpipe.artifacts.ref_logps import PairScores
from alignpipe.core.chat import Encoded, Truncation, TruncationError
from alignpipe.core.models import pick_device
from alignpipe.core.progress import Timer
from alignpipe.evaluate.logps import answers_kl, policy_logps
from alignpipe.evaluate.preferences import preference_split
from alignpipe.evaluate.results import Answer, DemoNll, EvalPrompt
from alignpipe.evaluate.signals import forgetting, pooled_nll
from alignpipe.params import DpoParams, EvaluateParams
from alignpipe.vision.backend import build_vision_requests, open_vision_backend
from alignpipe.vision.logprobs import (
    VisionCompletionScorer,
    VisionPair,
    read_vision_pairs,
    vision_pair_scores,
    vision_sequence_logps,
)
from alignpipe.vision.models import (
    VisionEncoded,
    encode_vision_completion,
    load_image_text_model,
    load_processor,
    open_images,
)


def load_vision_scorer(model_dir: str | os.PathLike, dtype: str) -> tuple[Any, VisionCompletionScorer]:
    """(processor, frozen scorer) of a VLM folder."""
    scorer = VisionCompletionScorer(load_image_text_model(model_dir, dtype, pick_device())).eval()
    scorer.requires_grad_(False)
    return load_processor(model_dir), scorer


def encode_vision_answers(
    processor: Any,
    prompts: Sequence[EvalPrompt],
    images: Mapping[str, list[dict[str, Any]]],
    answers: Sequence[Answer],
    max_length: int,
    counts: Truncation | None = None,
) -> list[VisionEncoded]:
    """Answers with their prompt's images as tokens; an answer cut at max_new_tokens keeps no EOS (as
    :func:`alignpipe.evaluate.stage.encode_answers`)."""
    by_id = {p.prompt_id: p.prompt for p in prompts}
    out = []
    for a in answers:
        try:
            enc = encode_vision_completion(processor, by_id[a.prompt_id], [{"role": "assistant", "content": a.completion}],
                                           images[a.prompt_id], max_length)  # fmt: skip
        except TruncationError as exc:
            raise ValueError(
                f"evaluate: answer (prompt_id={a.prompt_id}, sample_idx={a.sample_idx}): {exc} (raise dpo.max_length)"
            ) from None
        e = enc.encoded
        if a.finish_reason == "length" and not e.completion_cut and len(e.completion_ids) > 1:
            enc = VisionEncoded(Encoded(e.prompt_ids, e.completion_ids[:-1]), enc.pixel_inputs, enc.n_images)
        if counts is not None:
            counts.count(False, enc.encoded.completion_cut)
        out.append(enc)
    return out


def _encode_demonstration(processor: Any, row: Mapping[str, Any], max_length: int) -> VisionEncoded:
    try:
        return encode_vision_completion(
            processor, row["prompt"], row["completion"], row["images"] or [], max_length
        )
    except TruncationError as exc:
        raise ValueError(
            f"evaluate: SFT demonstration id={row['id']}: {exc} (raise dpo.max_length)"
        ) from None


def vision_demo_nll(
    model_dir: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    dtype: str,
    batch_size: int,
    max_length: int,
    max_prompt_length: int,
) -> DemoNll:
    """:func:`alignpipe.evaluate.signals.demo_nll` with the rows' images (a prompt with images is never cut:
    ``max_prompt_length`` does not apply)."""
    processor, scorer = load_vision_scorer(model_dir, dtype)
    seqs = [_encode_demonstration(processor, r, max_length) for r in rows]
    logps = vision_sequence_logps(scorer, seqs, batch_size, processor.tokenizer.pad_token_id)
    return pooled_nll(logps, [s.encoded for s in seqs])


@dataclass(frozen=True)
class VisionScoring:
    """:class:`alignpipe.evaluate.logps.TextScoring` of a VLM: (processor, VisionCompletionScorer), each answer
    and pair with its prompt's images (``stored``: prompt_id -> its {"bytes", "path"} entries)."""

    stored: Mapping[str, list[dict[str, Any]]]

    @staticmethod
    def load(model_dir: str | os.PathLike, dtype: str) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext(load_vision_scorer(model_dir, dtype))

    def answer_logps(
        self,
        loaded: tuple[Any, VisionCompletionScorer],
        prompts: Sequence[EvalPrompt],
        answers: Sequence[Answer],
        params: EvaluateParams,
        dpo: DpoParams,
        counts: Truncation | None,
        desc: str,
    ) -> list[float]:
        """Summed log-probs of ``answers`` with their prompts' images under ``loaded``."""
        processor, scorer = loaded
        seqs = encode_vision_answers(processor, prompts, self.stored, answers, dpo.max_length, counts)
        return vision_sequence_logps(
            scorer, seqs, params.batch_size, processor.tokenizer.pad_token_id
        ).tolist()

    @staticmethod
    def read_pairs(
        loaded: tuple[Any, VisionCompletionScorer], path: Path, dpo: DpoParams
    ) -> list[VisionPair]:
        return read_vision_pairs(path, loaded[0], dpo.max_length)

    @staticmethod
    def pair_scores(
        loaded: tuple[Any, VisionCompletionScorer],
        pairs: Sequence[VisionPair],
        params: EvaluateParams,
        desc: str,
    ) -> PairScores:
        processor, scorer = loaded
        return vision_pair_scores(scorer, pairs, params.batch_size, processor.tokenizer.pad_token_id)


class VisionEvaluation:
    """The model-facing steps of :func:`alignpipe.evaluate.stage.run_evaluate` on a VLM (the methods of
    :class:`alignpipe.evaluate.stage.TextEvaluation`, with the eval prompts' images)."""

    def __init__(self, prompts_path: str | os.PathLike) -> None:
        rows = read_parquet(prompts_path, schema.with_images(schema.PROMPTS))
        self.stored = {r["prompt_id"]: r["images"] or [] for r in rows}  # {"bytes", "path"} entries
        self.images = {pid: open_images(entries) for pid, entries in self.stored.items()}  # for the reward
        scoring = VisionScoring(self.stored)
        self.policy_logps = functools.partial(policy_logps, scoring=scoring)
        self.answers_kl = functools.partial(answers_kl, scoring=scoring)
        self.preference_split = functools.partial(preference_split, scoring=scoring)

    @staticmethod
    def backend(name: str) -> str:
        from alignpipe.generation.base import resolve_backend

        return resolve_backend(name)  # as for text: hf (transformers' generate) or vllm (multi_modal_data)

    def generate_answers(
        self, model_dir: str | os.PathLike, prompts: Sequence[EvalPrompt], params: EvaluateParams, label: str
    ) -> list[Answer]:
        """``params.n`` answers per image prompt, seeds keyed by prompt id (every model the same numbers)."""
        timer = Timer(f"evaluate: generate {label}")
        processor = load_processor(model_dir)
        keys = [p.prompt_id for p in prompts]
        requests = build_vision_requests(processor, [p.prompt for p in prompts], [self.stored[k] for k in keys],
                                         keys, params.seed)  # fmt: skip
        backend = open_vision_backend(model_dir, params, processor, requests)
        try:
            with tqdm(total=len(prompts), unit="prompt", desc=f"generate {label}") as bar:
                samples = backend.generate(requests, params.n, bar.update)
        finally:
            backend.close()
        answers = [Answer(keys[s.prompt_index], s.sample_idx, s.completion, s.n_tokens, s.finish_reason)
                   for s in samples]  # fmt: skip
        timer.summary(sum(a.n_tokens for a in answers), "tokens", samples=len(answers))
        return answers

    @staticmethod
    def forgetting(
        models: Mapping[str, str | os.PathLike],
        sft_data: str | os.PathLike | None,
        params: EvaluateParams,
        dpo: DpoParams,
    ) -> dict[str, DemoNll]:
        """:func:`alignpipe.evaluate.signals.forgetting` on SFT demonstrations with their images."""
        return forgetting(models, sft_data, params, dpo, schema.with_images(schema.SFT), vision_demo_nll)
