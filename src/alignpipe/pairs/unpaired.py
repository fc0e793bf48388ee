"""Unpaired (KTO) examples from the N scored samples of each prompt: each sample with its own label.

Per prompt, each sample is counted under the first step that removes it:

1. ``truncated``: cut by the length limit (``finish_reason == "length"``), unless
   ``pairs.allow_truncated``;
2. ``empty``: a completion with no text but whitespace (always);
3. the label, by ``pairs.unpaired.label``:

   - ``threshold``: reward >= ``threshold`` is desirable, below it undesirable;
   - ``verifier``: the built-in task's verifier passes every constraint of the prompt's spec
     (``verify(spec, completion).score == 1``, whatever reward scored it) is desirable, else
     undesirable; a prompt without a built-in spec is an error;
   - ``quantile``: by percentile rank among the prompt's samples left after 1-2,
     ``p = (below + (equal - 1) / 2) / (n - 1)``, where ``below`` counts the samples with a lower
     reward and ``equal`` those with the same reward (itself included): 0 for the worst, 1 for the
     best, and tied samples share the mean of their ranks. ``p > 1 - q`` is desirable, ``p < q``
     undesirable, the rest is dropped (``middle``). With distinct rewards that labels the top and
     the bottom ceil(q (n - 1)) samples (n = 4, q = 0.5: two and two; n = 5: two and two, the
     median dropped). Ties at the cut: a tie group has one p, so it is labelled or dropped whole,
     never split: rewards [1, 1, 1, 0] give p = 2/3 to the ones (desirable at q = 0.5, dropped at
     q = 0.25) and p = 0 to the zero (undesirable). A prompt whose samples all tie has p = 1/2
     everywhere and gives no signal: its samples count as ``tied`` (and the prompt under
     ``prompts_all_tied``); a prompt left with one sample has no rank (``single``);
4. ``min_chosen_reward``: a desirable sample whose reward is below ``pairs.min_chosen_reward`` (the
   pairs' floor on the chosen side; null: off);
5. ``similarity``: a completion near-identical (``pairs.max_similarity``, the pairs' difflib ratio)
   to one already kept for the same prompt and the same label, in sample_idx order.

User rows (``data/prepared/unpaired.parquet``) join unfiltered (source "user", reward null).
The split follows the pairs': a prompt that has pairs is on its pairs' side (the eval prompts of
``data/pairs`` are eval prompts here); the other prompts are split among themselves the way the
pairs are, by hash of (seed, prompt_id), the first round(eval_fraction * n) of them eval.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

from alignpipe.data.builtin import verify
from alignpipe.pairs.build import (
    Sample,
    prompt_key,
    prompt_order,
    samples_of,
    similarity_at_least,
    user_prompt_id,
)
from alignpipe.params import PairsParams

# What removes a sample, in the order the steps run, and the param behind it (for the report).
REMOVED: dict[str, str] = {
    "truncated": "pairs.allow_truncated",
    "empty": "(always)",
    "single": "pairs.unpaired.label: quantile (one sample has no rank)",
    "tied": "pairs.unpaired.label: quantile (all of the prompt's samples tie)",
    "middle": "pairs.unpaired.quantile",
    "min_chosen_reward": "pairs.min_chosen_reward (on desirable samples)",
    "similarity": "pairs.max_similarity",
}
Labelled = tuple[Sample, bool]  # a sample and its label (true: desirable)


class UnpairedError(ValueError):
    """The samples cannot be labelled as asked (a verifier label without a built-in spec)."""


def quantile_labels(samples: list[Sample], q: float, removed: Counter[str]) -> list[Labelled]:
    """Label by percentile rank within the prompt (see the module doc); exact arithmetic, no float fuzz."""
    n = len(samples)
    if n == 1:
        removed["single"] += 1
        return []
    if len({s.reward for s in samples}) == 1:
        removed["tied"] += n
        return []
    cut = Fraction(q).limit_denominator(10**6)
    counts = Counter(s.reward for s in samples)
    out: list[Labelled] = []
    for s in samples:
        below = sum(c for r, c in counts.items() if r < s.reward)
        rank = Fraction(2 * below + counts[s.reward] - 1, 2 * (n - 1))
        if rank > 1 - cut:
            out.append((s, True))
        elif rank < cut:
            out.append((s, False))
        else:
            removed["middle"] += 1
    return out


def verifier_spec(prompt_id: str, meta: str | None) -> dict[str, Any]:
    """The built-in spec of a prompt, or a one-line error that says what to use instead."""
    if meta is None or not str(meta).strip():
        raise UnpairedError(
            f"pairs.unpaired.label 'verifier' needs built-in prompts (a constraint spec in the prompt's meta), "
            f"and prompt {prompt_id!r} has none; use label threshold or quantile for your own prompts"
        )
    try:
        spec = json.loads(meta)
    except json.JSONDecodeError as exc:
        raise UnpairedError(f"prompt {prompt_id!r}: meta is not a built-in spec (not JSON: {exc})") from None
    if not isinstance(spec, dict):
        raise UnpairedError(f"prompt {prompt_id!r}: meta is not a built-in spec object: {meta[:80]!r}")
    return spec


def label_samples(
    prompt_id: str, samples: list[Sample], meta: str | None, params: PairsParams, removed: Counter[str]
) -> list[Labelled]:
    """The labelled samples of one prompt (after the sample filters), by ``pairs.unpaired.label``."""
    rule = params.unpaired
    if rule.label == "quantile":
        return quantile_labels(samples, rule.quantile, removed)
    if rule.label == "threshold":
        assert rule.threshold is not None  # UnpairedParams checks it
        return [(s, s.reward >= rule.threshold) for s in samples]
    spec = verifier_spec(prompt_id, meta)
    try:
        return [(s, verify(spec, s.completion).score == 1) for s in samples]
    except ValueError as exc:
        raise UnpairedError(f"prompt {prompt_id!r}: the built-in spec is invalid ({exc})") from None


def drop_near_copies(
    labelled: list[Labelled], max_similarity: float, removed: Counter[str]
) -> list[Labelled]:
    """Keep a completion unless it is near-identical to one kept before it with the same label."""
    kept: list[Labelled] = []
    for sample, label in labelled:
        same = (s.completion for s, lab in kept if lab == label)
        if any(similarity_at_least(sample.completion, other, max_similarity) for other in same):
            removed["similarity"] += 1
        else:
            kept.append((sample, label))
    return kept


def examples_for_prompt(
    prompt_id: str, rows: list[dict[str, Any]], meta: str | None, params: PairsParams, removed: Counter[str]
) -> list[Labelled]:
    """One prompt's scored rows through the filters and the label rule (counts go to ``removed``)."""
    samples = samples_of(rows)
    if not params.allow_truncated:
        removed["truncated"] += sum(s.truncated for s in samples)
        samples = [s for s in samples if not s.truncated]
    removed["empty"] += sum(not s.completion.strip() for s in samples)
    samples = [s for s in samples if s.completion.strip()]
    if not samples:
        return []
    labelled = label_samples(prompt_id, samples, meta, params, removed)
    floor = params.min_chosen_reward
    if floor is not None:
        removed["min_chosen_reward"] += sum(label and s.reward < floor for s, label in labelled)
        labelled = [(s, label) for s, label in labelled if not (label and s.reward < floor)]
    return drop_near_copies(labelled, params.max_similarity, removed)


def example_row(prompt_id: str, prompt: list[dict[str, str]], sample: Sample, label: bool) -> dict[str, Any]:
    return {
        "example_id": f"{prompt_id}:{sample.idx}",
        "prompt_id": prompt_id,
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": sample.completion}],
        "label": label,
        "reward": sample.reward,
        "source": "generated",
    }


def user_example_rows(examples: list[dict[str, Any]], prompt_ids: dict[str, str]) -> list[dict[str, Any]]:
    """User rows as UNPAIRED rows; a prompt of prompts.parquet keeps its prompt_id (as user pairs do)."""
    return [
        {**ex, "prompt_id": user_prompt_id(ex["prompt"], prompt_ids), "reward": None, "source": "user"}
        for ex in examples
    ]


def eval_ids_like_pairs(
    prompt_ids: Iterable[str], pair_prompts: set[str], pair_eval: set[str], eval_fraction: float, seed: int
) -> set[str]:
    """Eval prompts: the pairs' eval prompts, plus round(eval_fraction * n) of the n prompts without pairs."""
    others = prompt_order(set(prompt_ids) - pair_prompts, seed)
    return pair_eval | set(others[: round(eval_fraction * len(others))])


def balance(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of one split: examples, desirable, undesirable, desirable fraction, prompts, user rows."""
    desirable = sum(r["label"] for r in rows)
    return {
        "examples": len(rows),
        "desirable": desirable,
        "undesirable": len(rows) - desirable,
        "desirable_fraction": desirable / len(rows) if rows else None,
        "prompts": len({r["prompt_id"] for r in rows}),
        "user": sum(r["source"] == "user" for r in rows),
    }


def per_prompt_stats(prompt_ids: Iterable[str], generated: list[dict[str, Any]]) -> dict[str, Any]:
    """How the generated examples spread over the scored prompts."""
    labels: dict[str, list[bool]] = {pid: [] for pid in prompt_ids}
    for r in generated:
        labels[r["prompt_id"]].append(r["label"])
    sizes = [len(v) for v in labels.values()]
    return {
        "prompts": len(labels),
        "with_examples": sum(n > 0 for n in sizes),
        "both_labels": sum(any(v) and not all(v) for v in labels.values()),
        "only_desirable": sum(bool(v) and all(v) for v in labels.values()),
        "only_undesirable": sum(bool(v) and not any(v) for v in labels.values()),
        "examples_mean": statistics.fmean(sizes) if sizes else None,
        "examples_min": min(sizes, default=None),
        "examples_max": max(sizes, default=None),
    }


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def build_unpaired(
    scored: list[dict[str, Any]],
    prompts: list[dict[str, Any]],
    user_examples: list[dict[str, Any]],
    params: PairsParams,
    pair_prompts: set[str] | None = None,
    pair_eval: set[str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(train rows, eval rows, report) of UNPAIRED rows; ``pair_prompts``/``pair_eval``: the pairs' split."""
    by_id = {p["prompt_id"]: p for p in prompts}
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in scored:
        if row["prompt_id"] not in by_id:
            raise ValueError(f"scored: prompt_id {row['prompt_id']!r} is not in the prompts file")
        by_prompt[row["prompt_id"]].append(row)
    removed: Counter[str] = Counter()
    generated, all_tied = [], 0
    for pid, rows in by_prompt.items():
        tied_before = removed["tied"]
        labelled = examples_for_prompt(pid, rows, by_id[pid].get("meta"), params, removed)
        all_tied += removed["tied"] > tied_before
        generated += [example_row(pid, by_id[pid]["prompt"], s, label) for s, label in labelled]
    user = user_example_rows(user_examples, {prompt_key(p["prompt"]): pid for pid, p in by_id.items()})
    rows = generated + user
    duplicate = next((i for i, n in Counter(r["example_id"] for r in rows).items() if n > 1), None)
    if duplicate is not None:
        raise ValueError(f"example_id {duplicate!r} appears twice (user example ids must be unique)")
    eval_ids = eval_ids_like_pairs(
        (r["prompt_id"] for r in rows),
        pair_prompts or set(),
        pair_eval or set(),
        params.eval_fraction,
        params.seed,
    )
    train = [r for r in rows if r["prompt_id"] not in eval_ids]
    evals = [r for r in rows if r["prompt_id"] in eval_ids]
    rule = params.unpaired
    report = {
        "label": rule.label,
        **({"quantile": rule.quantile} if rule.label == "quantile" else {}),
        **({"threshold": rule.threshold} if rule.label == "threshold" else {}),
        "prompts_in": len(by_prompt),
        "samples_in": len(scored),
        "removed": {name: removed[name] for name in REMOVED},
        "prompts_all_tied": all_tied,
        "examples_generated": len(generated),
        "examples_user": len(user),
        **{k: v for k, v in balance(rows).items() if k in ("desirable", "undesirable", "desirable_fraction")},
        "train": balance(train),
        "eval": balance(evals),
        "reward_desirable_mean": _mean([r["reward"] for r in generated if r["label"]]),
        "reward_undesirable_mean": _mean([r["reward"] for r in generated if not r["label"]]),
        "per_prompt": per_prompt_stats(by_prompt, generated),
    }
    return train, evals, report
