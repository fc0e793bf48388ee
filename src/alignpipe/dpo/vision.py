"""The dpo stage on a vision-language model (the SFT folder has a vision config): what differs from text.

:func:`alignpipe.dpo.stage.build_run` dispatches once on the model folder. The pairs are read with their
images (:func:`alignpipe.vision.logprobs.read_vision_pairs`) and joined with ``ref_logps`` as for text;
the policy loads through ``AutoModelForImageTextToText`` and trains what ``dpo.vlm_trainable`` names
(:func:`alignpipe.vision.models.set_trainable`; by default the vision tower and projector frozen; with
``dpo.peft`` LoRA on the language model only, :func:`~alignpipe.vision.models.apply_vision_lora`), a
live reference (``dpo.reference: live``, TR-DPO) is a frozen VLM scorer, and the policy scores through
:class:`~alignpipe.vision.logprobs.VisionCompletionScorer`: each pair's images go through the tower once
and both answers share the features. The loop, the losses, checkpoints and resume are the text path's.
An unpaired loss (KTO) reads ``data/unpaired`` with its images (:mod:`alignpipe.vision.unpaired`) and
runs the KTO step of :mod:`alignpipe.dpo.kto` unchanged (each example and its KL mismatch a shared-prompt
pair with the example's images). Not built yet (refused in one line): QLoRA, ``torch.compile``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from alignpipe.artifacts.ref_logps import PairScores
from alignpipe.artifacts.unpaired import UnpairedScores
from alignpipe.dpo.data import DpoPairs, join_ref_logps
from alignpipe.dpo.kto import KtoData
from alignpipe.params import DpoParams
from alignpipe.training.numerics import Numerics
from alignpipe.vision.logprobs import VisionCompletionScorer, read_vision_pairs, vision_reference_scorer
from alignpipe.vision.models import apply_vision_lora, load_image_text_model, set_trainable
from alignpipe.vision.unpaired import read_vision_unpaired


def check_vision_dpo(params: DpoParams, model_dir: Path) -> None:
    """Refuse, in one line, what the VLM path does not run yet."""
    unsupported = {
        "dpo.peft.load_in_4bit": params.peft.load_in_4bit,
        "dpo.compile": params.compile,
    }
    named = [name for name, on in unsupported.items() if on]
    if named:
        raise ValueError(
            f"dpo on a vision-language model ({model_dir}): {', '.join(named)} not supported yet"
        )


def load_vision_split(
    pairs_dir: Path, split: str, ref_logps: Path, processor: Any, max_length: int, max_prompt_length: int
) -> DpoPairs:
    """A split's pairs with their images, joined with their reference log-probs (the prompt is never
    cut on a VLM: ``max_prompt_length`` is not applied)."""
    pairs = read_vision_pairs(pairs_dir / f"{split}.parquet", processor, max_length)
    return join_ref_logps(list(pairs), PairScores.read(ref_logps), where=str(ref_logps))


def load_vision_unpaired_split(
    folder: Path, split: str, ref_logps: Path, processor: Any, max_length: int, max_prompt_length: int
) -> KtoData:
    """:func:`alignpipe.dpo.kto.load_unpaired_split` on examples with images (the prompt is never cut)."""
    data = read_vision_unpaired(folder / f"{split}.parquet", processor, max_length)
    ref = UnpairedScores.read(ref_logps).aligned(data, where=str(ref_logps))
    return KtoData(
        data.pairs, ref.logps.float(), ref.kl_logps.float(), torch.tensor(data.labels, dtype=torch.bool)
    )


def load_vision_policy(model_dir: Path, numerics: Numerics, device: Any, params: DpoParams) -> Any:
    """The VLM policy in the policy's weights dtype, training what ``dpo.vlm_trainable`` names."""
    model = load_image_text_model(model_dir, numerics.weights, device)
    set_trainable(model, params.vlm_trainable)
    return model


def vision_peft(model: Any, params: DpoParams) -> Any:
    """With ``dpo.peft.enabled``: LoRA on the language model (the projector, and the tower with ``all``,
    trained in full); else the model as it is."""
    return apply_vision_lora(model, params.peft, params.vlm_trainable) if params.peft.enabled else model


def load_vision_reference(model_dir: Path, numerics: Numerics, device: Any) -> VisionCompletionScorer:
    """The live reference: the SFT VLM frozen, in the policy's numerics (``ref_logps``' scorer)."""
    return vision_reference_scorer(model_dir, numerics, device)
