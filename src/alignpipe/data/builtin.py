"""The built-in task ``builtin:verifiable-instructions``: the pipeline's embedded default data.

Each prompt is a short request on a topic ("Describe the ocean.") plus one constraint that a
program can check ("Use at most 10 words."), sometimes two. :func:`make_items` generates the
three splits deterministically from a seed; :func:`verify` scores a response as the fraction of
its constraints that hold, so best-of-N samples differ in reward.

Held-out evaluation: the eval split draws its topics, keywords, phrases, word limits, JSON keys
and addition problems from pools that the sft and prompts splits never use (bullet counts are
shared), and half of its items per family use phrasing templates that only eval uses.

``json_keys`` requires exactly the given keys (in any order): extra keys fail.
An empty response fails every constraint.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

from alignpipe.data.builtin_families import (
    CHECKS,
    FAMILIES,
    KEYWORD_SENTENCES,
    NAME_KEYS,
    choose_template,
    render_constraint,
    sample_constraint,
)

__all__ = ["FAMILIES", "TaskItem", "Verdict", "make_items", "primary_family", "verify"]

Split = Literal["sft", "prompts", "eval"]
SPLITS: tuple[str, ...] = ("sft", "prompts", "eval")
_ID_TAGS = {"sft": "sft", "prompts": "prompt", "eval": "eval"}
# Share of prose items that get a second constraint (rewards of 0, 0.5 and 1).
SECOND_CONSTRAINT_RATE = 0.3
# Families that shape the whole answer: they take no second constraint.
EXCLUSIVE = frozenset({"arithmetic", "json_keys"})
# Pairs a demonstration cannot satisfy together in a short answer (4 bullets in 8 words).
INCOMPATIBLE = frozenset({frozenset({"max_words", "bullets"})})
# Word budget of a demonstration body without a word limit: 2 short sentences, ~35 tokens.
DEMO_BODY_WORDS = 18


@dataclass(frozen=True)
class Topic:
    """A topic of the base request; ``sentences`` build demonstrations (empty for eval topics)."""

    name: str
    kind: Literal["thing", "habit"]
    sentences: tuple[str, ...] = ()


REQUESTS: dict[str, tuple[str, ...]] = {
    "thing": ("Describe {topic}.", "Tell me about {topic}.", "Write a short note about {topic}."),
    "habit": ("Give a tip about {topic}.", "Share some advice about {topic}.", "Help me with {topic}."),
}

# Each topic has at least one sentence of at most 4 words (8-word limit plus a phrase) and at
# least four without commas (4 bullets under "no commas").
TOPICS: tuple[Topic, ...] = (
    Topic("the ocean", "thing", (
        "The ocean is vast.", "Waves roll in all day.", "It covers most of our planet.",
        "Many fish and whales live there.", "On calm days, the water looks like glass.",
        "Its salty air smells fresh.",
    )),
    Topic("the moon", "thing", (
        "The moon lights up the night.", "It glows silver.", "It circles the Earth once a month.",
        "Its pull shapes the tides.", "Astronauts first walked there in 1969.",
        "Full or thin, it is always there.",
    )),
    Topic("autumn", "thing", (
        "Autumn brings cool air.", "The leaves turn red and gold.", "Days get shorter each week.",
        "It is a great time for long walks.", "Apples and pumpkins are ready to pick.",
        "In autumn, warm soup tastes even better.",
    )),
    Topic("a forest", "thing", (
        "A forest is full of tall trees.", "Birds sing high in the branches.", "Pine scents the air.",
        "Moss covers the old logs.", "Deer move quietly between the trunks.",
        "At dawn, light falls through the leaves.",
    )),
    Topic("coffee", "thing", (
        "Coffee is made from roasted beans.", "Its smell fills the kitchen.", "Coffee wakes you up.",
        "It can be strong or mild.", "Many people drink it every day.",
        "Black, with milk or iced, it suits every taste.",
    )),
    Topic("rain", "thing", (
        "Rain helps plants grow.", "It taps softly on the roof.", "The streets shine after a storm.",
        "Clouds turn grey before it falls.", "Puddles are fun for kids.",
        "After the rain, the air smells clean.",
    )),
    Topic("sleep", "habit", (
        "Go to bed at the same time each night.", "Keep your room dark and cool.",
        "Avoid screens before bed.", "Skip coffee late in the day.", "A short walk helps you rest.",
        "If you cannot sleep, read a calm book.",
    )),
    Topic("cooking", "habit", (
        "Taste your food as you cook.", "Keep your knives sharp.", "Prepare everything before you start.",
        "Salt makes flavors stand out.", "Start with simple recipes.", "When in doubt, cook it slowly.",
    )),
    Topic("exercise", "habit", (
        "Move your body every day.", "Start slow and build up.", "Drink water during your workout.",
        "Stretch before and after training.", "Rest days matter too.",
        "Even on busy days, a short walk helps.",
    )),
    Topic("reading", "habit", (
        "Read a few pages every day.", "Keep a book in your bag.", "Pick books you find fun.",
        "Try audiobooks too.", "Talk about books with others.", "If a book bores you, try another one.",
    )),
    Topic("saving money", "habit", (
        "Set aside a little each month.", "Track what you spend.", "Cook at home more often.",
        "Avoid buying on impulse.", "Wait a day before big purchases.", "Over time, small savings add up.",
    )),
    Topic("gardening", "habit", (
        "Water your plants early in the day.", "Most plants need lots of sun.",
        "Pull weeds while they are small.", "Start with easy herbs.", "Good soil makes healthy plants.",
        "In dry weather, add mulch to keep the soil moist.",
    )),
)  # fmt: skip
EVAL_TOPICS: tuple[Topic, ...] = (
    Topic("the desert", "thing"),
    Topic("snow", "thing"),
    Topic("a river", "thing"),
    Topic("the stars", "thing"),
    Topic("running", "habit"),
    Topic("writing", "habit"),
    Topic("drinking water", "habit"),
    Topic("public speaking", "habit"),
)
_TOPIC_BY_NAME = {t.name: t for t in TOPICS + EVAL_TOPICS}


@dataclass(frozen=True)
class TaskItem:
    """One item of the built-in task.

    ``spec`` is the JSON-serialisable constraint spec that :func:`verify` takes:
    ``{"constraints": [{"family": "max_words", "n": 10, "template": "t0"}], "topic": "the ocean"}``
    (``topic`` is None for arithmetic). ``demonstration`` satisfies every constraint (sft only).
    """

    id: str
    family: str
    instruction: str
    spec: dict[str, Any]
    demonstration: str | None


@dataclass(frozen=True)
class Verdict:
    """The score of a response: the fraction of constraints satisfied, and each one's result.

    ``details`` is keyed by family, with ``_2``, ``_3`` ... for a repeated family.
    """

    score: float
    details: dict[str, bool]


def verify(spec: dict[str, Any], response: str) -> Verdict:
    """Check ``response`` against every constraint of ``spec``; whitespace around it is ignored."""
    constraints = spec.get("constraints")
    if not constraints:
        raise ValueError(f"built-in spec has no constraints: {spec!r}")
    text = response.strip()
    details: dict[str, bool] = {}
    for c in constraints:
        family = c.get("family")
        if family not in CHECKS:
            raise ValueError(f"unknown constraint family {family!r}; expected one of {', '.join(FAMILIES)}")
        key, k = family, 2
        while key in details:
            key, k = f"{family}_{k}", k + 1
        details[key] = bool(text) and CHECKS[family](c, text)
    return Verdict(score=sum(details.values()) / len(details), details=details)


def make_items(split: Split, n: int, seed: int) -> list[TaskItem]:
    """Generate ``n`` items of ``split``, deterministically for ``seed``.

    Primary families come in shuffled rounds of all of :data:`FAMILIES`, so their counts differ
    by at most one, and a smaller ``n`` gives a prefix of a larger one. sft items carry a
    demonstration; prompts and eval items do not.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"builtin:verifiable-instructions:{split}:{seed}")
    families = _balanced_families(random.Random(f"builtin:verifiable-instructions:{split}:{seed}:families"))
    seen: Counter[str] = Counter()
    items = []
    for i, family in enumerate(islice(families, n)):
        # Eval: every other item of a family (starting with the first) uses a held-out phrasing.
        heldout = split == "eval" and seen[family] % 2 == 0
        seen[family] += 1
        spec = _sample_spec(family, split == "eval", heldout, rng)
        items.append(
            TaskItem(
                id=f"bi-{_ID_TAGS[split]}-{i:06d}",
                family=family,
                instruction=_instruction(spec, rng),
                spec=spec,
                demonstration=_demonstration(spec, rng) if split == "sft" else None,
            )
        )
    return items


def _balanced_families(rng: random.Random) -> Iterator[str]:
    """Primary families without end: consecutive shuffled rounds of every family."""
    while True:
        block = list(FAMILIES)
        rng.shuffle(block)
        yield from block


def _sample_spec(family: str, eval_split: bool, heldout: bool, rng: random.Random) -> dict[str, Any]:
    """The spec of one item: its primary constraint, maybe a second one, and its topic."""
    constraints = [sample_constraint(family, rng, eval_split, choose_template(family, rng, heldout))]
    second = _second_family(family, rng)
    if second is not None:
        template = choose_template(second, rng, eval_split and rng.random() < 0.5)
        constraints.append(sample_constraint(second, rng, eval_split, template))
    topics = EVAL_TOPICS if eval_split else TOPICS
    topic = None if family == "arithmetic" else rng.choice(topics).name
    return {"constraints": constraints, "topic": topic}


def _second_family(family: str, rng: random.Random) -> str | None:
    """A compatible second family for a prose item, or None (most items have one constraint)."""
    if family in EXCLUSIVE or rng.random() >= SECOND_CONSTRAINT_RATE:
        return None
    options = [
        f
        for f in FAMILIES
        if f != family and f not in EXCLUSIVE and frozenset({family, f}) not in INCOMPATIBLE
    ]
    return rng.choice(options)


def _instruction(spec: dict[str, Any], rng: random.Random) -> str:
    """The user message: the topic request (if any) followed by each constraint's sentence."""
    parts = [render_constraint(c) for c in spec["constraints"]]
    if spec["topic"] is None:
        return " ".join(parts)
    topic = _TOPIC_BY_NAME[spec["topic"]]
    return " ".join([rng.choice(REQUESTS[topic.kind]).format(topic=topic.name), *parts])


def _demonstration(spec: dict[str, Any], rng: random.Random) -> str:
    """A short answer, built from the topic's sentences, that satisfies every constraint."""
    cons = {c["family"]: c for c in spec["constraints"]}
    if "arithmetic" in cons:
        return str(cons["arithmetic"]["answer"])
    topic = _TOPIC_BY_NAME[spec["topic"]]
    pool = [s for s in topic.sentences if "no_commas" not in cons or "," not in s]
    rng.shuffle(pool)
    if "json_keys" in cons:
        keys = cons["json_keys"]["keys"]
        values = iter(pool)
        text = json.dumps({k: topic.name if k in NAME_KEYS else next(values) for k in keys})
    else:
        head = [f"{cons['start_phrase']['phrase']}."] if "start_phrase" in cons else []
        tail = [f"{cons['end_phrase']['phrase']}."] if "end_phrase" in cons else []
        extra = [KEYWORD_SENTENCES[cons["include_keyword"]["keyword"]]] if "include_keyword" in cons else []
        if "bullets" in cons:
            items = pool[: cons["bullets"]["n"] - len(extra)] + extra
            text = "\n".join(head + [f"- {s}" for s in items] + tail)
        else:
            fixed = _words(head + extra + tail)
            budget = cons["max_words"]["n"] - fixed if "max_words" in cons else DEMO_BODY_WORDS
            body = _fit_sentences(pool, budget)
            text = " ".join(head + body + extra + tail)
    if "lowercase" in cons:
        text = text.lower()
    if verify(spec, text).score < 1.0:
        raise RuntimeError(f"built-in demonstration {text!r} fails its own spec {spec!r}")
    return text


def _words(sentences: list[str]) -> int:
    """Whitespace-separated words in ``sentences``."""
    return sum(len(s.split()) for s in sentences)


def _fit_sentences(pool: list[str], budget: int, most: int = 2) -> list[str]:
    """Up to ``most`` sentences of ``pool`` (in order) within ``budget`` words; else the shortest."""
    chosen: list[str] = []
    for sentence in pool:
        if len(chosen) < most and _words([*chosen, sentence]) <= budget:
            chosen.append(sentence)
    return chosen or [min(pool, key=lambda s: len(s.split()))]


def primary_family(meta: str | None) -> str | None:
    """``spec.constraints[0].family`` of a built-in prompt's meta JSON; None for other prompts."""
    if not meta:
        return None
    try:
        spec = json.loads(meta)
        return str(spec["constraints"][0]["family"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
