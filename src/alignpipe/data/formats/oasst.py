"""OpenAssistant (oasst1, oasst2) message trees, flat or nested.

- Flat (``*.messages.jsonl``, the HF parquet): one message a row, ``message_id``,
  ``parent_id`` (null for the tree's initial prompt), ``role`` (``prompter`` / ``assistant``),
  ``text``, ``rank`` (0 = preferred among siblings, null when unranked), ``lang``,
  ``deleted``, ``review_result``. Rows are grouped into trees after the last one is read.
- Nested (``*.trees.jsonl``): one tree a line, ``{"message_tree_id", "prompt": message}``,
  each message holding its ``replies``.

What ``prepare`` makes of a tree (prompter -> user):

- ``sft``: the best-ranked path: from the initial prompt, the reply with the lowest rank at
  each level (unranked after ranked, ties broken by file order) down to a leaf, trailing
  prompter message cut; one SFT row per assistant turn on it (the path before it is the prompt).
- ``prompts``: the initial prompt of each tree.
- ``preferences``: at every prompter message, its ranked assistant replies make pairs by rank
  (``best_vs_worst``: best against worst; ``all_pairs``: every two with different ranks); the
  conversation from the initial prompt to that message is the prompt, multi-turn kept. Equal
  ranks make no pair and count as ``tie``.
- Deleted messages, ``review_result: false``, empty texts and (with ``lang``) other languages
  are dropped with everything below them, and counted (``deleted``, ``review_rejected``,
  ``empty_text``, ``lang``; the replies under them as ``reply_to_dropped``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from alignpipe.data.errors import DataError, Where, type_name
from alignpipe.data.formats.messages import Message, Row, turn_rows, unknown_format
from alignpipe.data.formats.pairing import pick_pairs

if TYPE_CHECKING:
    from alignpipe.data.formats.base import Drops, FormatOptions

_ROLES = {"prompter": "user", "assistant": "assistant"}


@dataclass
class Node:
    """One message of a tree, validated."""

    id: str
    parent: str | None
    role: str  # user | assistant
    text: str
    rank: int | None
    lang: str | None
    drop_reason: str | None  # deleted | review_rejected, from the message itself
    where: Where
    replies: list[Node] = field(default_factory=list)

    def size(self) -> int:
        return 1 + sum(reply.size() for reply in self.replies)


_TYPE_NAMES = {str: "a string", bool: "true or false", (int, float): "a number"}


def _typed(msg: Mapping[str, Any], key: str, types: Any, path: str, optional: bool) -> Any:
    """``msg[key]`` if it has the type (bool is not a number here); None when optional and absent."""
    value = msg.get(key)
    if value is None:
        if optional:
            return None
        raise DataError("missing", field=path + key, reason="missing_field")
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
        raise DataError(
            f"expected {_TYPE_NAMES[types]}, got {type_name(value)}", field=path + key, reason="wrong_type"
        )
    return value


def _rank(msg: Mapping[str, Any], path: str) -> int | None:
    """``rank`` as an int; the HF parquet stores it as a float, NaN when unranked."""
    rank = _typed(msg, "rank", (int, float), path, optional=True)
    if isinstance(rank, float):
        if math.isnan(rank):
            return None
        if not rank.is_integer():
            raise DataError(f"expected a whole number, got {rank}", field=path + "rank", reason="wrong_type")
    return None if rank is None else int(rank)


def parse_message(msg: Any, where: Where, path: str = "") -> Node:
    """A :class:`Node` from an oasst message (fields named ``path + key`` in errors)."""
    if not isinstance(msg, Mapping):
        raise DataError(
            f"expected a message object, got {type_name(msg)}", field=path or None, reason="wrong_type"
        )
    role = msg.get("role")
    if role not in _ROLES:
        raise DataError(
            f"role {role!r} is not 'prompter' or 'assistant'", field=path + "role", reason="bad_role"
        )
    deleted = _typed(msg, "deleted", bool, path, optional=True)
    review = _typed(msg, "review_result", bool, path, optional=True)
    return Node(
        id=_typed(msg, "message_id", str, path, optional=False),
        parent=_typed(msg, "parent_id", str, path, optional=True),
        role=_ROLES[role],
        text=_typed(msg, "text", str, path, optional=False),
        rank=_rank(msg, path),
        lang=_typed(msg, "lang", str, path, optional=True),
        drop_reason="deleted" if deleted else "review_rejected" if review is False else None,
        where=where,
    )


def parse_tree(record: Mapping[str, Any], where: Where) -> Node:
    """The nested tree of a ``*.trees.jsonl`` line; a bad message anywhere makes the line invalid."""

    def walk(msg: Any, path: str, parent: Node | None) -> Node:
        node = parse_message(msg, where, path + ".")
        if (parent is None and node.role != "user") or (parent is not None and parent.role == node.role):
            raise DataError(
                "roles must alternate prompter, assistant from the initial prompt down",
                field=path + ".role",
                reason="bad_order",
            )
        replies = msg.get("replies") or []
        if not isinstance(replies, list):
            raise DataError(
                f"expected a list, got {type_name(replies)}", field=path + ".replies", reason="wrong_type"
            )
        node.replies = [walk(reply, f"{path}.replies[{i}]", node) for i, reply in enumerate(replies)]
        return node

    return walk(record["prompt"], "prompt", None)


class OasstReader:
    """Reads flat messages (grouped at :meth:`finish`) and nested trees (row by row)."""

    def __init__(self, kind: str, options: FormatOptions, drops: Drops) -> None:
        self.kind, self.options, self.drops = kind, options, drops
        self.messages: dict[str, Node] = {}

    def feed(self, record: Mapping[str, Any], where: Where) -> list[Row]:
        try:
            if isinstance(record.get("prompt"), Mapping) and record.get("message_tree_id") is not None:
                return list(self.tree_rows(parse_tree(record, where)))
            if record.get("message_id") is None and record.get("role") is None:
                raise unknown_format(record, "an oasst message ('message_id', 'role', 'text') or a tree")
            node = parse_message(record, where)
        except DataError as exc:
            raise exc.at(where) from None
        if node.id in self.messages:
            first = self.messages[node.id].where
            raise DataError(
                f"message_id {node.id!r} repeats the message of {_place(first)}",
                field="message_id",
                reason="duplicate_message",
            ).at(where)
        self.messages[node.id] = node
        return []

    def finish(self) -> Iterator[Row]:
        """Link the flat messages into trees, then read each tree."""
        roots = []
        for node in self.messages.values():
            if node.parent in self.messages:
                self.messages[node.parent].replies.append(node)
        for node in self.messages.values():
            parent = self.messages.get(node.parent) if node.parent is not None else None
            error = None
            if node.parent is not None and parent is None:
                error = DataError(
                    f"parent_id {node.parent!r} is not the message_id of any message in the file",
                    field="parent_id",
                    reason="missing_parent",
                )
            elif (parent is None and node.role != "user") or (
                parent is not None and parent.role == node.role
            ):
                error = DataError(
                    "roles must alternate prompter, assistant from the initial prompt (parent_id null) down",
                    field="role",
                    reason="bad_order",
                )
            if error is not None:
                self.drops.invalid(error.at(node.where))
                node.drop_reason = "invalid"  # counted; its replies go with it
                if parent is None:  # not reached from any root: count what hangs below it here
                    self.drops.skip("reply_to_dropped", node.size() - 1)
            elif parent is None:
                roots.append(node)
        for root in roots:
            yield from self.tree_rows(root)
        self.messages = {}

    def _prune(self, node: Node) -> Node | None:
        """The tree without dropped messages (and what hangs below them), counting each."""
        lang = self.options.lang
        reason = node.drop_reason or (
            "empty_text"
            if not node.text.strip()
            else "lang"
            if lang is not None and node.lang not in lang
            else None
        )
        if reason is not None:
            if reason != "invalid":  # already counted
                self.drops.skip(reason)
            self.drops.skip("reply_to_dropped", node.size() - 1)
            return None
        node.replies = [kept for kept in map(self._prune, node.replies) if kept is not None]
        return node

    def tree_rows(self, root: Node) -> Iterator[Row]:
        tree = self._prune(root)
        if tree is None:
            return
        if self.kind == "prompts":
            yield {"prompt": [_message(tree)]}
        elif self.kind == "sft":
            path = best_path(tree)
            if len(path) < 2:
                self.drops.skip("no_reply")
                return
            yield from turn_rows(path, [True] * len(path), "text")
        else:
            yield from self._pairs(tree, [])

    def _pairs(self, node: Node, before: list[Message]) -> Iterator[Row]:
        history = [*before, _message(node)]
        if node.role == "user":
            ranked = [(-float(r.rank), r) for r in node.replies if r.rank is not None]
            pairs, ties = pick_pairs(ranked, self.options.pairs)
            self.drops.skip("tie", ties)
            for better, worse in pairs:
                yield {"prompt": history, "chosen": [_message(better)], "rejected": [_message(worse)]}
        for reply in node.replies:
            yield from self._pairs(reply, history)


def best_path(root: Node) -> list[Message]:
    """Messages from the root down the best-ranked replies, ending with an assistant message."""
    path, node = [root], root
    while node.replies:
        node = min(node.replies, key=lambda r: (r.rank is None, r.rank or 0))  # min keeps file order on ties
        path.append(node)
    while path and path[-1].role != "assistant":
        path.pop()
    return [_message(n) for n in path]


def _message(node: Node) -> Message:
    return {"role": node.role, "content": node.text}


def _place(where: Where) -> str:
    return f"line {where.row}" if where.unit == "line" else f"row {where.row}"
