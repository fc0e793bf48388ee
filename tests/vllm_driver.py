"""Runs the real vLLM engine for tests/test_vllm_engine.py, inside vLLM's own environment.

    .venv-vllm/bin/python tests/vllm_driver.py MODEL_DIR SECOND_MODEL_DIR OUT_JSON

vLLM pins a transformers the main venv does not share, so the test session runs this script
under ``.venv-vllm/bin/python`` and checks what it writes. One engine start serves every
sampling check (54 s per start on the embedded default); then the engine is closed and a
second model is loaded in the same process, as ``evaluate`` does with SFT then DPO.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict

PROMPTS = [
    "Describe the ocean in one short sentence.",
    "What is 7 + 5?",
    "List three colors.",
    "Write a haiku about tea.",
]
N = 8
MAX_NEW_TOKENS = 48


def children() -> list[dict]:
    """This process's live descendants (zombies excluded) with their command lines."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(dict(pid=p.pid, name=p.name(), cmdline=" ".join(p.cmdline())[:200]))
        except psutil.NoSuchProcess:
            pass
    return out


def common_substring(texts: list[str], width: int = 2) -> str:
    """The ASCII-letter substring of ``width`` characters found in the most texts (ties: smallest)."""
    counts: dict[str, int] = {}
    for text in texts:
        for sub in {text[i : i + width] for i in range(len(text) - width + 1)}:
            if sub.isascii() and sub.isalpha():
                counts[sub] = counts.get(sub, 0) + 1
    return min(counts, key=lambda s: (-counts[s], s))


def raw(llm, requests, settings, n, sampling_params_cls) -> list[list[dict]]:
    """Per prompt, per sample: the engine's own output (token ids, cumulative logprob, text)."""
    from alignpipe.generation.vllm import build_inputs

    prompts, params = build_inputs(requests, settings, n, sampling_params_cls)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [
        [
            dict(
                index=c.index,
                token_ids=list(c.token_ids),
                cumulative_logprob=c.cumulative_logprob,
                text=c.text,
                finish_reason=str(c.finish_reason),
            )
            for c in sorted(out.outputs, key=lambda c: c.index)
        ]
        for out in outputs
    ]


def main() -> None:
    model_dir, second_dir, out_path = sys.argv[1:4]
    from alignpipe.generation.base import build_requests
    from alignpipe.generation.load import load_chat_tokenizer
    from alignpipe.generation.vllm import VllmBackend, engine_device
    from alignpipe.params import SamplingParams

    settings = SamplingParams(backend="vllm", temperature=0.8, max_new_tokens=MAX_NEW_TOKENS, seed=0)
    tokenizer = load_chat_tokenizer(model_dir)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    keys = [f"p{i}" for i in range(len(PROMPTS))]
    requests = build_requests(tokenizer, chats, keys, seed=0)
    result: dict = dict(
        device=engine_device(),
        prompt_ids=[r.token_ids for r in requests],
        eos_token_id=tokenizer.eos_token_id,
        n=N,
        max_new_tokens=MAX_NEW_TOKENS,
    )

    start = time.perf_counter()
    backend = VllmBackend(model_dir, settings)
    result["engine_start_s"] = round(time.perf_counter() - start, 1)
    result["children_while_open"] = children()
    cls = backend.sampling_params_cls

    def samples(reqs, n=N, **overrides):
        backend.settings = settings.model_copy(update=overrides)
        return [asdict(s) for s in backend.generate(reqs, n)]

    result["samples"] = samples(requests)
    result["rerun"] = samples(requests)
    result["alone"] = {"p2": samples([requests[2]])}
    result["reversed"] = samples(requests[::-1])  # p3, p2, p1, p0
    result["pairs"] = samples([requests[3], requests[0]])
    result["raw"] = raw(backend.llm, requests, settings, N, cls)
    # A stop string taken from a sample's text: the same seed samples the same prefix, cut before it.
    result["stop"] = common_substring([s["completion"] for s in result["samples"]])
    result["stopped"] = samples(requests, stop=[result["stop"]])

    backend.close()
    time.sleep(1.0)
    result["children_after_close"] = children()
    start = time.perf_counter()
    second = VllmBackend(second_dir, settings)
    result["second_engine_start_s"] = round(time.perf_counter() - start, 1)
    second_requests = build_requests(load_chat_tokenizer(second_dir), chats, keys, seed=0)
    result["second"] = [asdict(s) for s in second.generate(second_requests, 2)]
    second.close()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # the engine spawns processes: the guard is required
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main()
