"""TRL's dataset formats and Anthropic HH text (formats ``trl`` and ``hh``).

Accepted records:

- conversational ``messages``: ``[{"role": "user", ...}, {"role": "assistant", ...}]``;
- prompt-completion: ``prompt`` + ``completion``, each a string (standard) or a list of
  messages (conversational);
- Anthropic HH ``text``: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, multi-turn;
- preference, explicit prompt: ``prompt`` + ``chosen`` + ``rejected`` (strings or messages);
- preference, implicit prompt: ``chosen`` + ``rejected`` only, each a full conversation
  (messages or HH text); the prompt is their shared beginning. A row that has a ``prompt``
  but whose ``chosen``/``rejected`` hold full conversations (UltraFeedback) is read the same
  way, as TRL's ``maybe_extract_prompt`` does.
- unpaired preference (KTO): ``prompt`` + ``completion`` + a boolean ``label`` (true:
  desirable), strings or messages, or ``messages`` ending in the assistant turn + ``label``.

A prompt string that starts with ``Human:`` is read as HH text. Prompts must end with a user
message; completions are assistant messages with some non-blank content. Contents parsed
from strings are stripped; contents given as messages are kept as they are (a list of text
parts is joined). Format ``hh`` reads the same records but requires their conversation fields
to be HH text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from alignpipe.data.errors import DataError, Where, type_name
from alignpipe.data.formats.messages import (
    ROLES,
    Message,
    Row,
    check_prompt,
    content_text,
    extract_prompt,
    located,
    require,
    split_conversation,
    strip_answer,
    unknown_format,
    wrong_type,
)

_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_FIELDS = ("text", "prompt", "chosen", "rejected")


def is_hh(text: str) -> bool:
    """Whether ``text`` is Anthropic HH dialogue (it starts with a ``Human:`` turn)."""
    return text.lstrip().startswith("Human:")


def hh_to_messages(text: str) -> list[Message]:
    """Parse ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` into messages with stripped content.

    A final empty ``Assistant:`` turn (an HH prompt) is kept as an empty assistant
    message. Raises ``ValueError`` (a :class:`DataError` without location) on text
    without markers or with text before the first one.
    """
    parts = _HH_MARKER.split(text.lstrip())
    if len(parts) == 1:
        raise DataError(
            "no '\\n\\nHuman:' / '\\n\\nAssistant:' markers (not Anthropic HH text)", reason="bad_hh"
        )
    if parts[0].strip():
        raise DataError(f"text before the first 'Human:' marker: {parts[0][:40]!r}", reason="bad_hh")
    return [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _messages(value: list[Any], field: str) -> list[Message]:
    """Validate a list of messages, keeping only ``role`` and ``content`` (text parts are joined)."""
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            got = type_name(msg) if not isinstance(msg, Mapping) else f"keys {sorted(msg)}"
            raise DataError(
                f"message {i}: expected {{'role', 'content'}}, got {got}", field=field, reason="wrong_type"
            )
        if msg["role"] not in ROLES:
            raise DataError(
                f"message {i}: role {msg['role']!r} is not one of {', '.join(ROLES)}",
                field=field,
                reason="bad_role",
            )
        content = content_text(msg["content"], f"message {i}", field)
        out.append({"role": msg["role"], "content": content})
    if not out:
        raise DataError("empty list of messages", field=field, reason="empty")
    return out


def _conversation(value: Any, field: str) -> list[Message]:
    """A full conversation: a list of messages or HH text."""
    if isinstance(value, list):
        return _messages(value, field)
    if isinstance(value, str):
        try:
            return hh_to_messages(value)
        except DataError as exc:
            raise DataError(exc.message, field=field, reason=exc.reason) from None
    raise wrong_type(value, field, "a list of messages or Anthropic HH text")


def _is_conversation(value: Any) -> bool:
    """Whether a ``chosen``/``rejected`` value holds a whole conversation rather than only a completion."""
    if isinstance(value, str):
        return is_hh(value)
    return isinstance(value, list) and any(
        isinstance(m, Mapping) and m.get("role") != "assistant" for m in value
    )


def _prompt(value: Any, field: str = "prompt") -> list[Message]:
    """A prompt: plain text (one user message), HH text (open last turn dropped) or messages."""
    if isinstance(value, str) and is_hh(value):
        msgs = _conversation(value, field)
        if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
            msgs = msgs[:-1]  # the open "\n\nAssistant:" turn an HH prompt ends with
        return check_prompt(msgs, field)
    if isinstance(value, str):
        if not value.strip():
            raise DataError("empty prompt", field=field, reason="empty_prompt")
        return [{"role": "user", "content": value.strip()}]
    if isinstance(value, list):
        return check_prompt(_messages(value, field), field)
    raise wrong_type(value, field)


def _completion(value: Any, field: str) -> list[Message]:
    """A completion: text (one assistant message) or a list of assistant messages."""
    if isinstance(value, str):
        msgs = [{"role": "assistant", "content": value.strip()}]
    elif isinstance(value, list):
        msgs = _messages(value, field)
        for i, msg in enumerate(msgs):
            if msg["role"] != "assistant":
                raise DataError(
                    f"message {i}: a completion holds assistant messages only, got role {msg['role']!r}",
                    field=field,
                    reason="bad_role",
                )
    else:
        raise wrong_type(value, field)
    if not any(msg["content"].strip() for msg in msgs):
        raise DataError("empty completion", field=field, reason="empty_completion")
    return msgs


def _sft_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"prompt", "completion"}`` from messages, prompt-completion, HH text or a preference's chosen side."""
    for field in ("messages", "text"):
        if record.get(field) is not None:
            prompt, completion = split_conversation(_conversation(record[field], field), field)
            return {"prompt": prompt, "completion": completion}
    if record.get("completion") is not None:
        prompt, completion = (
            _prompt(require(record, "prompt")),
            _completion(record["completion"], "completion"),
        )
    elif record.get("chosen") is not None:
        chosen = record["chosen"]
        if _is_conversation(chosen):
            prompt, completion = split_conversation(_conversation(chosen, "chosen"), "chosen")
        else:
            prompt, completion = _prompt(require(record, "prompt")), _completion(chosen, "chosen")
    elif record.get("prompt") is not None:
        raise DataError("missing (an SFT row needs a completion)", field="completion", reason="missing_field")
    else:
        raise unknown_format(record, "'messages', 'prompt' + 'completion', 'text' (Anthropic HH) or 'chosen'")
    return {"prompt": prompt, "completion": completion}


def _prompt_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"prompt"}`` from a prompt, or a conversation whose final assistant answer is dropped."""
    if record.get("prompt") is not None:
        return {"prompt": _prompt(record["prompt"])}
    for field in ("messages", "text", "chosen"):
        if record.get(field) is not None:
            return {"prompt": check_prompt(strip_answer(_conversation(record[field], field))[0], field)}
    raise unknown_format(record, "'prompt', 'messages', 'text' (Anthropic HH) or 'chosen'")


def _preference_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"prompt", "chosen", "rejected"}`` from explicit- or implicit-prompt preference records."""
    if all(record.get(key) is None for key in ("prompt", "chosen", "rejected")):
        raise unknown_format(record, "'chosen' + 'rejected', with or without 'prompt'")
    chosen, rejected = require(record, "chosen"), require(record, "rejected")
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str | list):
            raise wrong_type(value, field)
    full_chosen, full_rejected = _is_conversation(chosen), _is_conversation(rejected)
    if full_chosen and full_rejected:  # implicit prompt (a 'prompt' field, if any, is ignored, as in TRL)
        prompt, chosen_msgs, rejected_msgs = extract_prompt(
            _conversation(chosen, "chosen"), _conversation(rejected, "rejected")
        )
        return {"prompt": prompt, "chosen": chosen_msgs, "rejected": rejected_msgs}
    if full_chosen or full_rejected:
        full, part = ("chosen", "rejected") if full_chosen else ("rejected", "chosen")
        raise DataError(
            f"{full!r} holds a whole conversation but {part!r} only a completion; give both the same way",
            field=part,
            reason="mixed_format",
        )
    chosen_msgs, rejected_msgs = _completion(chosen, "chosen"), _completion(rejected, "rejected")
    if record.get("prompt") is None:
        raise DataError(
            "missing: 'chosen' and 'rejected' hold completions only, so a prompt is needed "
            "(or give each as a whole conversation)",
            field="prompt",
            reason="missing_field",
        )
    prompt = _prompt(record["prompt"])
    if chosen_msgs == rejected_msgs:
        raise DataError("chosen and rejected are identical", field="rejected", reason="identical")
    return {"prompt": prompt, "chosen": chosen_msgs, "rejected": rejected_msgs}


def _label(record: Mapping[str, Any]) -> bool:
    """A KTO label: a boolean (true: desirable); the strings true/false too, as a CSV file holds them."""
    value = require(record, "label")
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise DataError(
        f"expected a boolean (true: desirable, false: undesirable), got {type_name(value)} {value!r}",
        field="label",
        reason="bad_label",
    )


def _unpaired_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"prompt", "completion", "label"}`` from TRL's unpaired preference rows (prompt, completion,
    label; strings or messages) or a ``messages`` conversation ending in the assistant turn + ``label``."""
    if record.get("messages") is not None:
        if record.get("completion") is not None:
            raise DataError(
                "give either 'messages' or 'prompt' + 'completion', not both",
                field="completion",
                reason="ambiguous",
            )
        prompt, completion = split_conversation(_conversation(record["messages"], "messages"), "messages")
    elif record.get("completion") is not None:
        prompt, completion = (
            _prompt(require(record, "prompt")),
            _completion(record["completion"], "completion"),
        )
    elif record.get("chosen") is not None or record.get("rejected") is not None:
        raise DataError(
            "a preference pair (chosen/rejected) is not unpaired feedback; give it in data.preferences.source, "
            "or give 'completion' + 'label'",
            field="chosen" if record.get("chosen") is not None else "rejected",
            reason="unknown_format",
        )
    elif record.get("prompt") is not None:
        raise DataError(
            "missing (an unpaired row needs a completion and its label)",
            field="completion",
            reason="missing_field",
        )
    else:
        raise unknown_format(record, "'prompt' + 'completion' + 'label', or 'messages' + 'label'")
    return {"prompt": prompt, "completion": completion, "label": _label(record)}


def to_sft_row(record: Mapping[str, Any], where: Where | tuple[str, int | None]) -> dict[str, Any]:
    """``{"prompt", "completion"}`` (message lists) from any SFT-capable format; see the module doc."""
    return located(_sft_row, record, where)


def to_prompt_row(record: Mapping[str, Any], where: Where | tuple[str, int | None]) -> dict[str, Any]:
    """``{"prompt"}`` (ending with a user message); a conversation's final assistant answer is dropped."""
    return located(_prompt_row, record, where)


def to_preference_row(record: Mapping[str, Any], where: Where | tuple[str, int | None]) -> dict[str, Any]:
    """``{"prompt", "chosen", "rejected"}`` from explicit- or implicit-prompt preference records."""
    return located(_preference_row, record, where)


def to_unpaired_row(record: Mapping[str, Any], where: Where | tuple[str, int | None]) -> dict[str, Any]:
    """``{"prompt", "completion", "label"}``: one completion and its KTO label (true: desirable)."""
    return located(_unpaired_row, record, where)


_TO_ROW = {"sft": _sft_row, "prompts": _prompt_row, "preferences": _preference_row, "unpaired": _unpaired_row}


def trl_rows(record: Mapping[str, Any], kind: str) -> list[Row]:
    """The ``kind`` row of a TRL-format record (HH text accepted in its string fields)."""
    return [_TO_ROW[kind](record)]


def hh_rows(record: Mapping[str, Any], kind: str) -> list[Row]:
    """The ``kind`` row of an Anthropic HH record: its string fields must be ``Human:`` dialogue."""
    present = [f for f in _HH_FIELDS if record.get(f) is not None]
    if not present:
        raise unknown_format(record, "'text', or 'chosen' + 'rejected' as Anthropic HH text")
    for field in present:
        value = record[field]
        if field != "prompt" and not (isinstance(value, str) and is_hh(value)):
            raise DataError(
                "not Anthropic HH text (format 'hh' needs a string starting with 'Human:')",
                field=field,
                reason="bad_hh",
            )
    return trl_rows(record, kind)
