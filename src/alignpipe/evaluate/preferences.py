"""Evaluation on a held-out preference split of your own (``evaluate.preferences``, e.g. HH-RLHF test).

``prepare`` reads the split (any format the data parts read), ``pairs`` writes it as it came to
``data/pairs/test.parquet`` and ``ref_logps`` caches its reference (SFT) log-probs with the train and
eval pairs, so the only model run here is the DPO policy on the split. Per pair, with the summed
completion log-probs ``log p(c)``, ``log p(r)`` and the log-ratios against the reference
``ρ_c = log p(c) − log p_ref(c)``, ``ρ_r = log p(r) − log p_ref(r)``, each model gets:

- ``preference_accuracy``: the fraction of pairs with ``β (ρ_c − ρ_r) > 0`` (a margin under
  ``MARGIN_TIE``, fp32 noise, is a tie and counts as a miss, as for the eval pairs);
- ``reward_margin``: the mean of ``β (ρ_c − ρ_r)``, DPO's implicit-reward margin (β = ``dpo.beta``);
- ``chosen_up_rejected_down``: the fraction of pairs with ``ρ_c > 0`` and ``ρ_r < 0`` (both beyond
  ``MARGIN_TIE``): chosen got more likely and rejected less likely than under the reference;
- ``logp_accuracy``: the fraction with ``log p(c) > log p(r)``, no reference involved.

The SFT row: SFT *is* the reference, so its log-ratios are 0 and ``reward_margin`` and
``chosen_up_rejected_down`` are 0 by definition. Its ``preference_accuracy`` is therefore taken on
its own log-probs (``log p_SFT(c) > log p_SFT(r)``, the cached reference values), which is also its
``logp_accuracy``: how often SFT already prefers the chosen answer, the baseline DPO's accuracy
improves on. Under ``dpo.reference_free`` the cache holds zeros (no SFT log-probs): the SFT row is
null and DPO's log-ratios are its log-probs themselves, as it was trained.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from alignpipe.artifacts import schema
from alignpipe.artifacts.io import read_parquet
from alignpipe.artifacts.pairs import DPO_LENGTH_KEYS, count_truncation
from alignpipe.artifacts.ref_logps import PairScores
from alignpipe.core.progress import Timer
from alignpipe.evaluate.logps import TEXT, Scoring
from alignpipe.params import DpoParams, EvaluateParams

MARGIN_TIE = 1e-5  # as alignpipe.evaluate.compare.MARGIN_TIE: |value| below it is fp32 noise, a tie
FIGURES = ("preference_accuracy", "reward_margin", "chosen_up_rejected_down", "logp_accuracy")
SFT_REFERENCE = (
    "SFT is the reference: log-ratios 0, so reward_margin and chosen_up_rejected_down are 0 by definition; "
    "preference_accuracy is its own log p(chosen) > log p(rejected) (the cached reference log-probs)"
)


def _mean(mask: torch.Tensor) -> float:
    return mask.double().mean().item()


def policy_figures(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> dict[str, float]:
    """The four figures of a policy against its reference, from summed log-probs (N,) each."""
    ratio_c = chosen.double() - ref_chosen.double()
    ratio_r = rejected.double() - ref_rejected.double()
    margin = beta * (ratio_c - ratio_r)
    return {
        "preference_accuracy": _mean(margin > MARGIN_TIE),
        "reward_margin": margin.mean().item(),
        "chosen_up_rejected_down": _mean((ratio_c > MARGIN_TIE) & (ratio_r < -MARGIN_TIE)),
        "logp_accuracy": _mean(chosen.double() > rejected.double()),
    }


def sft_figures(ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> dict[str, float | None]:
    """The SFT row (SFT is the reference; see the module docstring); null when the cache is all zeros."""
    if not (ref_chosen.any() or ref_rejected.any()):  # dpo.reference_free: no SFT log-probs were computed
        return dict.fromkeys(FIGURES)
    accuracy = _mean(ref_chosen.double() > ref_rejected.double())
    return {"preference_accuracy": accuracy, "reward_margin": 0.0, "chosen_up_rejected_down": 0.0,
            "logp_accuracy": accuracy}  # fmt: skip


def preference_split(
    dpo_dir: str | os.PathLike,
    split_path: str | os.PathLike,
    ref_logps_path: str | os.PathLike,
    params: EvaluateParams,
    dpo: DpoParams,
    scoring: Scoring = TEXT,
) -> dict[str, Any] | None:
    """eval.json's ``preferences``: the figures of SFT and DPO on the split (None: no split rows).

    ``scoring``: how the DPO model is loaded and the split read and scored (a VLM's adds the images).
    """
    split_path = Path(split_path)
    if not read_parquet(split_path, schema.PAIRS):
        return None
    timer = Timer("evaluate: preference split")
    with scoring.load(dpo_dir, params.dtype) as loaded:
        pairs = scoring.read_pairs(loaded, split_path, dpo)
        ref = PairScores.read(ref_logps_path).aligned(pairs, where=str(ref_logps_path))
        policy = scoring.pair_scores(loaded, pairs, params, "split")
    del loaded
    truncation = count_truncation(pairs)
    truncation.warn("evaluate", "preference-split pairs", DPO_LENGTH_KEYS)
    timer.summary(2 * len(pairs), "sequences")
    return {
        "source": params.preferences.source,
        "pairs": len(pairs),
        "beta": dpo.beta,
        "sft": sft_figures(ref.chosen, ref.rejected),
        "dpo": policy_figures(policy.chosen, policy.rejected, ref.chosen, ref.rejected, dpo.beta),
        "reference": {"sft": SFT_REFERENCE, "dpo": "SFT (data/ref_logps.parquet, the ref_logps stage)"},
        "truncation": truncation.as_dict(),
    }


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(section: dict[str, Any] | None) -> list[str]:
    """The report's lines for the split (none without one)."""
    if not section:
        return []
    labels = {
        "preference_accuracy": "preference accuracy (β margin > 0)",
        "reward_margin": "mean reward margin β[(log-ratio c) − (log-ratio r)]",
        "chosen_up_rejected_down": "chosen more likely and rejected less likely",
        "logp_accuracy": "log p(chosen) > log p(rejected)",
    }
    lines = [
        f"## Preference split ({section['pairs']} pairs of `{section['source']}`)",
        "",
        "| metric | SFT | DPO |",
        "|---|---|---|",
        *(f"| {labels[k]} | {_cell(section['sft'][k])} | {_cell(section['dpo'][k])} |" for k in FIGURES),
        "",
        f"Log-ratios are against the reference, the SFT model (cached log-probs), with β = {section['beta']}. "
        "SFT is that reference, so its margin and up/down fraction are 0 by definition; its accuracy is "
        "its own log p(chosen) > log p(rejected).",
        "",
    ]
    return lines
