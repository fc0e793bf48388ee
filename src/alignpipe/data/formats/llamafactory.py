"""LLaMA-Factory's v1 layout: messages whose content is a list of parts, with per-turn loss weights.

- SFT: ``{"messages": [{"role": "user", "content": [{"type": "text", "value": ...}],
  "loss_weight": 0.0}, {"role": "assistant", ..., "loss_weight": 1.0}]}``.
- Preferences: ``chosen_messages`` and ``rejected_messages``, two full conversations; the
  prompt is their shared beginning (as for TRL's implicit prompt).
- Content: text parts are joined without a separator; any other part (``image_url``,
  ``audio_url``, ``video_url``, ``tools``, ``tool_calls``, ``reasoning``) is refused.
- ``loss_weight``: every assistant turn with weight 1 becomes one SFT row (the conversation
  before it is the prompt); weight 0 keeps it as context only. A missing weight is 1 for an
  assistant turn and 0 otherwise (LLaMA-Factory's default). Other weights are refused:
  alignpipe trains a completion fully or not at all, and it trains assistant turns only.
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
    extract_prompt,
    map_role,
    require,
    split_conversation,
    strip_answer,
    turn_rows,
)


def _weight(turn: Mapping[str, Any], role: str, i: int, field: str) -> bool:
    """Whether the turn is trained, from its ``loss_weight`` (0 or 1; default 1 for assistant turns)."""
    weight = turn.get("loss_weight")
    if weight is None:
        return role == "assistant"
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise DataError(
            f"message {i}: loss_weight must be a number, got {type_name(weight)}",
            field=field,
            reason="wrong_type",
        )
    if weight not in (0, 1):
        raise DataError(
            f"message {i}: loss_weight {weight} is not supported; alignpipe trains a turn fully (1) or "
            "not at all (0)",
            field=field,
            reason="bad_loss_weight",
        )
    if weight == 1 and role != "assistant":
        raise DataError(
            f"message {i}: loss_weight 1 on a {role} turn; alignpipe trains assistant turns only",
            field=field,
            reason="bad_loss_weight",
        )
    return weight == 1


def _messages(value: Any, field: str) -> tuple[list[Message], list[bool]]:
    """(messages, trained flags) of a v1 message list."""
    if not isinstance(value, list):
        raise DataError(
            f"expected a list of messages, got {type_name(value)}", field=field, reason="wrong_type"
        )
    if not value:
        raise DataError("empty list of messages", field=field, reason="empty")
    msgs, trained = [], []
    for i, turn in enumerate(value):
        if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
            got = type_name(turn) if not isinstance(turn, Mapping) else f"keys {sorted(turn)}"
            raise DataError(
                f"message {i}: expected {{'role', 'content'}}, got {got}", field=field, reason="wrong_type"
            )
        role = map_role(turn["role"], f"message {i}", field)
        msgs.append({"role": role, "content": content_text(turn["content"], f"message {i}", field)})
        trained.append(_weight(turn, role, i, field))
    return msgs, trained


def llamafactory_rows(record: Mapping[str, Any], kind: str) -> list[Row]:
    """The ``kind`` rows of a LLaMA-Factory v1 record (see the module doc)."""
    if record.get("messages") is not None and kind != "preferences":
        msgs, trained = _messages(record["messages"], "messages")
        if kind == "prompts":
            return [{"prompt": check_prompt(strip_answer(msgs)[0], "messages")}]
        return turn_rows(msgs, trained, "messages")
    chosen, _ = _messages(require(record, "chosen_messages"), "chosen_messages")
    if kind == "sft":
        prompt, completion = split_conversation(chosen, "chosen_messages")
        return [{"prompt": prompt, "completion": completion}]
    rejected, _ = _messages(require(record, "rejected_messages"), "rejected_messages")
    try:
        prompt, chosen_answer, rejected_answer = extract_prompt(chosen, rejected)
    except DataError as exc:  # name the v1 fields, not TRL's
        field = {"chosen": "chosen_messages", "rejected": "rejected_messages"}.get(exc.field or "", exc.field)
        raise DataError(exc.message, field=field, reason=exc.reason) from None
    if kind == "prompts":
        return [{"prompt": prompt}]
    return [{"prompt": prompt, "chosen": chosen_answer, "rejected": rejected_answer}]
