"""Chat rendering and tokenization shared by every stage.

One path turns (prompt messages, assistant completion) into token ids, so SFT,
generation, reference log-probs, DPO and evaluation all see the same tokens:

- the prompt is the chat template rendered with ``add_generation_prompt=True``;
- the completion is what the template adds after that prompt for the assistant
  turn, cut right after its first EOS: exactly one EOS, no trailing newline;
- text is tokenized with ``add_special_tokens=False``, so a template that writes
  its own BOS never gets a second one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Message = dict[str, str]


class ChatTemplateError(ValueError):
    """The tokenizer cannot render chats (no template, or one that is not prefix-stable)."""


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
    """Token ids of one prompt and one completion; the completion ends with exactly one EOS."""

    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool = False

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def labels_mask(self) -> list[int]:
        """1 on completion tokens (the ones trained on and scored), 0 on the prompt."""
        return [0] * len(self.prompt_ids) + [1] * len(self.completion_ids)


def encode_completion(
    tokenizer: Any,
    prompt: list[Message],
    completion: list[Message],
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> Encoded:
    """Tokenize a prompt and its assistant completion for training or scoring.

    Truncation, when ``max_length`` is set: the prompt keeps its last
    ``max_prompt_length`` tokens (the end is closest to the answer), then the
    completion is cut to fit; a cut completion keeps no EOS (it did not end).
    """
    prompt_text, completion_text = _completion_text(tokenizer, prompt, completion)
    prompt_ids = encode_ids(tokenizer, prompt_text)
    completion_ids = encode_ids(tokenizer, completion_text)
    eos = tokenizer.eos_token_id
    if eos in completion_ids:
        completion_ids = completion_ids[: completion_ids.index(eos) + 1]
    else:
        completion_ids = completion_ids + [eos]
    if max_length is None:
        return Encoded(prompt_ids, completion_ids)
    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids, truncated = prompt_ids[-max_prompt_length:], True
    room = max_length - len(prompt_ids)
    if room < 1:
        prompt_ids, room, truncated = prompt_ids[-(max_length - 1) :], 1, True
    if len(completion_ids) > room:
        completion_ids, truncated = completion_ids[:room], True
    return Encoded(prompt_ids, completion_ids, truncated)
