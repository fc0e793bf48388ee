"""Constraint families of the built-in task: phrasing templates, value pools and checkers.

A constraint is a JSON-serialisable dict: ``{"family": "max_words", "n": 10, "template": "t1"}``.
``template`` names the phrasing: ``t<i>`` is a training template (every split), ``h<i>`` a held-out
template that only the eval split uses. Value pools are disjoint between training (sft, prompts)
and eval, except bullet counts: 2-4 items is already a small range for a 135M model to learn.

Checkers take the stripped response and are deliberately lenient about form (case, whitespace,
trailing punctuation, a ```json fence) and strict about the constraint itself.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from typing import Any

Constraint = dict[str, Any]

FAMILIES: tuple[str, ...] = (
    "lowercase",
    "max_words",
    "include_keyword",
    "bullets",
    "arithmetic",
    "json_keys",
    "start_phrase",
    "end_phrase",
    "no_commas",
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "lowercase": (
        "Write your whole answer in lowercase letters.",
        "Use only lowercase letters in your answer.",
        "Do not use any capital letters.",
    ),
    "max_words": ("Use at most {n} words.", "Answer in {n} words or fewer.", "Use no more than {n} words."),
    "include_keyword": (
        'Include the word "{keyword}" in your answer.',
        'Make sure to use the word "{keyword}".',
        'Your answer must contain the word "{keyword}".',
    ),
    "bullets": (
        'Answer with exactly {n} bullet points starting with "- ".',
        'Give exactly {n} bullet points. Start each one with "- ".',
        "Format your answer as a list of exactly {n} bullet points.",
    ),
    "arithmetic": (
        "What is {a} + {b}? Answer with only the number.",
        "Compute {a} + {b}. Reply with just the number.",
        "What is the sum of {a} and {b}? Give only the number.",
    ),
    "json_keys": (
        "Answer with a JSON object that has exactly the keys {keys}.",
        "Reply only with a JSON object with the keys {keys}.",
        "Format your answer as JSON with exactly the keys {keys}.",
    ),
    "start_phrase": (
        'Start your answer with "{phrase}".',
        'Begin your reply with the words "{phrase}".',
        'Your answer must start with "{phrase}".',
    ),
    "end_phrase": (
        'End your answer with "{phrase}".',
        'Finish your reply with the words "{phrase}".',
        'Your answer must end with "{phrase}".',
    ),
    "no_commas": ("Do not use any commas.", "Answer without using commas.", "Avoid commas in your answer."),
}

HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "lowercase": ("Your reply must contain no uppercase letters at all.", "Keep every letter lowercase."),
    "max_words": ("Your reply must not exceed {n} words.", "Limit your response to {n} words."),
    "include_keyword": ('Mention the word "{keyword}" somewhere in your reply.',),
    "bullets": ('Reply using precisely {n} bullets, each on its own line beginning with "- ".',),
    "arithmetic": ("Add {a} and {b}. Write nothing but the resulting number.",),
    "json_keys": ("Return a valid JSON object whose only keys are {keys}.",),
    "start_phrase": ('Open your response with the exact phrase "{phrase}".',),
    "end_phrase": ('Close your response with the exact phrase "{phrase}".',),
    "no_commas": ("Your reply must not contain a single comma.",),
}

# Training keywords with a short comma-free sentence (at most 4 words) that fits any topic.
KEYWORD_SENTENCES: dict[str, str] = {
    "simple": "The idea is simple.",
    "people": "Many people agree.",
    "enjoy": "Many people enjoy it.",
    "better": "It makes life better.",
    "important": "It is truly important.",
    "worth": "It is worth it.",
    "interesting": "It is really interesting.",
    "friends": "Share it with friends.",
    "everyone": "Everyone can appreciate it.",
    "joy": "It brings real joy.",
    "special": "It is quite special.",
    "peace": "It brings me peace.",
}
EVAL_KEYWORDS = ("wonderful", "family", "energy", "careful", "future", "morning", "journey", "patience")
START_PHRASES = ("Good question", "Sure thing", "Happy to help", "Here you go", "Great topic")
EVAL_START_PHRASES = ("Glad you asked", "Of course", "Let me explain")
END_PHRASES = ("Hope this helps", "That is all", "Thanks for asking", "Have fun", "Enjoy")
EVAL_END_PHRASES = ("Take care", "Best of luck", "Stay curious")
MAX_WORDS = (8, 10, 12, 15)
EVAL_MAX_WORDS = (9, 11, 14)
BULLET_COUNTS = (2, 3, 4)
JSON_KEYS = (
    ("topic", "fact"),
    ("title", "summary"),
    ("subject", "note"),
    ("name", "detail"),
    ("topic", "tip"),
)
EVAL_JSON_KEYS = (("heading", "text"), ("item", "comment"), ("label", "info"))
# Keys whose demonstration value is the topic itself; other keys get a sentence about it.
NAME_KEYS = frozenset({"topic", "title", "subject", "name", "heading", "item", "label"})


def _is_eval_sum(a: int, b: int) -> bool:
    """Symmetric split of the addition problems: about a fifth of them are held out for eval."""
    return (a + b + a * b) % 5 == 0


SUMS = tuple((a, b) for a in range(2, 16) for b in range(2, 16) if not _is_eval_sum(a, b))
EVAL_SUMS = tuple((a, b) for a in range(2, 16) for b in range(2, 16) if _is_eval_sum(a, b))


def choose_template(family: str, rng: random.Random, heldout: bool) -> str:
    """A template id for ``family``: ``h<i>`` from the held-out templates, else ``t<i>``."""
    prefix, pool = ("h", HELDOUT_TEMPLATES) if heldout else ("t", TEMPLATES)
    return f"{prefix}{rng.randrange(len(pool[family]))}"


def template_text(family: str, template_id: str) -> str:
    """The phrasing template named by ``template_id`` (``t<i>`` or ``h<i>``)."""
    pool = HELDOUT_TEMPLATES if template_id.startswith("h") else TEMPLATES
    return pool[family][int(template_id[1:])]


def sample_constraint(family: str, rng: random.Random, eval_values: bool, template_id: str) -> Constraint:
    """Draw the values of one constraint, from the eval pools when ``eval_values``."""
    c: Constraint = {"family": family}
    if family == "max_words":
        c["n"] = rng.choice(EVAL_MAX_WORDS if eval_values else MAX_WORDS)
    elif family == "include_keyword":
        c["keyword"] = rng.choice(EVAL_KEYWORDS if eval_values else tuple(KEYWORD_SENTENCES))
    elif family == "bullets":
        c["n"] = rng.choice(BULLET_COUNTS)
    elif family == "arithmetic":
        a, b = rng.choice(EVAL_SUMS if eval_values else SUMS)
        c.update(a=a, b=b, answer=a + b)
    elif family == "json_keys":
        c["keys"] = list(rng.choice(EVAL_JSON_KEYS if eval_values else JSON_KEYS))
    elif family in ("start_phrase", "end_phrase"):
        train, held = (
            (START_PHRASES, EVAL_START_PHRASES)
            if family == "start_phrase"
            else (END_PHRASES, EVAL_END_PHRASES)
        )
        c["phrase"] = rng.choice(held if eval_values else train)
    c["template"] = template_id
    return c


def render_constraint(c: Constraint) -> str:
    """The instruction sentence(s) that state constraint ``c``."""
    fields = dict(c)
    if "keys" in c:
        fields["keys"] = " and ".join(f'"{k}"' for k in c["keys"])
    return template_text(c["family"], c["template"]).format(**fields)


def _check_lowercase(c: Constraint, text: str) -> bool:
    return not any(ch.isupper() for ch in text)


def _check_max_words(c: Constraint, text: str) -> bool:
    return len(text.split()) <= int(c["n"])


def _check_include_keyword(c: Constraint, text: str) -> bool:
    return re.search(rf"\b{re.escape(c['keyword'])}\b", text, re.IGNORECASE) is not None


def _check_bullets(c: Constraint, text: str) -> bool:
    lines = (line.strip() for line in text.splitlines())
    return sum(line.startswith(("- ", "* ")) for line in lines) == int(c["n"])


def _check_arithmetic(c: Constraint, text: str) -> bool:
    number = text.removesuffix(".").strip()
    return re.fullmatch(r"[-+]?\d+", number) is not None and int(number) == int(c["answer"])


def _check_json_keys(c: Constraint, text: str) -> bool:
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL | re.IGNORECASE)
    try:
        obj = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    return isinstance(obj, dict) and set(obj) == set(c["keys"])


_TRAILING = string.whitespace + string.punctuation


def _check_start_phrase(c: Constraint, text: str) -> bool:
    phrase = c["phrase"].strip(_TRAILING).lower()
    lowered = text.lower()
    return lowered.startswith(phrase) and not lowered[len(phrase) : len(phrase) + 1].isalnum()


def _check_end_phrase(c: Constraint, text: str) -> bool:
    phrase = c["phrase"].strip(_TRAILING).lower()
    lowered = text.rstrip(_TRAILING).lower()
    before = lowered[: len(lowered) - len(phrase)]
    return lowered.endswith(phrase) and not before[-1:].isalnum()


def _check_no_commas(c: Constraint, text: str) -> bool:
    return "," not in text and "\uff0c" not in text


CHECKS: dict[str, Callable[[Constraint, str], bool]] = {
    "lowercase": _check_lowercase,
    "max_words": _check_max_words,
    "include_keyword": _check_include_keyword,
    "bullets": _check_bullets,
    "arithmetic": _check_arithmetic,
    "json_keys": _check_json_keys,
    "start_phrase": _check_start_phrase,
    "end_phrase": _check_end_phrase,
    "no_commas": _check_no_commas,
}
