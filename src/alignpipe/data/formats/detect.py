"""Tell a file's format from its first record, or say that it is ambiguous.

Each format is recognised by the fields only it uses (fields holding null count as absent):

==============  ==================================================================
sharegpt        ``conversations``
llamafactory    ``chosen_messages`` / ``rejected_messages``, or ``messages`` whose turns
                carry ``loss_weight`` or content parts with a ``value``
oasst           a tree (``message_tree_id`` + a ``prompt`` object) or a message
                (``message_id`` + ``role`` + ``text``)
ultrafeedback   ``instruction`` + ``completions``
helpsteer       ``prompt`` + ``response`` + an attribute score (``helpfulness`` ...)
hh              ``text``, or ``chosen``/``rejected``, holding ``Human:`` dialogue text
trl             ``messages``, ``prompt``, ``completion``, ``chosen``/``rejected``
==============  ==================================================================

A record that matches two of them (``conversations`` and ``messages``, say) is ambiguous:
the user names the format with ``data.<part>.format``. ``trl`` and ``hh`` share one reader,
so a record with both is read as ``trl``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alignpipe.data.errors import DataError, Where

FORMATS = ("trl", "hh", "sharegpt", "llamafactory", "oasst", "ultrafeedback", "helpsteer")
HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def _is_hh(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("Human:")


def _llamafactory_messages(value: Any) -> bool:
    """Turns with ``loss_weight`` or ``{"type", "value"}`` content parts (LLaMA-Factory v1)."""
    if not isinstance(value, list):
        return False
    for turn in value:
        if not isinstance(turn, Mapping):
            continue
        content = turn.get("content")
        parts = content if isinstance(content, list) else []
        if "loss_weight" in turn or any(isinstance(p, Mapping) and "value" in p for p in parts):
            return True
    return False


def candidates(record: Mapping[str, Any]) -> set[str]:
    """Every format whose own fields the record has."""
    keys = {key for key, value in record.items() if value is not None}
    found = set()
    if "conversations" in keys:
        found.add("sharegpt")
    if keys & {"chosen_messages", "rejected_messages"} or _llamafactory_messages(record.get("messages")):
        found.add("llamafactory")
    elif keys & {"messages", "completion"}:
        found.add("trl")
    if ("message_tree_id" in keys and isinstance(record.get("prompt"), Mapping)) or {
        "message_id",
        "role",
        "text",
    } <= keys:
        found.add("oasst")
    if {"instruction", "completions"} <= keys:
        found.add("ultrafeedback")
    if {"prompt", "response"} <= keys and keys & set(HELPSTEER_ATTRIBUTES):
        found.add("helpsteer")
    if "oasst" not in found and any(_is_hh(record.get(f)) for f in ("text", "chosen", "rejected")):
        found.add("hh")
    if not found and keys & {"prompt", "chosen", "rejected"}:
        found.add("trl")
    return found


def detect(record: Mapping[str, Any], where: Where, part: str | None = None) -> str:
    """The format of ``record`` (``trl`` when nothing else fits, so its errors name the fields)."""
    found = candidates(record)
    if found <= {"trl", "hh"}:
        return "trl" if "trl" in found or not found else "hh"
    if len(found) == 1:
        return found.pop()
    setting = (part if "." in part else f"data.{part}") + ".format" if part else "data.<part>.format"
    names = sorted(found - {"hh"} if "trl" in found else found)
    raise DataError(
        f"ambiguous format: the record has the fields of {' and '.join(names)}; "
        f"name the format with {setting} (one of {', '.join(FORMATS)})",
        reason="ambiguous_format",
    ).at(where)
