"""Rated multi-completion sets: raw UltraFeedback and HelpSteer(2) rows.

- UltraFeedback (``openbmb/UltraFeedback``): one prompt a row, ``instruction`` and
  ``completions``: ``[{"model", "response", "annotations": {aspect: {"Rating": "4", ...}},
  "overall_score", "fine-grained_score", "custom_system_prompt", ...}]``. Aspects are
  ``instruction_following``, ``honesty``, ``truthfulness``, ``helpfulness``; a Rating is a
  number or a numeric string, ``"N/A"`` means unrated; an aspect given as a list of
  annotations uses their mean. ``custom_system_prompt`` (the principle the completion was
  generated under) is not part of the prompt, as in HuggingFaceH4/ultrafeedback_binarized.
- HelpSteer / HelpSteer2 (``nvidia/HelpSteer2``): one response a row, ``prompt``,
  ``response`` and 0-4 scores ``helpfulness``, ``correctness``, ``coherence``, ``complexity``,
  ``verbosity``; rows with the same prompt are one set. A multi-turn prompt holds its turns
  as ``{user 1}\\n<extra_id_1>Assistant\\n{assistant 1}\\n<extra_id_1>User\\n{user 2}``.

The reward of a completion (``data.<part>.rating``): ``overall`` (UltraFeedback's
``overall_score``), ``mean`` (the mean of the aspects rated; UltraFeedback falls back to
``fine-grained_score`` when a completion has no annotations), an aspect name, or ``auto``:
``overall`` for UltraFeedback, ``helpfulness`` for HelpSteer (each set's headline score).
Completions without that score are left out (``unrated``), so are empty ones (``empty_completion``).

From each prompt's set: ``sft`` keeps the best completion (first on ties), ``prompts`` the
prompt, ``preferences`` pairs by ``data.<part>.pairs`` (equal rewards make no pair: ``tie``;
equal texts neither: ``identical``). ``alignpipe.data.convert.scored_completions`` returns
every completion with its reward, one :class:`ScoredCompletion` each (``RatedReader`` with
``kind="scored"``), for the ``score`` stage to import instead of running a reward model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from alignpipe.data.errors import DataError, Where, type_name
from alignpipe.data.formats.detect import HELPSTEER_ATTRIBUTES
from alignpipe.data.formats.messages import Message, check_prompt, require
from alignpipe.data.formats.pairing import pick_pairs

if TYPE_CHECKING:
    from alignpipe.data.formats.base import Drops, FormatOptions

ULTRAFEEDBACK_ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
_ASPECTS = {"ultrafeedback": ULTRAFEEDBACK_ASPECTS, "helpsteer": HELPSTEER_ATTRIBUTES}
RATED_FORMATS = tuple(_ASPECTS)
_AUTO = {"ultrafeedback": "overall", "helpsteer": "helpfulness"}
_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n")


@dataclass(frozen=True)
class ScoredCompletion:
    """One rated completion: its prompt (messages), text, reward by the rule, and the raw scores."""

    prompt: list[Message]
    completion: str
    reward: float
    details: dict[str, Any]


def rating_rule(fmt: str, rating: str) -> str:
    """The rule for ``fmt`` (``auto`` resolved); a rule the set cannot have is an error."""
    rule = _AUTO[fmt] if rating == "auto" else rating
    if rule == "mean" or rule in _ASPECTS[fmt] or (rule == "overall" and fmt == "ultrafeedback"):
        return rule
    known = ", ".join(["auto", "mean", *(["overall"] if fmt == "ultrafeedback" else []), *_ASPECTS[fmt]])
    raise DataError(
        f"rating {rating!r} is not a score of {fmt} rows; use one of {known}", reason="bad_option"
    )


def _number(value: Any, field: str) -> float | None:
    """A score: a number or a numeric string; ``"N/A"``, null and NaN are None (unrated)."""
    if value is None or value == "N/A":
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise DataError(
                f"expected a number or 'N/A', got {value!r}", field=field, reason="wrong_type"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"expected a number, got {type_name(value)}", field=field, reason="wrong_type")
    return None if math.isnan(value) else float(value)


def _aspect_rating(value: Any, field: str) -> float | None:
    """An UltraFeedback aspect: ``{"Rating": ...}`` or a list of them (their mean)."""
    items = value if isinstance(value, list) else [value]
    ratings = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]" if isinstance(value, list) else field
        if not isinstance(item, Mapping):
            raise DataError(f"expected an object, got {type_name(item)}", field=where, reason="wrong_type")
        rating = _number(item.get("Rating"), f"{where}.Rating")
        if rating is not None:
            ratings.append(rating)
    return sum(ratings) / len(ratings) if ratings else None


def _reward(scores: dict[str, float | None], rule: str, fallback: float | None = None) -> float | None:
    if rule != "mean":
        return scores.get(rule)
    rated = [s for name, s in scores.items() if name != "overall" and s is not None]
    return sum(rated) / len(rated) if rated else fallback


def _text(record: Mapping[str, Any], field: str) -> str:
    value = require(record, field)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type_name(value)}", field=field, reason="wrong_type")
    return value


def ultrafeedback_set(
    record: Mapping[str, Any], rule: str
) -> tuple[list[Message], list[tuple[float | None, str, dict]]]:
    """(prompt, [(reward or None, response, details)]) of one UltraFeedback row."""
    instruction = _text(record, "instruction")
    prompt = check_prompt(
        [{"role": "user", "content": instruction}] if instruction.strip() else [], "instruction"
    )
    completions = require(record, "completions")
    if not isinstance(completions, list):
        raise DataError(
            f"expected a list, got {type_name(completions)}", field="completions", reason="wrong_type"
        )
    out = []
    for j, comp in enumerate(completions):
        field = f"completions[{j}]"
        if not isinstance(comp, Mapping):
            raise DataError(f"expected an object, got {type_name(comp)}", field=field, reason="wrong_type")
        response = _text(comp, "response") if "response" in comp else None
        if response is None:
            raise DataError("missing", field=f"{field}.response", reason="missing_field")
        annotations = comp.get("annotations") or {}
        if not isinstance(annotations, Mapping):
            raise DataError(
                f"expected an object, got {type_name(annotations)}",
                field=f"{field}.annotations",
                reason="wrong_type",
            )
        scores = {
            a: _aspect_rating(annotations[a], f"{field}.annotations.{a}")
            for a in ULTRAFEEDBACK_ASPECTS
            if annotations.get(a) is not None
        }
        scores["overall"] = _number(comp.get("overall_score"), f"{field}.overall_score")
        fallback = (
            None if annotations else _number(comp.get("fine-grained_score"), f"{field}.fine-grained_score")
        )
        details = {"model": comp.get("model"), "scores": scores}
        out.append((_reward(scores, rule, fallback), response, details))
    return prompt, out


def helpsteer_prompt(text: str) -> list[Message]:
    """HelpSteer2's prompt text as messages (its ``<extra_id_1>`` turn markers split)."""
    parts = _TURN.split(text)
    msgs = [{"role": "user", "content": parts[0]}]
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "User" else "assistant"
        if role == msgs[-1]["role"]:
            raise DataError(
                f"two {speaker} turns in a row in the multi-turn prompt", field="prompt", reason="bad_order"
            )
        msgs.append({"role": role, "content": content})
    if not parts[0].strip():
        raise DataError("empty prompt", field="prompt", reason="empty_prompt")
    return check_prompt(msgs, "prompt")


def helpsteer_item(record: Mapping[str, Any], rule: str) -> tuple[str, tuple[float | None, str, dict]]:
    """(prompt text, (reward or None, response, details)) of one HelpSteer row."""
    prompt, response = _text(record, "prompt"), _text(record, "response")
    scores = {a: _number(record.get(a), a) for a in HELPSTEER_ATTRIBUTES if a in record}
    return prompt, (_reward(scores, rule), response, {"model": record.get("model"), "scores": scores})


class RatedReader:
    """Reads rated sets into ``kind`` rows; ``kind="scored"`` gives every completion with its reward."""

    def __init__(self, fmt: str, kind: str, options: FormatOptions, drops: Drops) -> None:
        self.fmt, self.kind, self.options, self.drops = fmt, kind, options, drops
        self.rule = rating_rule(fmt, options.rating)
        self.groups: dict[str, tuple[list[Message], list[tuple[float | None, str, dict]]]] = {}

    def feed(self, record: Mapping[str, Any], where: Where) -> list[Any]:
        try:
            if self.fmt == "ultrafeedback":
                return list(self.set_rows(*ultrafeedback_set(record, self.rule)))
            text, item = helpsteer_item(record, self.rule)
            if text not in self.groups:
                self.groups[text] = (helpsteer_prompt(text), [])
        except DataError as exc:
            raise exc.at(where) from None
        self.groups[text][1].append(item)
        return []

    def finish(self) -> Iterator[Any]:
        for prompt, items in self.groups.values():
            yield from self.set_rows(prompt, items)
        self.groups = {}

    def set_rows(self, prompt: list[Message], items: list[tuple[float | None, str, dict]]) -> Iterator[Any]:
        """The rows of one prompt's rated completions."""
        if self.kind == "prompts":
            yield {"prompt": prompt}
            return
        scored = []
        for reward, text, details in items:
            if not text.strip():
                self.drops.skip("empty_completion")
            elif reward is None:
                self.drops.skip("unrated")
            else:
                scored.append((reward, (text, details)))
        if self.kind == "scored":
            yield from (ScoredCompletion(prompt, text, reward, details) for reward, (text, details) in scored)
        elif self.kind == "sft" and not scored:
            self.drops.skip("no_rated_completion")
        elif self.kind == "sft":
            best = max(scored, key=lambda pair: pair[0])  # max keeps the first of equal rewards
            yield {"prompt": prompt, "completion": [{"role": "assistant", "content": best[1][0]}]}
        elif self.kind == "preferences":
            pairs, ties = pick_pairs(scored, self.options.pairs)
            self.drops.skip("tie", ties)
            for (chosen, _), (rejected, _) in pairs:
                if chosen == rejected:
                    self.drops.skip("identical")
                    continue
                yield {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                       "rejected": [{"role": "assistant", "content": rejected}]}  # fmt: skip


def details_json(item: ScoredCompletion) -> str:
    """``reward_details`` for scored.parquet: the model and every raw score, as JSON."""
    return json.dumps(item.details, sort_keys=True, ensure_ascii=False)
