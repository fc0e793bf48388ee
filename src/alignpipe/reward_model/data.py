"""Preference pairs for the reward model, and their token ids.

Two sources, both available before ``score`` (a reward that scores the generations must not learn
from its own output):

- the user's pairs, ``data/prepared/preferences.parquet`` (any format ``prepare`` reads);
- on the built-in task, *verifier pairs*: each SFT demonstration (it passes its constraints by
  construction) against corrupted variants of it (upper-cased, commas added, words appended or
  cut, bullets or the constraint's words removed, digits changed) that the built-in verifier scores
  lower. No sampling is needed, so the pairs cost milliseconds on CPU; the margin is the verifier's
  score gap. Every variant keeps its verifier score, for the agreement checks on held-out prompts.

The split is by prompt: ``eval_fraction`` of the prompts (seeded) hold the held-out pairs.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.artifacts.io import read_parquet
from alignpipe.artifacts.schema import PREFERENCES, SFT
from alignpipe.core.chat import Message, encode_ids
from alignpipe.params import RewardModelParams

APPENDED = " Also, here are a few more words that nobody asked for at all."
PREFIXED = "Sure, here is my answer. "


class RewardDataError(ValueError):
    """No usable pairs for the reward model (names the data and what to set)."""


@dataclass(frozen=True)
class Sample:
    """One scored conversation of a prompt (a demonstration or a variant; ``score`` the verifier's)."""

    prompt_id: str
    prompt: list[Message]
    completion: list[Message]
    score: float | None


@dataclass(frozen=True)
class Pair:
    prompt_id: str
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float  # the verifier score gap (0 for user pairs)


@dataclass(frozen=True)
class RewardData:
    source: str  # "preferences" | "verifier"
    train: list[Pair]
    eval: list[Pair]
    eval_samples: list[Sample]  # verifier pairs: every held-out sample with its verifier score


def pick_source(params: RewardModelParams, prepared: Path) -> str:
    """``preferences`` or ``verifier`` for ``reward_model.pairs`` (``auto``: preferences when present)."""
    has_prefs = (prepared / "preferences.parquet").exists()
    if params.pairs == "preferences" and not has_prefs:
        raise RewardDataError(
            f"reward_model.pairs 'preferences': {prepared}/preferences.parquet is missing; set "
            "data.preferences.source, or reward_model.pairs: verifier on the built-in task"
        )
    if params.pairs == "auto":
        return "preferences" if has_prefs else "verifier"
    return params.pairs


def load_pairs(params: RewardModelParams, prepared: Path) -> RewardData:
    source = pick_source(params, prepared)
    if source == "preferences":
        rows = read_parquet(prepared / "preferences.parquet", PREFERENCES)
        pairs = [Pair(r["pair_id"], r["prompt"], r["chosen"], r["rejected"], 0.0) for r in rows]
        samples: list[Sample] = []
    else:
        pairs, samples = verifier_pairs(read_parquet(prepared / "sft.parquet", SFT), params)
    held = held_out({p.prompt_id for p in pairs}, params.eval_fraction, params.seed)
    data = RewardData(
        source,
        [p for p in pairs if p.prompt_id not in held],
        [p for p in pairs if p.prompt_id in held],
        [s for s in samples if s.prompt_id in held],
    )
    if not data.train or not data.eval:
        raise RewardDataError(
            f"reward_model: {len(data.train)} train and {len(data.eval)} held-out {source} pairs; "
            "both need at least one (more data, or another reward_model.eval_fraction)"
        )
    return data


def held_out(prompt_ids: set[str], fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of the prompts (at least one, never all when there are two or more)."""
    ids = sorted(prompt_ids)
    random.Random(seed).shuffle(ids)
    k = min(max(1, math.ceil(fraction * len(ids))), max(len(ids) - 1, 1))
    return set(ids[:k])


def corruptions(text: str, spec: dict[str, Any]) -> list[str]:
    """Variants of a demonstration that break one constraint family or another."""
    words = text.split()
    named = {w.lower() for w in re.findall(r"[A-Za-z]{3,}", json.dumps(spec))}
    return [
        text.upper(),
        text.replace(" ", ", ", 3),
        text + APPENDED,
        PREFIXED + text,
        " ".join(words[: max(1, len(words) // 2)]),
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(("-", "*"))),
        re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), text),
        " ".join(w for w in words if w.strip('.,!?":;').lower() not in named),
    ]


def verifier_pairs(
    rows: Sequence[dict[str, Any]], params: RewardModelParams
) -> tuple[list[Pair], list[Sample]]:
    """Demonstration vs. lower-scored variants, at most ``max_pairs_per_prompt`` per demonstration."""
    from alignpipe.data.builtin import verify

    rng = random.Random(params.seed)
    pairs: list[Pair] = []
    samples: list[Sample] = []
    for row in rows:
        if not row["meta"]:
            raise RewardDataError(
                f"reward_model.pairs 'verifier': SFT row {row['id']!r} has no built-in spec; verifier pairs "
                "need the built-in task (or bring data.preferences and set reward_model.pairs: preferences)"
            )
        spec = json.loads(row["meta"])
        text = row["completion"][-1]["content"]
        best = verify(spec, text).score
        seen = {text}
        worse: list[tuple[str, float]] = []
        samples.append(Sample(row["id"], row["prompt"], _answer(text), best))
        for variant in corruptions(text, spec):
            if variant in seen:
                continue
            seen.add(variant)
            score = verify(spec, variant).score
            samples.append(Sample(row["id"], row["prompt"], _answer(variant), score))
            if score < best:
                worse.append((variant, score))
        for variant, score in rng.sample(worse, min(len(worse), params.max_pairs_per_prompt)):
            pairs.append(Pair(row["id"], row["prompt"], _answer(text), _answer(variant), best - score))
    return pairs, samples


def _answer(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def encode(tokenizer: Any, prompt: list[Message], completion: list[Message], max_length: int) -> list[int]:
    """The conversation's ids as ``reward.kind: hf`` reads them (the tokenizer's chat template, no added
    special tokens); a longer one keeps its last ``max_length`` tokens (the end the head reads)."""
    ids = encode_ids(tokenizer, tokenizer.apply_chat_template([*prompt, *completion], tokenize=False))
    return ids[-max_length:]
