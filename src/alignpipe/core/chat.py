"""Chat rendering and tokenization shared by every stage.

One path turns (prompt messages, assistant completion) into token ids, so SFT,
generation, reference log-probs, DPO and evaluation all see the same tokens:

- the prompt is the chat template rendered with ``add_generation_prompt=True``;
- the completion is what the template adds after that prompt for the assistant
  turn, cut right after its first EOS: exactly one EOS, no trailing newline;
- text is tokenized with ``add_special_tokens=False``, so a template that writes
  its own BOS never gets a second one.

Truncation never cuts through the chat template. A prompt too long for its budget loses the
start of its first user turn's text (when emptying that turn is not enough, it and the turns up
to the next user turn go) and is rendered again, so the template's header and the system prompt
always stay (a prompt whose header and system prompt alone exceed the budget is kept whole). A
row that would keep nothing of its completion is refused (:class:`TruncationError`; the stage
names the row and the key to raise). A completion keeps its start (cut ones have no EOS: they
did not end). What was cut is counted per row (:class:`Truncation`: prompt, completion or both)
and a stage warns in one line when more than :data:`WARN_FRACTION` of its rows were cut.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]
# A stage warns when more than this fraction of its rows were truncated.
WARN_FRACTION = 0.05


class ChatTemplateError(ValueError):
    """The tokenizer cannot render chats (no template, or one that is not prefix-stable)."""


class TruncationError(ValueError):
    """A row cannot be cut to its token budget without breaking the chat template or losing its
    whole completion; the caller adds the row and the key to raise."""


def require_chat_template(tokenizer: Any, override: str | None = None, where: str = "tokenizer") -> None:
    """Install ``override`` as the chat template, or fail clearly if the tokenizer has none."""
    if override:
        tokenizer.chat_template = override
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{where}: the tokenizer has no chat template; set sft.chat_template to a Jinja template "
            "(for example ChatML) or use an instruct model"
        )
    if tokenizer.eos_token_id is None:
        raise ChatTemplateError(f"{where}: the tokenizer has no EOS token")


def render_prompt(tokenizer: Any, prompt: list[Message]) -> str:
    """The prompt as text, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def _completion_text(tokenizer: Any, prompt: list[Message], completion: list[Message]) -> tuple[str, str]:
    prompt_text = render_prompt(tokenizer, prompt)
    full_text = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ChatTemplateError(
            "the chat template renders the prompt differently once an answer follows; "
            "alignpipe needs a prefix-stable template"
        )
    return prompt_text, full_text[len(prompt_text) :]


def encode_ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Encoded:
    """Token ids of one prompt and one completion; the completion ends with exactly one EOS
    unless it was cut (``completion_cut``)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    prompt_cut: bool = False
    completion_cut: bool = False

    @property
    def truncated(self) -> bool:
        return self.prompt_cut or self.completion_cut

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def labels_mask(self) -> list[int]:
        """1 on completion tokens (the ones trained on and scored), 0 on the prompt."""
        return [0] * len(self.prompt_ids) + [1] * len(self.completion_ids)


@dataclass
class Truncation:
    """Rows seen and rows cut, by what was cut: the prompt only, the completion only, or both."""

    rows: int = 0
    prompt: int = 0
    completion: int = 0
    both: int = 0

    def count(self, prompt_cut: bool, completion_cut: bool) -> None:
        self.rows += 1
        if prompt_cut and completion_cut:
            self.both += 1
        elif prompt_cut:
            self.prompt += 1
        elif completion_cut:
            self.completion += 1

    @property
    def cut(self) -> int:
        return self.prompt + self.completion + self.both

    def as_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "prompt": self.prompt, "completion": self.completion, "both": self.both}

    def warn(self, stage: str, what: str, keys: str) -> str | None:
        """Print one ``warning:`` line to stderr when more than WARN_FRACTION of the rows were cut."""
        if not self.rows or self.cut <= WARN_FRACTION * self.rows:
            return None
        line = (
            f"warning: {stage}: {self.cut} of {self.rows} {what} truncated ({100 * self.cut / self.rows:.0f}%: "
            f"prompt {self.prompt}, completion {self.completion}, both {self.both}); raise {keys} to keep them whole"
        )
        print(line, file=sys.stderr, flush=True)
        return line


def _first_role(messages: Sequence[Message], role: str, start: int = 0) -> int | None:
    return next((i for i in range(start, len(messages)) if messages[i].get("role") == role), None)


def shorten_message(
    n_tokens: Callable[[list[Message]], int],
    messages: Sequence[Message],
    index: int,
    limit: int,
    keep: str = "end",
) -> list[Message] | None:
    """``messages`` with ``messages[index]``'s text cut (its start with ``keep="end"``, its end with
    ``keep="start"``) to the longest that renders to at most ``limit`` tokens; None if even an empty
    text does not fit. Binary search over characters: a cut never splits a token's bytes."""
    content = messages[index].get("content")
    if not isinstance(content, str):
        return None

    def kept(k: int) -> list[Message]:
        text = content[len(content) - k :] if keep == "end" else content[:k]
        return [*messages[:index], {**messages[index], "content": text}, *messages[index + 1 :]]

    if n_tokens(kept(0)) > limit:
        return None
    lo, hi = 0, len(content)
    if n_tokens(kept(hi)) <= limit:
        return kept(hi)
    while hi - lo > 1:  # invariant: kept(lo) fits, kept(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if n_tokens(kept(mid)) <= limit else (lo, mid)
    whole = _whole_words(content, lo, keep)  # no word cut in half where a word boundary is near
    return kept(whole) if whole != lo and n_tokens(kept(whole)) <= limit else kept(lo)


def _whole_words(content: str, k: int, keep: str) -> int:
    """Characters to keep (``k`` or fewer) so that the kept text neither starts (keep="end") or ends
    (keep="start") inside a word nor with whitespace; ``k`` when the kept part has no word boundary."""
    if k in (0, len(content)):
        return k
    if keep == "end":
        text = content[len(content) - k :]
        if not content[len(content) - k - 1].isspace():  # the cut is inside a word: drop that word's tail
            space = next((i for i, ch in enumerate(text) if ch.isspace()), None)
            if space is None:
                return k
            text = text[space:]
        return len(text.lstrip()) or k
    text = content[:k]
    if not content[k].isspace():
        space = next((i for i in range(len(text) - 1, -1, -1) if text[i].isspace()), None)
        if space is None:
            return k
        text = text[:space]
    return len(text.rstrip()) or k


def fit_prompt(
    n_tokens: Callable[[list[Message]], int], messages: Sequence[Message], limit: int
) -> list[Message] | None:
    """The conversation cut to render to at most ``limit`` tokens without touching the template:
    the start of the first user turn's text goes; when emptying it is not enough, that turn and the
    turns up to the next user turn are dropped and the next one is cut. System messages stay.
    None when it cannot fit (header and system prompt too long, or no user turn to cut)."""
    msgs = list(messages)
    while (first := _first_role(msgs, "user")) is not None:
        cut = shorten_message(n_tokens, msgs, first, limit, keep="end")
        if cut is not None:
            return cut
        following = _first_role(msgs, "user", first + 1)
        if following is None:
            return None
        msgs = msgs[:first] + msgs[following:]
    return None


def encode_completion(
    tokenizer: Any,
    prompt: list[Message],
    completion: list[Message],
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> Encoded:
    """Tokenize a prompt and its assistant completion for training or scoring.

    Truncation, when ``max_length`` is set: the prompt may take ``max_prompt_length`` tokens
    (without it, as in SFT, when the row is too long: what leaves the completion
    ``min(its length, max_length // 2)``); a longer one is cut inside its first user turn (see
    :func:`fit_prompt`); one whose header and system prompt alone exceed that budget is kept
    whole. Then the completion is cut to fit (keeping its start, with no EOS: it did not end).
    Raises :class:`TruncationError` when nothing of the completion is left.
    """
    prompt_text, completion_text = _completion_text(tokenizer, prompt, completion)
    prompt_ids = encode_ids(tokenizer, prompt_text)
    completion_ids = _completion_ids(tokenizer, completion_text)
    if max_length is None:
        return Encoded(prompt_ids, completion_ids)
    if max_prompt_length is not None:
        budget = min(max_prompt_length, max_length - 1)
    elif len(prompt_ids) + len(completion_ids) > max_length:
        budget = max_length - min(len(completion_ids), max_length // 2)
    else:
        return Encoded(prompt_ids, completion_ids)
    prompt_cut = len(prompt_ids) > budget
    if prompt_cut:

        def n_tokens(messages: list[Message]) -> int:
            return len(encode_ids(tokenizer, render_prompt(tokenizer, messages)))

        cut = fit_prompt(n_tokens, prompt, budget)
        if cut is None:  # its header and system prompt alone exceed the budget: kept whole
            prompt_cut = False
        else:
            prompt_text, completion_text = _completion_text(tokenizer, cut, completion)
            prompt_ids = encode_ids(tokenizer, prompt_text)
            completion_ids = _completion_ids(tokenizer, completion_text)
    room = max_length - len(prompt_ids)
    if room < 1:
        raise TruncationError(
            f"the prompt takes {len(prompt_ids)} of {max_length} tokens and cannot be cut inside its first "
            "user turn without cutting its chat template header or system prompt: nothing of the completion "
            "is left"
        )
    completion_cut = len(completion_ids) > room
    if completion_cut:
        completion_ids = completion_ids[:room]
    return Encoded(prompt_ids, completion_ids, prompt_cut, completion_cut)


def _completion_ids(tokenizer: Any, completion_text: str) -> list[int]:
    """The completion's ids cut right after its first EOS (one is added if the template wrote none)."""
    ids = encode_ids(tokenizer, completion_text)
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]
