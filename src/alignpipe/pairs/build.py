"""Preference pairs from the N scored samples of each prompt (the ``pairs`` stage's pair half).

Filters apply before choosing, so a pair lost to a filter is replaced by the next best one
that passes (this keeps the most useful pairs):

1. sample filter: completions cut by the length limit (``finish_reason == "length"``) leave
   the pool unless ``allow_truncated``;
2. pair filters, on every candidate pair (chosen = the higher reward; a tie takes the lower
   sample_idx as chosen), counted under the first one that fails, in this order:
   ``tie`` (``drop_ties``), ``min_margin``, ``min_chosen_reward``, ``similarity`` (difflib
   ratio over words and punctuation >= ``max_similarity``; 1.0 drops identical texts only)
   and ``length_ratio`` (chosen/rejected tokens > ``max_length_ratio``);
3. the strategy picks among the surviving pairs of a prompt:
   ``best_vs_worst``: the largest margin (the best vs the worst sample when that pair passes);
   ``best_vs_random``: the best sample that has a surviving pair, vs one of its surviving
   partners drawn at random (seeded by ``seed`` and prompt_id);
   ``all_pairs``: the largest margins first, at most ``max_pairs_per_prompt`` (the rest count as
   ``cap``).

User pairs (``preferences.parquet``) join unfiltered (source "user", rewards null). Train/eval
split by prompt: prompts sorted by a hash of (seed, prompt_id), the first ``eval_fraction`` of
them are eval, so no prompt is in both. ``test.parquet`` holds the held-out preference split of
``evaluate.preferences`` as it came (no rows without one), for ``ref_logps`` and ``evaluate`` only.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from alignpipe.params import PairsParams

# Filter name -> the param that sets it (for the report and the empty-result error).
FILTERS: dict[str, str] = {
    "truncated": "allow_truncated",
    "tie": "drop_ties",
    "min_margin": "min_margin",
    "min_chosen_reward": "min_chosen_reward",
    "similarity": "max_similarity",
    "length_ratio": "max_length_ratio",
    "cap": "max_pairs_per_prompt",
}
_TOKEN = re.compile(r"\w+|[^\w\s]")  # words and single punctuation marks, for the similarity filter


class NoPairsError(ValueError):
    """No preference pair survived the filters; the message says which filter removed how many."""


@dataclass(frozen=True)
class Sample:
    idx: int
    completion: str
    reward: float
    length: int  # tokens when every sample of the prompt has n_tokens, else characters
    truncated: bool


@dataclass(frozen=True)
class Candidate:
    chosen: Sample
    rejected: Sample

    @property
    def margin(self) -> float:
        return self.chosen.reward - self.rejected.reward


def samples_of(rows: list[dict[str, Any]]) -> list[Sample]:
    """One prompt's scored rows as samples, in sample_idx order."""
    use_tokens = all(r.get("n_tokens") is not None for r in rows)
    return [
        Sample(
            idx=int(r["sample_idx"]),
            completion=r["completion"],
            reward=float(r["reward"]),
            length=int(r["n_tokens"]) if use_tokens else len(r["completion"]),
            truncated=r.get("finish_reason") == "length",
        )
        for r in sorted(rows, key=lambda r: r["sample_idx"])
    ]


def candidates(samples: list[Sample]) -> list[Candidate]:
    """Every unordered pair, oriented so chosen has the higher reward (a tie: the lower idx)."""
    out = []
    for i, a in enumerate(samples):
        for b in samples[i + 1 :]:
            out.append(Candidate(a, b) if a.reward >= b.reward else Candidate(b, a))
    return out


def similarity_at_least(a: str, b: str, threshold: float) -> bool:
    """difflib ratio >= threshold over the texts' words and punctuation marks.

    Tokens, not characters: character-level difflib is quadratic (5 s for two 7k-character
    answers) and, with its autojunk heuristic, rates long near-copies as dissimilar. Texts
    that differ only in whitespace count as identical. Cheap upper bounds skip most full matches.
    """
    matcher = difflib.SequenceMatcher(None, _TOKEN.findall(a), _TOKEN.findall(b), autojunk=False)
    if matcher.real_quick_ratio() < threshold or matcher.quick_ratio() < threshold:
        return False
    return matcher.ratio() >= threshold


def rejection(c: Candidate, params: PairsParams) -> str | None:
    """The first pair filter that ``c`` fails, or None."""
    if params.drop_ties and c.margin == 0:
        return "tie"
    if c.margin < params.min_margin:
        return "min_margin"
    if params.min_chosen_reward is not None and c.chosen.reward < params.min_chosen_reward:
        return "min_chosen_reward"
    if similarity_at_least(c.chosen.completion, c.rejected.completion, params.max_similarity):
        return "similarity"
    if (
        params.max_length_ratio is not None
        and c.chosen.length / max(c.rejected.length, 1) > params.max_length_ratio
    ):
        return "length_ratio"
    return None


def _rank(c: Candidate) -> tuple[float, float, int, int]:
    """Sort key: largest margin, then highest chosen reward, then lowest sample indices."""
    return (-c.margin, -c.chosen.reward, c.chosen.idx, c.rejected.idx)


def choose(passing: list[Candidate], params: PairsParams, rng: random.Random) -> list[Candidate]:
    """The strategy's pick among one prompt's surviving pairs."""
    if not passing:
        return []
    if params.strategy == "best_vs_worst":
        return [min(passing, key=_rank)]
    if params.strategy == "best_vs_random":
        best = min((c.chosen for c in passing), key=lambda s: (-s.reward, s.idx))
        partners = sorted((c for c in passing if c.chosen.idx == best.idx), key=lambda c: c.rejected.idx)
        return [rng.choice(partners)]
    return sorted(passing, key=_rank)[: params.max_pairs_per_prompt]


def pairs_for_prompt(
    prompt_id: str, rows: list[dict[str, Any]], params: PairsParams, removed: Counter[str]
) -> list[Candidate]:
    """Filter one prompt's samples and candidate pairs, then choose.

    Counts go to ``removed``: candidate pairs (after the sample filter) and each filter's removals.
    """
    samples = samples_of(rows)
    if not params.allow_truncated:
        removed["truncated"] += sum(s.truncated for s in samples)
        samples = [s for s in samples if not s.truncated]
    passing = []
    pool = candidates(samples)
    removed["candidate_pairs"] += len(pool)
    for c in pool:
        reason = rejection(c, params)
        if reason is None:
            passing.append(c)
        else:
            removed[reason] += 1
    chosen = choose(passing, params, random.Random(f"{params.seed}:{prompt_id}"))
    if params.strategy == "all_pairs":
        removed["cap"] += len(passing) - len(chosen)
    return chosen


def prompt_key(prompt: list[dict[str, str]]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in prompt], ensure_ascii=False)


def pair_row(prompt_id: str, prompt: list[dict[str, str]], c: Candidate) -> dict[str, Any]:
    return {
        "pair_id": f"{prompt_id}:{c.chosen.idx}>{c.rejected.idx}",
        "prompt_id": prompt_id,
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": c.chosen.completion}],
        "rejected": [{"role": "assistant", "content": c.rejected.completion}],
        "chosen_reward": c.chosen.reward,
        "rejected_reward": c.rejected.reward,
        "margin": c.margin,
        "source": "generated",
    }


def user_prompt_id(prompt: list[dict[str, str]], prompt_ids: dict[str, str]) -> str:
    """A user row's prompt_id: that of the same prompt in prompts.parquet (``prompt_ids``, by
    :func:`prompt_key`), so it lands on that prompt's side of the split; else "user-" and 16 hex
    digits of the sha256 of its key. User pairs and user unpaired rows share it."""
    key = prompt_key(prompt)
    return prompt_ids.get(key) or "user-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def user_pair_rows(preferences: list[dict[str, Any]], prompt_ids: dict[str, str]) -> list[dict[str, Any]]:
    """User pairs as PAIRS rows; a prompt also in prompts.parquet keeps its prompt_id (same split side)."""
    rows = []
    for pref in preferences:
        rows.append(
            {
                "pair_id": pref["pair_id"],
                "prompt_id": user_prompt_id(pref["prompt"], prompt_ids),
                "prompt": pref["prompt"],
                "chosen": pref["chosen"],
                "rejected": pref["rejected"],
                "chosen_reward": None,
                "rejected_reward": None,
                "margin": None,
                "source": "user",
            }
        )
    return rows


def prompt_order(prompt_ids: Iterable[str], seed: int) -> list[str]:
    """The distinct prompt ids sorted by hash of (seed, prompt_id): the order the eval split takes from."""
    return sorted(set(prompt_ids), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())


def eval_prompt_ids(prompt_ids: list[str], eval_fraction: float, seed: int) -> set[str]:
    """The eval prompts: the first round(eval_fraction * n) by hash of (seed, prompt_id).

    With eval_fraction > 0 and at least two prompts, eval and train each get at least one.
    """
    ids = prompt_order(prompt_ids, seed)
    n_eval = round(eval_fraction * len(ids))
    if eval_fraction > 0 and len(ids) >= 2:
        n_eval = min(max(n_eval, 1), len(ids) - 1)
    return set(ids[:n_eval])


def no_pairs_message(report: dict[str, Any], params: PairsParams) -> str:
    removed = report["removed"]
    parts = [
        f"pairs.{FILTERS[name]}={getattr(params, FILTERS[name])} removed {count} "
        + ("samples" if name == "truncated" else "pairs")
        for name, count in removed.items()
        if count
    ]
    head = (
        f"no preference pair survived ({report['prompts_in']} prompts, {report['samples_in']} samples, "
        f"{report['candidate_pairs']} candidate pairs, strategy {params.strategy})"
    )
    if not parts:
        return f"{head}: no prompt has two samples to compare; raise generate.n (samples per prompt)"
    worst = max((n for n in removed if removed[n]), key=lambda n: removed[n])
    return f"{head}: {'; '.join(parts)}. Relax pairs.{FILTERS[worst]} first (it removed the most)"


def build_pairs(
    scored: list[dict[str, Any]],
    prompts: list[dict[str, Any]],
    preferences: list[dict[str, Any]],
    params: PairsParams,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(train rows, eval rows, report) from scored samples, their prompts and optional user pairs."""
    prompt_by_id = {p["prompt_id"]: p["prompt"] for p in prompts}
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in scored:
        if row["prompt_id"] not in prompt_by_id:
            raise ValueError(f"scored: prompt_id {row['prompt_id']!r} is not in the prompts file")
        by_prompt[row["prompt_id"]].append(row)
    counts: Counter[str] = Counter()
    generated = []
    for pid, rows in by_prompt.items():
        generated += [
            pair_row(pid, prompt_by_id[pid], c) for c in pairs_for_prompt(pid, rows, params, counts)
        ]
    user = user_pair_rows(preferences, {prompt_key(p): pid for pid, p in prompt_by_id.items()})
    rows = generated + user
    report = {
        "strategy": params.strategy,
        "prompts_in": len(by_prompt),
        "samples_in": len(scored),
        "candidate_pairs": counts["candidate_pairs"],
        "removed": {name: counts[name] for name in FILTERS},
        "prompts_with_pairs": len({r["prompt_id"] for r in generated}),
        "pairs_generated": len(generated),
        "pairs_user": len(user),
    }
    if not rows:
        raise NoPairsError(no_pairs_message(report, params))
    duplicate = next((pid for pid, n in Counter(r["pair_id"] for r in rows).items() if n > 1), None)
    if duplicate is not None:
        raise ValueError(f"pair_id {duplicate!r} appears twice (user pair ids must be unique)")
    eval_ids = eval_prompt_ids([r["prompt_id"] for r in rows], params.eval_fraction, params.seed)
    train = [r for r in rows if r["prompt_id"] not in eval_ids]
    evals = [r for r in rows if r["prompt_id"] in eval_ids]
    report |= {"pairs_train": len(train), "pairs_eval": len(evals), "prompts_eval": len(eval_ids)}
    report |= _distribution("reward", [float(r["reward"]) for r in scored])
    report |= _distribution("margin", [r["margin"] for r in generated])
    return train, evals, report


def _distribution(name: str, values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"{name}_mean": None, f"{name}_min": None, f"{name}_max": None}
    return {f"{name}_mean": statistics.fmean(values), f"{name}_min": min(values), f"{name}_max": max(values)}
