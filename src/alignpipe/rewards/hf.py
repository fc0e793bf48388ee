"""``reward.kind: hf``: a sequence-classification reward model with one output (Skywork style).

Each (prompt, completion) is rendered as a conversation with the reward model's own chat
template (not the policy's), tokenized without extra special tokens, and scored in batches
sorted by length. The score is the head's output at the conversation's last token, the
same whether a conversation is scored alone or padded in a batch.

Truncation never cuts through the reward model's template: a conversation longer than
``reward.max_length`` tokens loses the start of its first user turn's text (earlier whole
turns first, see :func:`alignpipe.chat.fit_prompt`); when emptying the prompt's user text is
not enough, the completion loses its end, the template's end of turn (what the head reads)
staying; a conversation whose template and system prompt alone exceed the limit is refused.
What was cut (prompt, completion or both) is in each result's details and counted by the stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from alignpipe.core.chat import Message, encode_ids, fit_prompt, shorten_message
from alignpipe.core.models import check_model_folder, load_tokenizer, pick_device, resolve_dtype
from alignpipe.rewards.base import RewardError, RewardResult


class HFReward:
    """A reward model loaded once; :meth:`score` runs it over any number of conversations."""

    def __init__(
        self,
        source: str,
        *,
        max_length: int = 1024,
        batch_size: int = 16,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        device: torch.device | None = None,
    ) -> None:
        self.name = f"hf:{source}"
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device or pick_device()
        self.tokenizer = self._load_tokenizer(source, trust_remote_code)
        self.model = load_reward_model(source, resolve_dtype(dtype, self.device), trust_remote_code)
        self.model.to(self.device).eval()
        text_config = self.model.config.get_text_config()
        if text_config.pad_token_id is None:
            text_config.pad_token_id = self.tokenizer.pad_token_id
        self.pad_id = int(text_config.pad_token_id)

    def _load_tokenizer(self, source: str, trust_remote_code: bool) -> Any:
        """The tokenizer that renders and encodes conversations (a VLM reward loads its processor here)."""
        return _load_tokenizer(source, trust_remote_code)

    def encode(self, prompt: list[Message], completion: str) -> tuple[list[int], str | None]:
        """Token ids of the conversation, cut to ``max_length`` inside its text (never its template),
        and what was cut: None, ``"prompt"``, ``"completion"`` or ``"both"``."""
        conversation, cut = self.fit(prompt, completion)
        return self._ids(conversation), cut

    def fit(self, prompt: list[Message], completion: str) -> tuple[list[Message], str | None]:
        """The conversation cut to ``max_length`` tokens (:meth:`_n_tokens`) and what was cut."""
        conversation = [*prompt, {"role": "assistant", "content": completion}]
        if self._n_tokens(conversation) <= self.max_length:
            return conversation, None
        cut = fit_prompt(self._n_tokens, conversation, self.max_length)
        if cut is not None:
            return cut, "prompt"
        # even an empty user turn leaves no room: keep the system messages, cut the completion's end
        minimal = [m for m in prompt if m.get("role") == "system"]
        minimal += [{"role": "user", "content": ""}] if any(m.get("role") == "user" for m in prompt) else []
        minimal.append(conversation[-1])
        short = shorten_message(self._n_tokens, minimal, len(minimal) - 1, self.max_length, keep="start")
        if short is None:
            header = self._n_tokens([*minimal[:-1], {"role": "assistant", "content": ""}])
            raise RewardError(
                f"the reward model's chat template and the system prompt take {header} tokens: nothing of the "
                f"completion is left within reward.max_length={self.max_length}; raise reward.max_length"
            )
        return short, "both"

    def _ids(self, conversation: list[Message]) -> list[int]:
        return encode_ids(self.tokenizer, self.tokenizer.apply_chat_template(conversation, tokenize=False))

    def _n_tokens(self, conversation: list[Message]) -> int:
        return len(self._ids(conversation))

    def score(
        self,
        prompts: Sequence[list[Message]],
        completions: Sequence[str],
        metas: Sequence[str | None],
        images: Sequence[list[Any]] | None = None,
    ) -> list[RewardResult]:
        if images is not None and any(images):
            raise RewardError(
                f"reward.model {self.name[3:]!r} is a text reward model and the prompts have images it would "
                "not see; give a vision-language reward model (a config with vision_config) or a python reward"
            )
        encoded = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            try:
                encoded.append(self.encode(prompt, completion))
            except RewardError as exc:
                raise RewardError(exc.message, index=i) from None
        order = sorted(
            range(len(encoded)), key=lambda i: -len(encoded[i][0])
        )  # longest first: OOM shows early
        scores: dict[int, float] = {}
        with tqdm(total=len(order), desc="reward", unit="seq", leave=False) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                values = self.forward([encoded[i][0] for i in batch])
                scores.update(zip(batch, values, strict=True))
                bar.update(len(batch))
        return [
            RewardResult(
                scores[i],
                {"tokens": len(ids), "truncated": cut is not None} | ({"truncated_part": cut} if cut else {}),
            )  # fmt: skip
            for i, (ids, cut) in enumerate(encoded)
        ]

    @torch.inference_mode()
    def forward(self, rows: list[list[int]]) -> list[float]:
        """Scores of right-padded rows, read at each row's last real token."""
        # The head pools at the rightmost token that is not the config's pad id. A row may end
        # with the pad id itself (pad == EOS); then pad this batch with an id no row ends with.
        input_ids, attention_mask = pad_for_pooling(self.model, rows, self.pad_id)
        logits = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        ).logits
        return logits[:, 0].float().cpu().tolist()

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def pad_for_pooling(
    model: Any, rows: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` of ``rows``, with the model's pad id set to the
    batch's pooling pad (the head reads each row's last token that is not the pad id)."""
    pad = pooling_pad_id(rows, pad_id)
    model.config.get_text_config().pad_token_id = pad
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, row in enumerate(rows):
        input_ids[j, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        attention_mask[j, : len(row)] = 1
    return input_ids, attention_mask


def pooling_pad_id(rows: Sequence[Sequence[int]], pad_id: int) -> int:
    """``pad_id`` unless some row ends with it; then the smallest id that ends no row."""
    last = {row[-1] for row in rows}
    if pad_id not in last:
        return pad_id
    return min(set(range(len(last) + 1)) - last)


def _load_tokenizer(source: str, trust_remote_code: bool) -> Any:
    try:
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RewardError(f"reward.model {source!r}: cannot load its tokenizer ({_short(exc)})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise RewardError(
            f"reward.model {source!r}: its tokenizer has no chat template; alignpipe renders each "
            "conversation with the reward model's own template"
        )
    return tokenizer


def load_reward_model(source: str, dtype: torch.dtype, trust_remote_code: bool = False) -> Any:
    """Load a one-output sequence-classification model (safetensors only), or fail clearly."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if Path(source).exists():
        check_model_folder(source, what="reward model")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RewardError(f"reward.model {source!r}: cannot load its config ({_short(exc)})") from None
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not trust_remote_code and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise RewardError(
            f"reward.model {source!r} is a {', '.join(archs)}, not a sequence-classification reward model"
        )
    if config.num_labels != 1:
        raise RewardError(
            f"reward.model {source!r} has num_labels={config.num_labels}; alignpipe needs a reward model "
            "with a single score (num_labels == 1)"
        )
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a truncated or corrupt file
        raise RewardError(f"reward.model {source!r}: cannot load the model ({_short(exc)})") from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise RewardError(
            f"reward.model {source!r}: weights missing from the checkpoint ({', '.join(sorted(missing)[:5])}); "
            "its score head would be random"
        )
    return model


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
