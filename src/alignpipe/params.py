"""Typed parameters: one pydantic model per ``params.yaml`` section.

Stages and the Prefect flow load their section through these models, so a typo
or a bad value fails early with the key, the reason and the closest valid key:

    params.yaml: dpo.betta: unknown key (did you mean 'beta'?)
"""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Launcher = str  # the command a stage runs under, e.g. "python" or "accelerate launch --config_file ..."


class ParamsError(ValueError):
    """params.yaml does not match the models; the message names each bad key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelParams(Section):
    source: str = "bundled:smollm2-135m-instruct"
    revision: str | None = None
    trust_remote_code: bool = False


class BuiltinSizes(Section):
    n_sft: PositiveInt = 400
    n_prompts: PositiveInt = 256
    n_eval: PositiveInt = 128


class SourceParams(Section):
    source: str | None = "builtin:verifiable-instructions"
    max_rows: PositiveInt | None = None


class DataParams(Section):
    seed: int = 0
    on_invalid: Literal["error", "drop"] = "error"
    builtin: BuiltinSizes = BuiltinSizes()
    sft: SourceParams = SourceParams()
    prompts: SourceParams = SourceParams()
    eval_prompts: SourceParams = SourceParams()
    preferences: SourceParams = SourceParams(source=None)

    @model_validator(mode="after")
    def _required_sources(self) -> DataParams:
        for name in ("sft", "prompts", "eval_prompts"):
            if getattr(self, name).source is None:
                raise ValueError(f"data.{name}.source must be set (only data.preferences.source may be null)")
        return self


class PeftParams(Section):
    enabled: bool = False
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Probability = 0.05
    target_modules: str | list[str] = "all-linear"
    load_in_4bit: bool = False  # QLoRA: LoRA on an NF4 4-bit base (bitsandbytes; CPU or GPU)


class TrainParams(Section):
    """Settings shared by the two training stages (sft, dpo)."""

    launcher: Launcher = "python"
    epochs: PositiveInt = 1
    max_steps: int = -1
    learning_rate: Annotated[float, Field(gt=0)] = 1e-4
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Probability = 0.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    max_length: PositiveInt = 256
    gradient_checkpointing: bool = False
    dtype: Dtype = "auto"
    seed: int = 0
    logging_steps: PositiveInt = 5
    save_steps: PositiveInt = 50
    peft: PeftParams = PeftParams()


class SftParams(TrainParams):
    enabled: bool = True
    truncation: Literal["truncate", "drop"] = "truncate"
    packing: bool = False
    chat_template: str | None = None


class SamplingParams(Section):
    """Sampling settings shared by ``generate`` and ``evaluate``."""

    backend: Literal["auto", "vllm", "hf"] = "auto"
    temperature: Annotated[float, Field(ge=0)] = 0.8
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: NonNegInt = 0  # 0 = off
    max_new_tokens: PositiveInt = 64
    stop: list[str] = []
    seed: int = 0
    batch_size: PositiveInt = 16  # prompts per HF batch
    dtype: Dtype = "auto"
    tensor_parallel_size: PositiveInt = 1
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.85


class GenerateParams(SamplingParams):
    n: PositiveInt = 4
    num_shards: PositiveInt = 1
    chunk_prompts: PositiveInt = 32


class RewardParams(Section):
    kind: Literal["builtin", "hf", "python"] = "builtin"
    model: str | None = None
    function: str | None = None
    max_length: PositiveInt = 1024
    batch_size: PositiveInt = 16
    dtype: Dtype = "auto"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _kind_needs(self) -> RewardParams:
        if self.kind == "hf" and not self.model:
            raise ValueError("reward.kind 'hf' needs reward.model (a hub id or a local folder)")
        if self.kind == "python" and (not self.function or ":" not in self.function):
            raise ValueError("reward.kind 'python' needs reward.function as 'module:function'")
        return self


class PairsParams(Section):
    strategy: Literal["best_vs_worst", "best_vs_random", "all_pairs"] = "best_vs_worst"
    max_pairs_per_prompt: PositiveInt = 4
    min_margin: Annotated[float, Field(ge=0)] = 0.0
    drop_ties: bool = True
    max_similarity: Probability = 0.95
    allow_truncated: bool = False
    min_chosen_reward: float | None = None
    max_length_ratio: Annotated[float, Field(ge=1)] | None = None
    eval_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    seed: int = 0


class RefLogpsParams(Section):
    batch_size: PositiveInt = 8
    dtype: Dtype = "auto"


class DpoParams(TrainParams):
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    beta: Annotated[float, Field(gt=0)] = 0.1
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    rpo_alpha: Annotated[float, Field(ge=0)] | None = None
    wpo: bool = False
    loss_options: dict[str, float] = {}
    reference: Literal["precomputed", "live"] = "precomputed"
    ref_sync_steps: PositiveInt | None = None  # TR-DPO: sync the live reference every k steps
    ref_sync_alpha: Probability = 0.6
    max_prompt_length: PositiveInt = 128
    padding_free: bool = True
    gradient_checkpointing: bool = True  # as TRL: half the peak memory for ~10% more time (bench/NOTES.md)
    compile: bool = False
    eval_steps: PositiveInt = 20

    @model_validator(mode="after")
    def _consistent(self) -> DpoParams:
        types = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError("dpo.loss_weights needs one weight per entry of dpo.loss_type")
        if self.ref_sync_steps is not None and self.reference != "live":
            raise ValueError("dpo.ref_sync_steps (TR-DPO) needs dpo.reference: live")
        if self.peft.load_in_4bit and not self.peft.enabled:
            raise ValueError("dpo.peft.load_in_4bit (QLoRA) needs dpo.peft.enabled: true")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("dpo.max_prompt_length must be smaller than dpo.max_length")
        return self


class EvaluateParams(SamplingParams):
    n: PositiveInt = 1  # samples per prompt and model
    max_prompts: PositiveInt | None = None
    include_base: bool = False
    n_examples: NonNegInt = 5


class Params(Section):
    """The whole ``params.yaml``."""

    base_model: BaseModelParams = BaseModelParams()
    data: DataParams = DataParams()
    sft: SftParams = SftParams()
    generate: GenerateParams = GenerateParams()
    reward: RewardParams = RewardParams()
    pairs: PairsParams = PairsParams()
    ref_logps: RefLogpsParams = RefLogpsParams()
    dpo: DpoParams = DpoParams()
    evaluate: EvaluateParams = EvaluateParams()


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model reached by following ``loc`` from ``model`` (None if not a model)."""
    for key in loc:
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


def read_yaml(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found (run from the repository root)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Load and validate the whole params file."""
    return validate(Params, read_yaml(path), where=str(path))


def load_section(section: str, path: str | os.PathLike = "params.yaml") -> Section:
    """Load one section (e.g. ``"dpo"``) through its model; other sections are not validated."""
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
    return validate(model, data.get(section), where=str(path), prefix=section)
