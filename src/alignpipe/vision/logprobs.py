"""The log-prob path of :mod:`alignpipe.core.logprobs` with pixel inputs (vision-language models).

A pair's chosen and rejected sequences share their prompt and its images. Each image goes through the
vision tower once per pair: the features of a batch's images are computed in one call, then copied
into the embeddings at every placeholder position that shows them (twice per pair in padded and
packed layouts, once in the shared-prompt layout, where the prompt itself appears once). The text
layouts are :func:`alignpipe.core.logprobs.collate_pairs`'s, unchanged; the language model then runs
on ``inputs_embeds`` with the same positions, masks and shared-prompt segments as a text model.

Stages dispatch once, on the model folder (:func:`alignpipe.vision.models.model_folder_kind`): nothing
here runs for a text model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet
from alignpipe.artifacts.pairs import EncodedPair, PairDataError
from alignpipe.artifacts.ref_logps import PairScores
from alignpipe.core.attention import NAME, common_prefix, register
from alignpipe.core.chat import ChatTemplateError, TruncationError
from alignpipe.core.logprobs import (
    CompletionScorer,
    PairBatch,
    PairLogps,
    _layout,
    _logits_transform,
    _row_starts,
    _scored_positions,
    collate_pairs,
    length_sorted_batches,
    pack_row_tokens,
    pair_logps,
    shares_prompt,
)
from alignpipe.core.router import router_aux_loss, router_inputs
from alignpipe.vision.models import (
    VisionEncoded,
    encode_vision_completion,
    image_token_id,
    load_image_text_model,
)


@dataclass(frozen=True)
class VisionPair(EncodedPair):
    """An encoded pair with its prompt's image inputs (one image batch per pair, both sides share it)."""

    pixel_inputs: dict[str, Tensor] = field(default_factory=dict)
    n_images: int = 0


def encode_vision_pair(
    processor: Any, row: Mapping[str, Any], max_length: int, where: str = "pairs"
) -> VisionPair:
    """Encode a pairs row with an ``images`` column (prompt messages, one assistant message each side)."""
    pair_id = str(row["pair_id"])
    where = f"{where}: pair {pair_id}"
    images = row.get("images") or []
    try:
        chosen, rejected = (
            encode_vision_completion(processor, row["prompt"], row[side], images, max_length)
            for side in ("chosen", "rejected")
        )
    except (ChatTemplateError, TruncationError) as exc:
        raise PairDataError(f"{where}: {exc} (dpo.max_length={max_length})") from None
    if chosen.encoded.prompt_ids != rejected.encoded.prompt_ids:
        raise PairDataError(f"{where}: the prompt renders differently before its two answers")
    return VisionPair(pair_id, chosen.encoded, rejected.encoded, chosen.pixel_inputs, len(images))


@dataclass(frozen=True)
class VisionPairBatch:
    """A :class:`PairBatch` and its images: ``pixel_inputs`` (the processor's, concatenated over pairs);
    ``image_index`` (M,) flat positions in ``input_ids`` of the image placeholders and ``feature_index``
    (M,) the row of the batch's image features each receives."""

    batch: PairBatch
    pixel_inputs: dict[str, Tensor]
    image_index: Tensor
    feature_index: Tensor

    def to(self, device: torch.device | str) -> VisionPairBatch:
        pixels = {k: v.to(device) for k, v in self.pixel_inputs.items()}
        return VisionPairBatch(
            self.batch.to(device), pixels, self.image_index.to(device), self.feature_index.to(device)
        )

    def image_inputs(self) -> dict[str, Tensor]:
        """What :class:`VisionCompletionScorer` takes besides the text tensors."""
        return {"image_index": self.image_index, "feature_index": self.feature_index, **self.pixel_inputs}


def _sequence_starts(pairs: Sequence[EncodedPair], padding_free: bool, row_tokens: int | None, share: bool) -> list[int]:  # fmt: skip
    """Flat start of each of the 2B sequences (chosen first), as :func:`collate_pairs` lays them out; in the
    shared-prompt layout a pair's rejected side starts where its chosen one does (same prefix)."""
    if padding_free and share:
        starts, at = [], 0
        for p in pairs:
            starts.append(at)
            at += (
                len(p.chosen.input_ids)
                + len(p.rejected.input_ids)
                - common_prefix(p.chosen.input_ids, p.rejected.input_ids)
            )
        return starts + starts
    lengths = [len(p.chosen.input_ids) for p in pairs] + [len(p.rejected.input_ids) for p in pairs]
    return _row_starts(lengths, padding_free, row_tokens)[2]


def collate_vision_pairs(
    pairs: Sequence[VisionPair],
    padding_free: bool,
    pad_token_id: int,
    image_token: int,
    row_tokens: int | None = None,
    share_prompt: bool = False,
) -> VisionPairBatch:
    """:func:`collate_pairs`' layout of ``pairs`` plus where each image feature goes. The shared-prompt
    layout needs each pair's image placeholders inside the two sides' common prefix (they are in the
    prompt, which both share), so the rejected side reads the features the chosen side placed."""
    batch = collate_pairs(pairs, padding_free, pad_token_id, row_tokens, share_prompt)
    share = padding_free and share_prompt
    starts = _sequence_starts(pairs, padding_free, row_tokens, share)
    b, offsets, at = len(pairs), [], 0
    local = []
    for p in pairs:
        positions = [i for i, t in enumerate(p.chosen.prompt_ids) if t == image_token]
        local.append(positions)
        offsets.append(at)
        at += len(positions)
    image_index, feature_index = [], []
    for i in range(b if share else 2 * b):
        j = i % b
        image_index += [starts[i] + k for k in local[j]]
        feature_index += range(offsets[j], offsets[j] + len(local[j]))
    keys = {k for p in pairs for k in p.pixel_inputs}
    pixels = {k: torch.cat([p.pixel_inputs[k] for p in pairs if k in p.pixel_inputs]) for k in sorted(keys)}
    return VisionPairBatch(batch, pixels, torch.tensor(image_index, dtype=torch.long),
                           torch.tensor(feature_index, dtype=torch.long))  # fmt: skip


def enable_vision_shared_prompt(model: Any) -> bool:
    """Switch a VLM's language model (on sdpa, no sliding window or soft-capping) to the shared-prompt
    attention; the vision tower keeps its own. False where it does not apply."""
    text = model.config.get_text_config()
    if text._attn_implementation == NAME:
        return True
    if (
        text._attn_implementation != "sdpa"
        or getattr(text, "sliding_window", None) is not None
        or getattr(text, "attn_logit_softcapping", None) is not None
        or not model._can_set_attn_implementation()
    ):
        return False
    register()
    key = next(k for k, sub in model.config.sub_configs.items() if getattr(model.config, k) is text and sub)
    model.set_attn_implementation({key: NAME})
    return model.config.get_text_config()._attn_implementation == NAME


def _features(model: Any, pixel_inputs: dict[str, Tensor]) -> Tensor:
    """(n image tokens of the batch, hidden): the projected features of every image, in order."""
    out = model.get_image_features(**pixel_inputs)
    features = getattr(out, "pooler_output", out)
    if isinstance(features, list | tuple):
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])


class VisionCompletionScorer(CompletionScorer):
    """A :class:`CompletionScorer` of a VLM: image features go into the embeddings at their placeholders,
    then the language model and the chunked LM head run as for text."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._transform = _logits_transform(self.causal_lm.config.get_text_config())
        self.shares_prompt = enable_vision_shared_prompt(self.causal_lm)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None,
        predict_index: Tensor,
        target_ids: Tensor,
        aligned: bool = False,
        segments: Any = None,
        image_index: Tensor | None = None,
        feature_index: Tensor | None = None,
        **pixel_inputs: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        lm = self.causal_lm
        embeds = lm.get_input_embeddings()(input_ids)
        if image_index is not None and image_index.numel():
            features = _features(lm, pixel_inputs).to(embeds.dtype)[feature_index]
            flat = embeds.reshape(-1, embeds.shape[-1]).index_copy(0, image_index, features)
            embeds = flat.view_as(embeds)
        extra = router_inputs(self.route) | ({} if segments is None else {"pair_segments": segments})
        out = lm.get_decoder()(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                               use_cache=False, **extra)  # fmt: skip
        self.aux_loss = router_aux_loss(out, lm, attention_mask) if self.route else None
        flat = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        return self._head(flat[predict_index], target_ids, aligned)


def vision_reference_scorer(model_dir: Path, numerics: Any, device: Any) -> VisionCompletionScorer:
    """A frozen scorer of the VLM at ``model_dir`` in ``numerics``' weights (a
    :class:`alignpipe.training.numerics.Numerics`; run it under its context): ``ref_logps`` and dpo's
    live reference."""
    if numerics.load_in_4bit:
        raise ValueError(f"{model_dir}: a 4-bit base (dpo.peft.load_in_4bit) is not supported on a VLM yet")
    scorer = VisionCompletionScorer(load_image_text_model(model_dir, numerics.weights, device)).eval()
    scorer.requires_grad_(False)
    return scorer


def vision_pair_logps(scorer: nn.Module, batch: VisionPairBatch, aligned: bool = False) -> PairLogps:
    """Summed completion log-probs of every pair of ``batch`` under a :class:`VisionCompletionScorer`."""
    return pair_logps(scorer, batch.batch, aligned, **batch.image_inputs())


def scorer_image_token(scorer: nn.Module) -> int:
    inner = getattr(scorer, "module", scorer)
    return image_token_id(inner.causal_lm)


def read_vision_pairs(path: Path, processor: Any, max_length: int) -> list[VisionPair]:
    """Read and encode a pairs parquet file with an ``images`` column (PAIRS + images); ids unique."""
    rows = read_parquet(path, schema.with_images(schema.PAIRS))
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if row["pair_id"] in seen:
            raise PairDataError(f"{path}: row {i}: field 'pair_id': duplicate id {row['pair_id']!r}")
        seen.add(row["pair_id"])
    return [encode_vision_pair(processor, row, max_length, where=str(path)) for row in rows]


@torch.inference_mode()
def vision_pair_scores(
    scorer: VisionCompletionScorer,
    pairs: Sequence[VisionPair],
    batch_size: int,
    pad_token_id: int,
    padding_free: bool = True,
    share_prompt: bool = True,
) -> PairScores:
    """:func:`alignpipe.core.logprobs.pair_scores` for VLM pairs: summed completion log-probs of ``pairs``
    (in their order) under a frozen scorer, length-sorted batches, each pair's images through the tower once."""
    device = next(scorer.parameters()).device
    row_tokens, share = pack_row_tokens(scorer), share_prompt and shares_prompt(scorer)
    image_token = scorer_image_token(scorer)
    found: dict[str, tuple[float, float, int, int]] = {}
    for index in length_sorted_batches(pairs, batch_size):
        chunk = [pairs[i] for i in index]
        batch = collate_vision_pairs(chunk, padding_free, pad_token_id, image_token, row_tokens, share).to(
            device
        )
        out = vision_pair_logps(scorer, batch)
        sides = (out.chosen_logps, out.rejected_logps, out.chosen_tokens, out.rejected_tokens)
        found.update(zip(batch.batch.pair_ids, zip(*(t.tolist() for t in sides), strict=True), strict=True))
    return PairScores.from_rows([p.pair_id for p in pairs], [found[p.pair_id] for p in pairs])


def collate_vision_sequences(
    seqs: Sequence[VisionEncoded], pad_token_id: int, image_token: int, row_tokens: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Single sequences with their images, padding-free as :func:`alignpipe.core.logprobs.sequence_logps`
    lays them out: (input_ids, position_ids, predict_index, target_ids, sequence_index, image inputs of
    :class:`VisionCompletionScorer`); each sequence's images go through the tower once."""
    encoded = [s.encoded for s in seqs]
    input_ids, position_ids, _, where = _layout(encoded, True, pad_token_id, row_tokens)
    predict, targets, seq_index = _scored_positions(encoded, where)
    image_index: list[int] = []
    for enc, at in zip(encoded, where, strict=True):
        image_index += [int(at[k]) for k, t in enumerate(enc.prompt_ids) if t == image_token]
    keys = sorted({k for s in seqs for k in s.pixel_inputs})
    pixels = {k: torch.cat([s.pixel_inputs[k] for s in seqs if k in s.pixel_inputs]) for k in keys}
    image = {"image_index": torch.tensor(image_index, dtype=torch.long),
             "feature_index": torch.arange(len(image_index)), **pixels}  # fmt: skip
    return input_ids, position_ids, predict, targets, seq_index, image


@torch.inference_mode()
def vision_sequence_logps(
    scorer: VisionCompletionScorer, seqs: Sequence[VisionEncoded], batch_size: int, pad_token_id: int
) -> Tensor:
    """Summed completion log-prob (float64, (S,)) of each sequence with its images, in ``seqs`` order, under
    a frozen scorer: :func:`alignpipe.core.logprobs.sequence_logps` with pixel inputs."""
    device = next(scorer.parameters()).device
    row_tokens, image_token = pack_row_tokens(scorer), scorer_image_token(scorer)
    out = torch.zeros(len(seqs), dtype=torch.float64)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].encoded.input_ids))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        ids, pos, predict, targets, seq_index, image = collate_vision_sequences(
            [seqs[i] for i in index], pad_token_id, image_token, row_tokens
        )
        image = {k: v.to(device) for k, v in image.items()}
        token_logps, _ = scorer(ids.to(device), pos.to(device), None, predict.to(device), targets.to(device),
                                **image)  # fmt: skip
        sums = torch.zeros(len(index), dtype=token_logps.dtype, device=device)
        out[index] = sums.index_add(0, seq_index.to(device), token_logps).double().cpu()
    return out
