"""The one tokenization and log-prob path shared by ``ref_logps``, ``dpo`` and ``evaluate``.

Pairs are encoded by :mod:`alignpipe.artifacts.pairs`. A batch of B pairs goes through the model
in one forward: sequences ``0..B-1`` are the chosen completions, ``B..2B-1`` the rejected ones.

- Padding-free (``padding_free=True``): sequences are concatenated into a row,
  ``position_ids`` restart at 0 for each sequence and ``attention_mask`` is None;
  transformers 5 then builds a block-diagonal causal mask from the position ids
  (``masking_utils.find_packed_sequence_indices``; flash attention uses them as
  varlen boundaries). A 2D attention mask would switch that detection off. Under
  flash attention all 2B sequences share one row; under sdpa/eager the mask is dense
  over the row, so sequences are binned into rows no longer than the longest one
  (one row of 1112 tokens took 1.1-1.9x the time of 15 binned rows of 99 tokens,
  135M model fwd+bwd on CPU).
- Padded: 2B right-padded rows with an attention mask.
- Shared prompt (``share_prompt=True``, models on sdpa, see :mod:`alignpipe.core.attention`): each pair
  is laid out once as ``[prompt][chosen tail][rejected tail]`` in one row, and the prompt goes
  through the model once for both sides (15-20% fewer tokens with prompts at 30% of a sequence).

Only the hidden states that predict a completion token reach the LM head, in
chunks of at most :data:`LOGIT_BUDGET` logits, so no float32 log-softmax over the
vocabulary is ever held for the whole batch: each token's log-prob is its logit
minus the logsumexp of its row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from alignpipe.artifacts.pairs import EncodedPair
from alignpipe.artifacts.ref_logps import PairScores
from alignpipe.core.attention import Segments, common_prefix, enable_shared_prompt
from alignpipe.core.chat import Encoded
from alignpipe.core.router import router_aux_loss, router_inputs

# Logits held at once per chunk: 2**26 floats = 256 MiB in float32 (1365 tokens of a 49k vocabulary).
LOGIT_BUDGET = 2**26


@dataclass(frozen=True)
class PairBatch:
    """Token tensors of B pairs (2B sequences: chosen first, then rejected) for one forward pass.

    ``predict_index`` (N,) are flat indices into ``input_ids.view(-1)`` of the positions whose
    hidden state predicts a completion token; ``target_ids`` (N,) are those tokens and
    ``sequence_index`` (N,) the sequence (0..2B-1) each belongs to.
    """

    pair_ids: list[str]
    input_ids: Tensor  # (R, T): R = 1 packed, R = 2B padded
    position_ids: Tensor  # (R, T)
    attention_mask: Tensor | None  # (R, T); None when packed
    predict_index: Tensor  # (N,)
    target_ids: Tensor  # (N,)
    sequence_index: Tensor  # (N,)
    completion_tokens: Tensor  # (2B,) scored tokens per sequence
    n_tokens: int  # real (non-padding) tokens of the 2B sequences
    segments: Segments | None = None  # shared-prompt layout: (prefix, chosen tail, rejected tail) per pair

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

    def to(self, device: torch.device | str) -> PairBatch:
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
            for f in fields(self)
        }
        return PairBatch(**moved)


def _row_starts(lengths: list[int], padding_free: bool, row_tokens: int | None) -> tuple[int, int, list[int]]:
    """(rows, row length, flat start of each sequence) of a padded, one-row or binned layout.

    Binned (``row_tokens`` set): first-fit decreasing into rows of ``max(row_tokens, longest)``
    tokens, so attention over a row (quadratic under sdpa/eager masks) never spans the whole batch.
    """
    longest = max(lengths)
    if not padding_free:
        return len(lengths), longest, [i * longest for i in range(len(lengths))]
    if row_tokens is None:
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        return 1, sum(lengths), starts
    capacity, fill, where = max(row_tokens, longest), [], {}
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= capacity), len(fill))
        fill += [0] if row == len(fill) else []
        where[i], fill[row] = (row, fill[row]), fill[row] + lengths[i]
    row_len = max(fill)
    return len(fill), row_len, [where[i][0] * row_len + where[i][1] for i in range(len(lengths))]


def collate_pairs(
    pairs: Sequence[EncodedPair],
    padding_free: bool,
    pad_token_id: int,
    row_tokens: int | None = None,
    share_prompt: bool = False,
) -> PairBatch:
    """Stack B encoded pairs into one :class:`PairBatch`: padded rows, or padding-free (one row, or
    rows of ``row_tokens`` when set; see :func:`pack_row_tokens`), or with ``padding_free`` and
    ``share_prompt`` one row where each pair's common prefix appears once (see :func:`shares_prompt`)."""
    if padding_free and share_prompt:
        return _collate_shared(pairs)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    input_ids, position_ids, attention_mask, where = _layout(seqs, padding_free, pad_token_id, row_tokens)
    return _pair_batch(pairs, where, input_ids, position_ids, attention_mask)


def _layout(
    seqs: Sequence[Encoded], padding_free: bool, pad_token_id: int, row_tokens: int | None
) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor]]:
    """``seqs`` laid out in padded rows or padding-free rows: (input_ids, position_ids, attention_mask,
    the flat index of every token of each sequence)."""
    n_rows, row_len, starts = _row_starts([len(s.input_ids) for s in seqs], padding_free, row_tokens)
    input_ids = torch.full((n_rows, row_len), pad_token_id, dtype=torch.long)
    # a row's unused tail keeps arbitrary positions: it is never scored and, being last, never attended to
    position_ids = torch.arange(row_len).repeat(n_rows, 1)
    attention_mask = None if padding_free else torch.zeros((n_rows, row_len), dtype=torch.long)
    flat_input, flat_pos = input_ids.view(-1), position_ids.view(-1)
    where = []
    for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        n = len(seq.input_ids)
        flat_input[start : start + n] = torch.tensor(seq.input_ids)
        flat_pos[start : start + n] = torch.arange(n)
        if attention_mask is not None:
            attention_mask[i, :n] = 1
        where.append(torch.arange(start, start + n))
    return input_ids, position_ids, attention_mask, where


def _collate_shared(pairs: Sequence[EncodedPair]) -> PairBatch:
    """One row of ``[common prefix][chosen tail][rejected tail]`` per pair; positions restart per side."""
    ids: list[int] = []
    positions: list[int] = []
    segments, where_chosen, where_rejected = [], [], []
    for pair in pairs:
        c, r = pair.chosen.input_ids, pair.rejected.input_ids
        s, start = common_prefix(c, r), len(ids)
        ids += c + r[s:]
        positions += list(range(len(c))) + list(range(s, len(r)))
        segments.append((s, len(c) - s, len(r) - s))
        where_chosen.append(torch.arange(start, start + len(c)))
        tail = torch.arange(start + len(c), start + len(c) + len(r) - s)
        where_rejected.append(torch.cat([torch.arange(start, start + s), tail]))
    where = where_chosen + where_rejected
    return _pair_batch(pairs, where, torch.tensor([ids]), torch.tensor([positions]), None, tuple(segments))


def _pair_batch(
    pairs: Sequence[EncodedPair],
    where: list[Tensor],
    input_ids: Tensor,
    position_ids: Tensor,
    attention_mask: Tensor | None,
    segments: Segments | None = None,
) -> PairBatch:
    """The :class:`PairBatch` of ``pairs`` laid out in ``input_ids``; ``where[i]`` holds the flat
    index of every token of sequence i (chosen sides first, then rejected)."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    predict, targets, seq_index = _scored_positions(seqs, where)
    return PairBatch(
        pair_ids=[p.pair_id for p in pairs],
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        predict_index=predict,
        target_ids=targets,
        sequence_index=seq_index,
        completion_tokens=torch.tensor([len(s.completion_ids) for s in seqs]),
        n_tokens=sum(len(s.input_ids) for s in seqs),
        segments=segments,
    )


def _scored_positions(seqs: Sequence[Encoded], where: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(predict_index, target_ids, sequence_index) of the completion tokens of ``seqs``."""
    predict, targets, seq_index = [], [], []
    for i, (seq, at) in enumerate(zip(seqs, where, strict=True)):
        p, c = len(seq.prompt_ids), len(seq.completion_ids)
        # the token at t - 1 predicts token t: completion tokens p..p+c-1 from positions p-1..p+c-2
        predict.append(at[p - 1 : p + c - 1])
        targets.append(torch.tensor(seq.completion_ids, dtype=torch.long))
        seq_index.append(torch.full((c,), i))
    return torch.cat(predict), torch.cat(targets), torch.cat(seq_index)


@dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs and scored token counts of B pairs, (B,) each.

    ``*_aligned_logps`` (only when asked, for WPO): summed ``log p(y_t) - log sum_v p(v)^2``.
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    chosen_aligned_logps: Tensor | None = None
    rejected_aligned_logps: Tensor | None = None


def _logits_transform(config: Any) -> Callable[[Tensor], Tensor]:
    """Post-LM-head scaling some architectures apply in their forward (Gemma 2/3, Granite, Cohere)."""
    cap = getattr(config, "final_logit_softcapping", None)
    divide = getattr(config, "logits_scaling", None)
    multiply = getattr(config, "logit_scale", None)

    def transform(logits: Tensor) -> Tensor:
        if multiply is not None:
            logits = logits * multiply
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


class CompletionScorer(nn.Module):
    """Wraps a causal LM (plain or peft) so that one ``forward`` returns per-token completion log-probs.

    Being a module, it is what ``accelerator.prepare`` wraps (DDP, FSDP, DeepSpeed), so the decoder and
    the chunked LM head run inside the wrapper's forward. A model on sdpa is switched to
    :mod:`alignpipe.core.attention` (sdpa itself unless a batch has shared-prompt segments)."""

    def __init__(
        self, model: nn.Module, logit_budget: int = LOGIT_BUDGET, head_all_positions: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.logit_budget = logit_budget
        self._transform = _logits_transform(self.causal_lm.config)
        self.shares_prompt = enable_shared_prompt(self.causal_lm)
        self._no_split_modules = getattr(self.causal_lm, "_no_split_modules", None)  # FSDP wraps these
        self.route, self.aux_loss = False, None  # MoE router loss (alignpipe.core.router)
        self.head_all_positions = head_all_positions  # the LM head over every position (an ablation)

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers model (under a peft wrapper, the one its adapters are injected into)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None,
        predict_index: Tensor,
        target_ids: Tensor,
        aligned: bool = False,
        segments: Segments | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Log-probs (N,) float32 of ``target_ids`` at ``predict_index``; and aligned ones when asked."""
        extra = router_inputs(self.route) | ({} if segments is None else {"pair_segments": segments})
        out = self.causal_lm.get_decoder()(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **extra,
        )
        self.aux_loss = router_aux_loss(out, self.causal_lm, attention_mask) if self.route else None
        flat = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        if not self.head_all_positions:  # only the positions that predict a completion token
            return self._head(flat[predict_index], target_ids, aligned)
        # the ablation: the head over every position (as a plain implementation), then the scored rows
        return self._chunk(flat, target_ids, aligned, predict_index)

    def _head(self, hidden: Tensor, targets: Tensor, aligned: bool) -> tuple[Tensor, Tensor | None]:
        c = max(1, self.logit_budget // self.causal_lm.config.get_text_config().vocab_size)  # ZeRO-3: [0]
        if hidden.shape[0] <= c:
            return self._chunk(hidden, targets, aligned)
        # recompute each chunk's logits in backward: only the hidden states stay in memory
        parts = [checkpoint(self._chunk, hidden[s : s + c], targets[s : s + c], aligned, use_reentrant=False)
                 for s in range(0, hidden.shape[0], c)]  # fmt: skip
        logps = torch.cat([p[0] for p in parts])
        return logps, (torch.cat([p[1] for p in parts]) if aligned else None)

    def _chunk(self, hidden: Tensor, targets: Tensor, aligned: bool, rows: Tensor | None = None) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        logits = self._transform(self.causal_lm.get_output_embeddings()(hidden)).float()
        logits = logits if rows is None else logits[rows]
        lse = torch.logsumexp(logits, dim=-1)
        logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
        if not aligned:
            return logps, None
        with torch.no_grad():  # WPO weights are constants
            log_sum_p2 = torch.logsumexp(2 * logits, dim=-1) - 2 * lse
        return logps, logps.detach() - log_sum_p2


def pair_logps(scorer: nn.Module, batch: PairBatch, aligned: bool = False, **inputs: Tensor) -> PairLogps:
    """Summed completion log-probs of every pair of ``batch`` under ``scorer`` (a CompletionScorer);
    ``inputs``: a VLM scorer's image inputs (:mod:`alignpipe.vision.logprobs`)."""
    ids = (batch.input_ids, batch.position_ids, batch.attention_mask, batch.predict_index, batch.target_ids)
    token_logps, token_aligned = scorer(*ids, aligned, batch.segments, **inputs)
    b = batch.n_pairs

    def per_sequence(values: Tensor) -> Tensor:
        return torch.zeros(2 * b, dtype=values.dtype, device=values.device).index_add(
            0, batch.sequence_index, values
        )

    sums = per_sequence(token_logps)
    aligned_sums = per_sequence(token_aligned) if token_aligned is not None else None
    tokens = batch.completion_tokens
    return PairLogps(
        chosen_logps=sums[:b],
        rejected_logps=sums[b:],
        chosen_tokens=tokens[:b],
        rejected_tokens=tokens[b:],
        chosen_aligned_logps=aligned_sums[:b] if aligned_sums is not None else None,
        rejected_aligned_logps=aligned_sums[b:] if aligned_sums is not None else None,
    )


def pack_row_tokens(scorer: CompletionScorer) -> int | None:
    """Row capacity for padding-free batches of ``scorer``'s model: one row (None) under flash
    attention, whose varlen kernels cost per sequence; otherwise rows no longer than the longest
    sequence (0), since sdpa/eager attend over a dense block-diagonal mask of the whole row."""
    impl = str(getattr(scorer.causal_lm.config, "_attn_implementation", "") or "")
    return None if "flash" in impl else 0


def shares_prompt(scorer: nn.Module) -> bool:
    """Whether ``scorer`` (a CompletionScorer, possibly wrapped) takes shared-prompt batches."""
    inner = getattr(scorer, "module", scorer)
    return bool(getattr(inner, "shares_prompt", False))


def load_reference(path: str | Path, dtype: str, device: torch.device) -> CompletionScorer:
    """A frozen scorer (eval mode, no grads) of the model at ``path`` in ``dtype`` (no autocast: the weights'
    dtype); :func:`alignpipe.training.numerics.reference_scorer` loads it as the dpo policy computes."""
    from alignpipe.core.models import load_causal_lm

    scorer = CompletionScorer(load_causal_lm(path, dtype=dtype, device=device)).eval()
    scorer.requires_grad_(False)
    return scorer


def length_sorted_batches(pairs: Sequence[EncodedPair], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``pairs`` in batches of similar length, longest first (fails fast on memory)."""
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].n_tokens)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.inference_mode()
def pair_scores(
    scorer: CompletionScorer,
    pairs: Sequence[EncodedPair],
    batch_size: int,
    pad_token_id: int,
    padding_free: bool = True,
    progress: bool = False,
    desc: str = "ref_logps",
    share_prompt: bool = True,
) -> PairScores:
    """Summed completion log-probs of ``pairs`` (in their order) under a frozen scorer in eval mode."""
    from tqdm.auto import tqdm

    device = next(scorer.parameters()).device
    row_tokens, share = pack_row_tokens(scorer), share_prompt and shares_prompt(scorer)
    found: dict[str, tuple[float, float, int, int]] = {}
    with tqdm(total=len(pairs), unit="pair", desc=desc, disable=not progress) as bar:
        for index in length_sorted_batches(pairs, batch_size):
            chunk = [pairs[i] for i in index]
            batch = collate_pairs(chunk, padding_free, pad_token_id, row_tokens, share).to(device)
            out = pair_logps(scorer, batch)
            sides = (out.chosen_logps, out.rejected_logps, out.chosen_tokens, out.rejected_tokens)
            values = zip(*(t.tolist() for t in sides), strict=True)
            found.update(zip(batch.pair_ids, values, strict=True))
            bar.update(len(index))
    return PairScores.from_rows([p.pair_id for p in pairs], [found[p.pair_id] for p in pairs])


@torch.inference_mode()
def sequence_logps(
    scorer: CompletionScorer,
    seqs: Sequence[Encoded],
    batch_size: int,
    pad_token_id: int,
    progress: bool = False,
    desc: str = "logps",
) -> Tensor:
    """Summed completion log-prob (float64, (S,)) of each sequence, in ``seqs`` order, under a frozen
    scorer: length-sorted padding-free batches, rows as :func:`pack_row_tokens` gives them."""
    from tqdm.auto import tqdm

    device = next(scorer.parameters()).device
    row_tokens = pack_row_tokens(scorer)
    out = torch.zeros(len(seqs), dtype=torch.float64)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].input_ids))
    with tqdm(total=len(seqs), unit="seq", desc=desc, disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            chunk = [seqs[i] for i in index]
            input_ids, position_ids, _, where = _layout(chunk, True, pad_token_id, row_tokens)
            predict, targets, seq_index = _scored_positions(chunk, where)
            token_logps, _ = scorer(
                input_ids.to(device), position_ids.to(device), None, predict.to(device), targets.to(device)
            )
            sums = torch.zeros(len(chunk), dtype=token_logps.dtype, device=device)
            out[index] = sums.index_add(0, seq_index.to(device), token_logps).double().cpu()
            bar.update(len(index))
    return out
