"""Message helpers shared by every format: roles, content parts, prompt/completion checks.

A row is made of message lists, ``[{"role": "system" | "user" | "assistant", "content": str}]``.
Every function here raises :class:`DataError` with a field and a reason;
:mod:`alignpipe.data.convert` adds the file and the row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from alignpipe.data.errors import DataError, Where, type_name

Message = dict[str, str]
Row = dict[str, Any]
ROLES = ("system", "user", "assistant")
# The role names of ShareGPT (human/gpt), OpenAssistant (prompter) and OpenAI/TRL (user/assistant).
ROLE_MAP = {
    "system": "system",
    "human": "user",
    "user": "user",
    "prompter": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
# Tool-use roles of ShareGPT/LLaMA-Factory: refused, since alignpipe trains plain chat.
TOOL_ROLES = ("observation", "function_call", "function", "tool")


def map_role(role: Any, where: str, field: str) -> str:
    """The alignpipe role of a source role name (human/prompter/user -> user, gpt/assistant -> assistant)."""
    if isinstance(role, str) and role in ROLE_MAP:
        return ROLE_MAP[role]
    if role in TOOL_ROLES:
        raise DataError(
            f"{where}: role {role!r} (tool use) is not supported; alignpipe trains plain chat turns",
            field=field,
            reason="unsupported_role",
        )
    raise DataError(
        f"{where}: unknown role {role!r}; expected one of {', '.join(ROLE_MAP)}",
        field=field,
        reason="bad_role",
    )


def content_text(content: Any, where: str, field: str) -> str:
    """A message's text: a string, or a list of text parts joined without a separator.

    Parts are ``{"type": "text", "text": ...}`` (OpenAI, TRL) or ``{"type": "text", "value": ...}``
    (LLaMA-Factory); any other part type (image, audio, video, tool calls, reasoning) is refused.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(
            f"{where}: content must be a string, got {type_name(content)}", field=field, reason="wrong_type"
        )
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise DataError(
                f"{where}: content part {j}: expected an object, got {type_name(part)}",
                field=field,
                reason="wrong_type",
            )
        if part.get("type") != "text":
            raise DataError(
                f"{where}: content part {j} has type {part.get('type')!r}; only text parts are supported",
                field=field,
                reason="non_text_content",
            )
        text = part.get("text", part.get("value"))
        if not isinstance(text, str):
            raise DataError(
                f"{where}: content part {j}: text must be a string, got {type_name(text)}",
                field=field,
                reason="wrong_type",
            )
        texts.append(text)
    return "".join(texts)


def check_prompt(prompt: list[Message], field: str) -> list[Message]:
    """A prompt is not empty and ends with a user message."""
    if not prompt:
        raise DataError(
            "empty prompt (no turn before the assistant's answer)", field=field, reason="empty_prompt"
        )
    if prompt[-1]["role"] != "user":
        raise DataError(
            f"the prompt must end with a user message; its last one has role {prompt[-1]['role']!r}",
            field=field,
            reason="bad_prompt",
        )
    return prompt


def strip_answer(msgs: list[Message]) -> tuple[list[Message], list[Message]]:
    """Split a conversation before its trailing run of assistant messages: (prompt, answer)."""
    k = len(msgs)
    while k > 0 and msgs[k - 1]["role"] == "assistant":
        k -= 1
    return msgs[:k], msgs[k:]


def split_conversation(msgs: list[Message], field: str) -> tuple[list[Message], list[Message]]:
    """(prompt, completion) of a full conversation: the completion is its last assistant turn."""
    prompt, answer = strip_answer(msgs)
    if not answer or not any(m["content"].strip() for m in answer):
        raise DataError(
            "the conversation does not end with a non-empty assistant message",
            field=field,
            reason="empty_completion",
        )
    return check_prompt(prompt, field), answer


def turn_rows(msgs: list[Message], trained: Sequence[bool], field: str) -> list[Row]:
    """One SFT row per trained assistant turn: ``{"prompt": everything before it, "completion": it}``.

    A turn is a run of consecutive assistant messages; it is trained when any of its messages
    is (``trained[i]``). ShareGPT, LLaMA-Factory and OpenAssistant conversations train every
    assistant turn (as LLaMA-Factory and axolotl do), so a 2-turn conversation gives 2 rows.
    """
    rows: list[Row] = []
    n = len(msgs)
    for end in range(n):
        if msgs[end]["role"] != "assistant" or (end + 1 < n and msgs[end + 1]["role"] == "assistant"):
            continue
        start = end
        while start > 0 and msgs[start - 1]["role"] == "assistant":
            start -= 1
        if not any(trained[start : end + 1]):
            continue
        if not any(m["content"].strip() for m in msgs[start : end + 1]):
            raise DataError(f"message {end}: empty assistant reply", field=field, reason="empty_completion")
        rows.append({"prompt": check_prompt(msgs[:start], field), "completion": msgs[start : end + 1]})
    if not rows:
        raise DataError(
            "no assistant reply to learn from (a conversation needs one trained assistant turn)",
            field=field,
            reason="empty_completion",
        )
    return rows


def extract_prompt(
    chosen: list[Message], rejected: list[Message]
) -> tuple[list[Message], list[Message], list[Message]]:
    """Split two full conversations into (prompt, chosen completion, rejected completion).

    The prompt is their longest common prefix of messages, cut back to end before an
    assistant message; what is left of each must be only its final assistant message(s).
    """
    if chosen == rejected:
        raise DataError("chosen and rejected are identical", field="rejected", reason="identical")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and chosen[k - 1]["role"] == "assistant":
        k -= 1
    if k == 0:
        raise DataError(
            "chosen and rejected share no prompt (their first messages differ)",
            field="rejected",
            reason="no_shared_prefix",
        )
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        rest = msgs[k:]
        other = next((m for m in rest if m["role"] != "assistant"), None)
        if other is not None:
            raise DataError(
                f"chosen and rejected differ before their final assistant turn (a {other['role']} message "
                "follows the shared prompt)",
                field=field,
                reason="no_shared_prefix",
            )
        if not any(m["content"].strip() for m in rest):
            raise DataError(
                "empty completion after the shared prompt", field=field, reason="empty_completion"
            )
    return check_prompt(chosen[:k], "chosen"), chosen[k:], rejected[k:]


def preference(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> Row:
    """A preference row; chosen and rejected must differ and hold some text."""
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["content"].strip() for m in msgs):
            raise DataError("empty completion", field=field, reason="empty_completion")
    if chosen == rejected:
        raise DataError("chosen and rejected are identical", field="rejected", reason="identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def require(record: Mapping[str, Any], field: str) -> Any:
    value = record.get(field)
    if value is None:
        raise DataError(f"missing (the record has {field_list(record)})", field=field, reason="missing_field")
    return value


def field_list(record: Mapping[str, Any]) -> str:
    present = [key for key, value in record.items() if value is not None]
    return "fields " + ", ".join(map(repr, present)) if present else "no fields"


def wrong_type(value: Any, field: str, expected: str = "a string or a list of messages") -> DataError:
    return DataError(f"expected {expected}, got {type_name(value)}", field=field, reason="wrong_type")


def unknown_format(record: Mapping[str, Any], expected: str) -> DataError:
    return DataError(
        f"unknown format: expected {expected}; the record has {field_list(record)}", reason="unknown_format"
    )


def located(
    convert: Callable[[Mapping[str, Any]], Any], record: Any, where: Where | tuple[str, int | None]
) -> Any:
    """Run a converter so that its errors name the record's file and row."""
    where = Where(*where)
    if not isinstance(record, Mapping):
        raise DataError(f"expected an object, got {type_name(record)}", reason="wrong_type").at(where)
    try:
        return convert(record)
    except DataError as exc:
        raise exc.at(where) from None
