"""Runs the real vLLM engine on the tiny LLaVA for tests/test_vllm_vlm.py, inside vLLM's own environment.

    .venv-vllm/bin/python tests/vllm_vlm_driver.py MODEL_DIR PROMPTS_PARQUET OUT_DIR

One engine start serves the sampling checks (N samples per image prompt at T=1, a rerun, greedy), with
the engine's own outputs (expanded prompt token ids, sampled ids, cumulative log-probs) for the test to
compare with transformers; then the ``generate`` stage runs twice on vLLM (straight, and resumed after
its second chunk is deleted) with the same settings, and ``evaluate``'s answers are sampled on vLLM.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

N = 4
MAX_NEW_TOKENS = 12


def raw(backend, requests, n) -> list[dict]:
    """Per prompt: the token ids vLLM ran (image placeholders expanded) and each sample's own output."""
    prompts, params = backend.build_inputs(requests, n)
    outputs = backend.llm.generate(prompts, params, use_tqdm=False)
    return [
        dict(
            prompt_token_ids=list(out.prompt_token_ids),
            samples=[
                dict(index=c.index, token_ids=list(c.token_ids), cumulative_logprob=c.cumulative_logprob)
                for c in sorted(out.outputs, key=lambda c: c.index)
            ],  # fmt: skip
        )
        for out in outputs
    ]


def main() -> None:
    model_dir, prompts_path, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    from alignpipe.artifacts.io import read_parquet
    from alignpipe.artifacts.schema import PROMPTS, with_images
    from alignpipe.generate import run_generate
    from alignpipe.generation.vllm import engine_device
    from alignpipe.params import GenerateParams
    from alignpipe.vision.backend import build_vision_requests, open_vision_backend
    from alignpipe.vision.models import load_processor

    rows = read_parquet(prompts_path, with_images(PROMPTS))
    ids = [r["prompt_id"] for r in rows]
    params = GenerateParams(backend="vllm", n=N, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, chunk_prompts=2,
                            dtype="float32", seed=0)  # fmt: skip
    processor = load_processor(model_dir)
    requests = build_vision_requests(
        processor, [r["prompt"] for r in rows], [r["images"] for r in rows], ids, 0
    )
    backend = open_vision_backend(model_dir, params, processor, requests)

    def samples(n=N, **overrides):
        backend.settings = params.model_copy(update=overrides)
        return [asdict(s) for s in backend.generate(requests, n)]

    result: dict = dict(device=engine_device(), n=N, max_new_tokens=MAX_NEW_TOKENS, prompt_ids=ids,
                        backend=type(backend).__name__, request_token_ids=[r.token_ids for r in requests],
                        seeds=[r.seed for r in requests])  # fmt: skip
    result["samples"] = samples()
    result["rerun"] = samples()
    result["raw"] = raw(backend, requests, N)
    result["greedy"] = samples(1, temperature=0.0)
    result["greedy_raw"] = raw(backend, requests, 1)
    backend.settings = params
    backend.close()

    full, resumed = out_dir / "full", out_dir / "resumed"
    result["stage_full"] = run_generate(model_dir, prompts_path, full, params, progress=False)
    shutil.copytree(full, resumed)
    (resumed / "manifest.json").unlink()
    (resumed / "chunk-00001.parquet").unlink()
    result["stage_resumed"] = run_generate(model_dir, prompts_path, resumed, params, progress=False)
    # evaluate's sampling on the same settings and keys (its own engine start): the same answers
    from alignpipe.evaluate.results import EvalPrompt
    from alignpipe.evaluate.vision import VisionEvaluation
    from alignpipe.params import EvaluateParams

    ev = EvaluateParams(backend="vllm", n=N, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, top_p=params.top_p,
                        top_k=params.top_k, dtype="float32", seed=0)  # fmt: skip
    evaluation = VisionEvaluation(prompts_path)
    result["eval_backend"] = evaluation.backend(ev.backend)
    prompts = [EvalPrompt(r["prompt_id"], r["prompt"], None, None) for r in rows]
    result["eval_answers"] = [asdict(a) for a in evaluation.generate_answers(model_dir, prompts, ev, "sft")]
    (out_dir / "out.json").write_text(json.dumps(result))


if __name__ == "__main__":  # the engine spawns processes: the guard is required
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main()
