"""ShareGPT, as axolotl and LLaMA-Factory read it.

- SFT: ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...],
  "system": "..."}``. Turns alternate human and gpt after an optional leading system turn; a
  system turn in ``conversations`` wins over the ``system`` column (as in LLaMA-Factory).
  Every gpt turn is trained (LLaMA-Factory and axolotl learn the history's answers too), so
  each gpt turn becomes one SFT row whose prompt is the conversation before it.
- Preferences: ``conversations`` ends with a human turn; ``chosen`` and ``rejected`` are one
  gpt turn object each, a list of gpt turns, or a plain string.
- Roles: human/user -> user, gpt/assistant -> assistant, system. Turns may also use
  ``role``/``content`` keys. Tool use (``function_call``, ``observation``, a ``tools``
  column) and media (``images``, ``videos``, ``audios``) are refused: alignpipe trains text chat.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alignpipe.data.errors import DataError, type_name
from alignpipe.data.formats.messages import (
    Message,
    Row,
    check_prompt,
    content_text,
    map_role,
    preference,
    require,
    strip_answer,
    turn_rows,
)

_SOURCE_NAME = {"user": "human", "assistant": "gpt", "system": "system"}
_MEDIA = ("images", "videos", "audios")


def _turn(turn: Any, i: int, field: str) -> Message:
    if not isinstance(turn, Mapping):
        raise DataError(
            f"turn {i}: expected an object, got {type_name(turn)}", field=field, reason="wrong_type"
        )
    keys = ("from", "value") if "from" in turn else ("role", "content")
    if any(key not in turn for key in keys):
        raise DataError(
            f"turn {i}: expected {{'from', 'value'}}, got keys {sorted(turn)}",
            field=field,
            reason="wrong_type",
        )
    role = map_role(turn[keys[0]], f"turn {i}", field)
    return {"role": role, "content": content_text(turn[keys[1]], f"turn {i}", field)}


def _turns(value: Any, field: str) -> list[Message]:
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"expected a list of turns, got {type_name(value)}", field=field, reason="wrong_type")
    if not value:
        raise DataError("empty list of turns", field=field, reason="empty")
    return [_turn(turn, i, field) for i, turn in enumerate(value)]


def _check_order(msgs: list[Message], field: str) -> None:
    """System turns first, then human and gpt alternating, starting with human."""
    start = 0
    while start < len(msgs) and msgs[start]["role"] == "system":
        start += 1
    for i in range(start, len(msgs)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if msgs[i]["role"] != expected:
            raise DataError(
                f"turn {i}: expected a {_SOURCE_NAME[expected]} turn, got {_SOURCE_NAME[msgs[i]['role']]} "
                "(after an optional system turn, turns alternate human, gpt)",
                field=field,
                reason="bad_order",
            )


def _refuse_unsupported(record: Mapping[str, Any]) -> None:
    if record.get("tools"):
        raise DataError(
            "tool descriptions are not supported (alignpipe trains plain chat)",
            field="tools",
            reason="unsupported_tools",
        )
    for field in _MEDIA:
        if record.get(field):
            raise DataError(
                "media inputs are not supported (alignpipe trains text only)",
                field=field,
                reason="non_text_content",
            )


def _conversation(record: Mapping[str, Any]) -> list[Message]:
    msgs = _turns(require(record, "conversations"), "conversations")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"expected a string, got {type_name(system)}", field="system", reason="wrong_type")
    _check_order(msgs, "conversations")
    for i, msg in enumerate(msgs):  # turn numbers as in the file, before the system column joins
        if msg["role"] == "assistant" and not msg["content"].strip():
            raise DataError(f"turn {i}: empty gpt reply", field="conversations", reason="empty_completion")
    if system and system.strip() and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}, *msgs]
    return msgs


def _answer(value: Any, field: str) -> list[Message]:
    """``chosen``/``rejected``: a gpt turn object, a list of gpt turns, or a string."""
    msgs = [{"role": "assistant", "content": value}] if isinstance(value, str) else _turns(value, field)
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            raise DataError(
                f"turn {i}: an answer holds gpt turns only, got {_SOURCE_NAME[msg['role']]}",
                field=field,
                reason="bad_role",
            )
    return msgs


def sharegpt_rows(record: Mapping[str, Any], kind: str) -> list[Row]:
    """The ``kind`` rows of a ShareGPT record (see the module doc)."""
    _refuse_unsupported(record)
    conversation = _conversation(record)
    is_pair = record.get("chosen") is not None or record.get("rejected") is not None
    if kind == "preferences":
        prompt = check_prompt(conversation, "conversations")
        chosen = _answer(require(record, "chosen"), "chosen")
        return [preference(prompt, chosen, _answer(require(record, "rejected"), "rejected"))]
    if is_pair:
        prompt = check_prompt(conversation, "conversations")
        if kind == "prompts":
            return [{"prompt": prompt}]
        completion = _answer(require(record, "chosen"), "chosen")
        if not any(m["content"].strip() for m in completion):
            raise DataError("empty completion", field="chosen", reason="empty_completion")
        return [{"prompt": prompt, "completion": completion}]
    if kind == "prompts":
        return [{"prompt": check_prompt(strip_answer(conversation)[0], "conversations")}]
    return turn_rows(conversation, [True] * len(conversation), "conversations")
