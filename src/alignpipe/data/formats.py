"""Convert the accepted user formats into conversational rows (lists of role/content messages).

Accepted record formats (TRL's dataset formats, plus Anthropic HH text):

- conversational ``messages``: ``[{"role": "user", ...}, {"role": "assistant", ...}]``;
- prompt-completion: ``prompt`` + ``completion``, each a string (standard) or a list of
  messages (conversational);
- Anthropic HH ``text``: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, multi-turn;
- preference, explicit prompt: ``prompt`` + ``chosen`` + ``rejected`` (strings or messages);
- preference, implicit prompt: ``chosen`` + ``rejected`` only, each a full conversation
  (messages or HH text); the prompt is their shared beginning. A row that has a ``prompt``
  but whose ``chosen``/``rejected`` hold full conversations (UltraFeedback) is read the same
  way, as TRL's ``maybe_extract_prompt`` does.

A prompt string that starts with ``Human:`` is read as HH text. Prompts must end with a user
message; completions are assistant messages with some non-blank content. Contents parsed
from strings are stripped; contents given as messages are kept as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from alignpipe.data.errors import DataError, Where, type_name
from alignpipe.data.readers import location_unit, read_source

log = logging.getLogger(__name__)

Message = dict[str, str]
Kind = Literal["sft", "prompts", "preferences"]
ROLES = ("system", "user", "assistant")
# The id column of each kind's artifact (alignpipe.artifacts.schema) and its id prefix.
ID_COLUMNS = {"sft": ("id", "sft"), "prompts": ("prompt_id", "prompt"), "preferences": ("pair_id", "pair")}
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_MAX_LOGGED_DROPS = 5


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
    """Validate a list of messages, keeping only ``role`` and ``content``."""
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
        if not isinstance(msg["content"], str):
            raise DataError(
                f"message {i}: content must be a string, got {type_name(msg['content'])}",
                field=field,
                reason="wrong_type",
            )
        out.append({"role": msg["role"], "content": msg["content"]})
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
    raise _wrong_type(value, field, "a list of messages or Anthropic HH text")


def _is_conversation(value: Any) -> bool:
    """Whether a ``chosen``/``rejected`` value holds a whole conversation rather than only a completion."""
    if isinstance(value, str):
        return is_hh(value)
    return isinstance(value, list) and any(
        isinstance(m, Mapping) and m.get("role") != "assistant" for m in value
    )


def _check_prompt(prompt: list[Message], field: str) -> list[Message]:
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


def _prompt(value: Any, field: str = "prompt") -> list[Message]:
    """A prompt: plain text (one user message), HH text (open last turn dropped) or messages."""
    if isinstance(value, str) and is_hh(value):
        msgs = _conversation(value, field)
        if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
            msgs = msgs[:-1]  # the open "\n\nAssistant:" turn an HH prompt ends with
        return _check_prompt(msgs, field)
    if isinstance(value, str):
        if not value.strip():
            raise DataError("empty prompt", field=field, reason="empty_prompt")
        return [{"role": "user", "content": value.strip()}]
    if isinstance(value, list):
        return _check_prompt(_messages(value, field), field)
    raise _wrong_type(value, field)


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
        raise _wrong_type(value, field)
    if not any(msg["content"].strip() for msg in msgs):
        raise DataError("empty completion", field=field, reason="empty_completion")
    return msgs


def _strip_answer(msgs: list[Message]) -> tuple[list[Message], list[Message]]:
    """Split a conversation before its trailing run of assistant messages: (prompt, answer)."""
    k = len(msgs)
    while k > 0 and msgs[k - 1]["role"] == "assistant":
        k -= 1
    return msgs[:k], msgs[k:]


def _split_conversation(msgs: list[Message], field: str) -> tuple[list[Message], list[Message]]:
    """(prompt, completion) of a full conversation: the completion is its last assistant turn."""
    prompt, answer = _strip_answer(msgs)
    if not answer or not any(m["content"].strip() for m in answer):
        raise DataError(
            "the conversation does not end with a non-empty assistant message",
            field=field,
            reason="empty_completion",
        )
    return _check_prompt(prompt, field), answer


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
    return _check_prompt(chosen[:k], "chosen"), chosen[k:], rejected[k:]


def _require(record: Mapping[str, Any], field: str) -> Any:
    value = record.get(field)
    if value is None:
        raise DataError(
            f"missing (the record has {_field_list(record)})", field=field, reason="missing_field"
        )
    return value


def _field_list(record: Mapping[str, Any]) -> str:
    present = [key for key, value in record.items() if value is not None]
    return "fields " + ", ".join(map(repr, present)) if present else "no fields"


def _located(
    convert: Callable[[Mapping[str, Any]], dict[str, Any]], record: Any, where: Where | tuple[str, int | None]
) -> dict[str, Any]:
    """Run a converter so that its errors name the record's file and row."""
    where = Where(*where)
    if not isinstance(record, Mapping):
        raise DataError(f"expected an object, got {type_name(record)}", reason="wrong_type").at(where)
    try:
        return convert(record)
    except DataError as exc:
        raise exc.at(where) from None


def _sft_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"prompt", "completion"}`` from messages, prompt-completion, HH text or a preference's chosen side."""
    for field in ("messages", "text"):
        if record.get(field) is not None:
            prompt, completion = _split_conversation(_conversation(record[field], field), field)
            return {"prompt": prompt, "completion": completion}
    if record.get("completion") is not None:
        prompt, completion = (
            _prompt(_require(record, "prompt")),
            _completion(record["completion"], "completion"),
        )
    elif record.get("chosen") is not None:
        chosen = record["chosen"]
        if _is_conversation(chosen):
            prompt, completion = _split_conversation(_conversation(chosen, "chosen"), "chosen")
        else:
            prompt, completion = _prompt(_require(record, "prompt")), _completion(chosen, "chosen")
    elif record.get("prompt") is not None:
        raise DataError("missing (an SFT row needs a completion)", field="completion", reason="missing_field")
    else:
        raise _unknown_format(
            record, "'messages', 'prompt' + 'completion', 'text' (Anthropic HH) or 'chosen'"
        )
    return {"prompt": prompt, "completion": completion}


def _prompt_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"prompt"}`` from a prompt, or a conversation whose final assistant answer is dropped."""
    if record.get("prompt") is not None:
        return {"prompt": _prompt(record["prompt"])}
    for field in ("messages", "text", "chosen"):
        if record.get(field) is not None:
            return {"prompt": _check_prompt(_strip_answer(_conversation(record[field], field))[0], field)}
    raise _unknown_format(record, "'prompt', 'messages', 'text' (Anthropic HH) or 'chosen'")


def _preference_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"prompt", "chosen", "rejected"}`` from explicit- or implicit-prompt preference records."""
    if all(record.get(key) is None for key in ("prompt", "chosen", "rejected")):
        raise _unknown_format(record, "'chosen' + 'rejected', with or without 'prompt'")
    chosen, rejected = _require(record, "chosen"), _require(record, "rejected")
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str | list):
            raise _wrong_type(value, field)
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


def _wrong_type(value: Any, field: str, expected: str = "a string or a list of messages") -> DataError:
    return DataError(f"expected {expected}, got {type_name(value)}", field=field, reason="wrong_type")


def _unknown_format(record: Mapping[str, Any], expected: str) -> DataError:
    return DataError(
        f"unknown format: expected {expected}; the record has {_field_list(record)}", reason="unknown_format"
    )


def to_sft_row(record: Mapping[str, Any], where: Where | tuple[str, int | None]) -> dict[str, Any]:
    """``{"prompt", "completion"}`` (message lists) from any SFT-capable format; see the module doc."""
    return _located(_sft_row, record, where)


def to_prompt_row(record: Mapping[str, Any], where: Where | tuple[str, int | None]) -> dict[str, Any]:
    """``{"prompt"}`` (ending with a user message); a conversation's final assistant answer is dropped."""
    return _located(_prompt_row, record, where)


def to_preference_row(record: Mapping[str, Any], where: Where | tuple[str, int | None]) -> dict[str, Any]:
    """``{"prompt", "chosen", "rejected"}`` from explicit- or implicit-prompt preference records."""
    return _located(_preference_row, record, where)


_CONVERTERS = {"sft": to_sft_row, "prompts": to_prompt_row, "preferences": to_preference_row}


def _digest(row: Mapping[str, Any]) -> str:
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()


def row_id(kind: Kind, row: Mapping[str, Any]) -> str:
    """``<prefix>-<12 hex>``: sha1 of the row's canonical JSON, so reordering rows keeps ids."""
    return f"{ID_COLUMNS[kind][1]}-{_digest(row)[:12]}"


def convert(
    source: str,
    kind: Kind,
    on_invalid: Literal["error", "drop"] = "error",
    base_dir: Path | None = None,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Read ``source`` and convert every record to a ``kind`` row of its artifact schema.

    Rows get a content-hash id (``id``/``prompt_id``/``pair_id``, see :data:`ID_COLUMNS`)
    and, for sft/prompts, ``meta=None``. Repeated rows keep the first and count as dropped
    ``"duplicate"``. With ``on_invalid="drop"`` invalid rows are skipped and counted by
    reason (the first few are logged); with ``"error"`` the first raises. Reader errors
    (missing file, malformed JSON line, bad encoding) always raise, and so does a source
    that yields no valid row at all. Returns ``(rows, dropped)``.
    """
    if kind not in _CONVERTERS or on_invalid not in ("error", "drop"):
        raise ValueError(f"kind must be one of {sorted(_CONVERTERS)}, on_invalid 'error' or 'drop'")
    to_row, (id_column, _) = _CONVERTERS[kind], ID_COLUMNS[kind]
    unit = location_unit(source)
    rows: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    seen: dict[str, str] = {}  # id -> full digest, to tell a duplicate from a (48-bit) id collision
    for index, record in read_source(source, base_dir):
        try:
            row = to_row(record, Where(source, index, unit))
        except DataError as exc:
            if on_invalid == "error":
                raise
            dropped[exc.reason] += 1
            if sum(dropped.values()) <= _MAX_LOGGED_DROPS:
                log.warning("dropped invalid row: %s", exc)
            continue
        rid, digest = row_id(kind, row), _digest(row)
        if seen.get(rid) == digest:
            dropped["duplicate"] += 1
            continue
        if rid in seen:
            raise DataError(f"id collision on {rid}; please report this", file=source, row=index, unit=unit)
        seen[rid] = digest
        rows.append({id_column: rid, **row, **({} if kind == "preferences" else {"meta": None})})
    if not rows:
        detail = f" (dropped: {dict(dropped)})" if dropped else ""
        raise DataError(f"no valid {kind} rows{detail}", file=source, reason="empty")
    return rows, dropped
