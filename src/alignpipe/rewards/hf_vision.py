"""``reward.kind: hf`` with a vision-language reward model (a config with ``vision_config``), e.g.
``Gemma3ForSequenceClassification`` with one output.

The model is loaded with ``AutoProcessor`` and ``AutoModelForSequenceClassification``. Each (prompt, its
images, completion) is rendered with the processor's chat template (one ``{"type": "image"}`` part per
image before the first user message's text, as :func:`alignpipe.vision.models.image_parts`), tokenized
by the processor with its images (each image expanded to its tokens) and scored in batches sorted by
length, with the processor's pixel inputs; the score is the head's output at the last token, as the
text reward's. Truncation to ``reward.max_length`` is the text reward's (:mod:`alignpipe.rewards.hf`):
the images' tokens count, and only text is ever cut. A prompt without images is scored on its text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from alignpipe.core.chat import Message
from alignpipe.core.models import ModelFolderError
from alignpipe.rewards.base import RewardError, RewardResult
from alignpipe.rewards.hf import HFReward, pad_for_pooling
from alignpipe.vision.models import image_parts, is_vision_config, load_processor

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def hf_reward(source: str, *, trust_remote_code: bool = False, **kwargs: Any) -> HFReward:
    """The ``hf`` reward of ``source``: :class:`VisionHFReward` when its config is a VLM's, else
    :class:`HFReward` (which reports a config that cannot be read)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        config = None
    cls = VisionHFReward if config is not None and is_vision_config(config) else HFReward
    return cls(source, trust_remote_code=trust_remote_code, **kwargs)


class VisionHFReward(HFReward):
    """A VLM reward model loaded once with its processor; :meth:`score` takes the prompts' images."""

    _n_images, _image_tokens = 0, 0  # of the row being fitted (see _n_tokens)

    def _load_tokenizer(self, source: str, trust_remote_code: bool) -> Any:
        """The processor (kept as ``self.processor``) and its tokenizer; the model is the text reward's."""
        try:
            self.processor = load_processor(source, trust_remote_code=trust_remote_code)
        except ModelFolderError as exc:
            raise RewardError(f"reward.model {source!r} is a vision-language model: {exc}") from None
        if not getattr(self.processor, "chat_template", None):
            raise RewardError(
                f"reward.model {source!r}: its processor has no chat template; alignpipe renders each "
                "conversation with the reward model's own template"
            )
        return self.processor.tokenizer

    def _text(self, conversation: list[Message]) -> str:
        return self.processor.apply_chat_template(image_parts(conversation, self._n_images), tokenize=False)

    def _n_tokens(self, conversation: list[Message]) -> int:
        # the text's tokens plus what the processor adds for the row's images (measured once per row)
        return len(self.tokenizer(self._text(conversation), add_special_tokens=False)["input_ids"]) + (
            self._image_tokens
        )

    def _inputs(self, conversation: list[Message], images: list[Any]) -> dict[str, torch.Tensor]:
        return self.processor(text=[self._text(conversation)], images=[images] if images else None,
                              add_special_tokens=False, return_tensors="pt")  # fmt: skip

    def encode_row(
        self, prompt: list[Message], completion: str, images: list[Any]
    ) -> tuple[dict, str | None]:
        """The processor's inputs of one conversation with its images, cut as the text reward's, and what
        was cut (None, ``"prompt"``, ``"completion"`` or ``"both"``)."""
        self._n_images, self._image_tokens = len(images), 0
        whole = [*prompt, {"role": "assistant", "content": completion}]
        inputs = self._inputs(whole, images)
        if inputs["input_ids"].shape[1] <= self.max_length:
            return dict(inputs), None
        self._image_tokens = inputs["input_ids"].shape[1] - self._n_tokens(whole)
        conversation, cut = self.fit(prompt, completion)
        return dict(self._inputs(conversation, images)), cut

    def score(
        self,
        prompts: Sequence[list[Message]],
        completions: Sequence[str],
        metas: Sequence[str | None],
        images: Sequence[list[Any]] | None = None,
    ) -> list[RewardResult]:
        if images is None:
            raise RewardError(
                f"reward.model {self.name[3:]!r} is a vision-language reward model but no prompt images "
                "were passed (images=)"
            )
        encoded = []
        for i, (prompt, completion, row_images) in enumerate(zip(prompts, completions, images, strict=True)):
            try:
                encoded.append(self.encode_row(prompt, completion, list(row_images)))
            except RewardError as exc:
                raise RewardError(exc.message, index=i) from None
        lengths = [int(inputs["input_ids"].shape[1]) for inputs, _ in encoded]
        order = sorted(range(len(encoded)), key=lambda i: -lengths[i])  # longest first: OOM shows early
        scores: dict[int, float] = {}
        with tqdm(total=len(order), desc="reward", unit="seq", leave=False) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                scores.update(zip(batch, self.forward_inputs([encoded[i][0] for i in batch]), strict=True))
                bar.update(len(batch))
        return [
            RewardResult(
                scores[i],
                {"tokens": lengths[i], "truncated": cut is not None}
                | ({"truncated_part": cut} if cut else {}),
            )  # fmt: skip
            for i, (_, cut) in enumerate(encoded)
        ]

    @torch.inference_mode()
    def forward_inputs(self, rows: list[dict[str, torch.Tensor]]) -> list[float]:
        """Scores of one batch of per-row processor inputs: ids right-padded (read at each row's last
        token), token types padded with 0 (text), the rows' pixel inputs concatenated in row order."""
        ids = [r["input_ids"][0].tolist() for r in rows]
        input_ids, attention_mask = pad_for_pooling(self.model, ids, self.pad_id)
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        for key in ("token_type_ids", "mm_token_type_ids"):
            if any(key in r for r in rows):
                types = torch.zeros_like(input_ids)
                for j, r in enumerate(rows):
                    if key in r:
                        types[j, : r[key].shape[1]] = r[key][0]
                batch[key] = types
        pixel_keys = sorted({k for r in rows for k in r if k not in TEXT_KEYS})
        for key in pixel_keys:
            batch[key] = torch.cat([r[key] for r in rows if key in r])
        dtype = next(self.model.parameters()).dtype
        batch = {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()
        }
        return self.model(**batch).logits[:, 0].float().cpu().tolist()
