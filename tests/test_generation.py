"""Generation backends: selection, seeds, the hf sampling loop, vLLM request building and parsing."""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import alignpipe.generation.base as gen
import alignpipe.generation.load as load
from alignpipe.core.chat import encode_ids
from alignpipe.generation import vllm as gvllm
from alignpipe.generation.base import (
    GenerationError,
    PromptRequest,
    build_requests,
    derive_seed,
    resolve_backend,
)
from alignpipe.generation.hf import (
    HFBackend,
    filter_logits,
    finish_row,
    first_stop,
    pick_tokens,
    token_logprobs,
)
from alignpipe.params import SamplingParams

PROMPTS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "user", "content": "Describe the ocean in one short sentence without commas."}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 7 + 5?"}],
]
KEYS = ["p0", "p1", "p2"]
# five lengths, one long: refilled prompts are shorter and longer than the live cache
LONGER_PROMPTS = PROMPTS + [[{"role": "user", "content": "tea " * 40}], [{"role": "user", "content": "hi"}]]


# --- backend selection and seeds -------------------------------------------------------------


@pytest.mark.parametrize(
    ("importable", "cuda", "expected"),
    [(True, True, "vllm"), (True, False, "hf"), (False, True, "hf"), (False, False, "hf")],
)
def test_auto_picks_vllm_only_with_vllm_and_a_gpu(monkeypatch, importable, cuda, expected):
    monkeypatch.setattr(gen, "vllm_importable", lambda: importable)
    monkeypatch.setattr(gen, "cuda_available", lambda: cuda)
    assert resolve_backend("auto") == expected
    assert resolve_backend("hf") == "hf"


def test_explicit_vllm_fails_clearly_without_vllm_or_gpu(monkeypatch):
    monkeypatch.setattr(gen, "cuda_available", lambda: True)
    monkeypatch.setattr(gen, "vllm_importable", lambda: False)
    with pytest.raises(GenerationError, match="needs vLLM"):
        resolve_backend("vllm")
    monkeypatch.setattr(gen, "vllm_importable", lambda: True)
    monkeypatch.setattr(gen, "cuda_available", lambda: False)
    with pytest.raises(GenerationError, match="CUDA GPU"):
        resolve_backend("vllm")
    with pytest.raises(GenerationError, match="unknown generation backend"):
        resolve_backend("tgi")


def test_derive_seed_is_the_first_62_bits_of_sha256():
    expected = int.from_bytes(hashlib.sha256(b"7\x00prompt-1").digest()[:8], "big") >> 2
    assert derive_seed(7, "prompt-1") == expected
    assert derive_seed(7, "prompt-2") != expected and derive_seed(8, "prompt-1") != expected
    assert 0 <= expected < 2**62


def test_build_requests_renders_once_with_the_chat_template(tokenizer):
    requests = build_requests(tokenizer, PROMPTS[:1], ["a"], seed=3)
    assert requests[0].text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert requests[0].token_ids == encode_ids(tokenizer, requests[0].text)
    assert requests[0].seed == derive_seed(3, "a")


# --- sampling maths ---------------------------------------------------------------------------


def _settings(**kw) -> SamplingParams:
    return SamplingParams(backend="hf", **kw)


def test_inverse_cdf_sampling_follows_the_hand_table():
    """p = (0.1, 0.2, 0.7): cumulative (0.1, 0.3, 1.0); u picks the first bin whose mass exceeds it."""
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]])).repeat(5, 1)
    u = torch.tensor([0.0, 0.05, 0.15, 0.35, 0.999], dtype=torch.float64)
    assert pick_tokens(logits, u, _settings(temperature=1.0)).tolist() == [0, 0, 1, 2, 2]
    # top-k 2 removes token 0: renormalised (0, 2/9, 7/9), so u = 0 now picks token 1
    assert pick_tokens(logits, u, _settings(temperature=1.0, top_k=2)).tolist() == [1, 1, 1, 2, 2]
    assert pick_tokens(logits, u, _settings(temperature=0.0)).tolist() == [2] * 5


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    kept = filter_logits(logits, 1.0, 0, 0.6).softmax(-1)[0]  # 0.5 < 0.6, 0.5 + 0.3 >= 0.6: keep 2 tokens
    assert torch.allclose(kept, torch.tensor([0.625, 0.375, 0.0]))
    only_top = filter_logits(logits, 1.0, 0, 0.5).softmax(-1)[0]  # 0.5 already reaches 0.5
    assert torch.allclose(only_top, torch.tensor([1.0, 0.0, 0.0]))
    hot = filter_logits(logits, 2.0, 0, 1.0)  # temperature divides the logits
    assert torch.allclose(hot, logits / 2)


def test_token_logprobs_use_the_raw_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    assert token_logprobs(logits, torch.tensor([1])).item() == pytest.approx(math.log(0.75))
    assert token_logprobs(logits, torch.tensor([0])).item() == pytest.approx(math.log(0.25))


def test_finish_row_eos_stop_string_and_length(tokenizer):
    eos = tokenizer.eos_token_id
    head, mid, tail = (encode_ids(tokenizer, s) for s in ("abc", "XYZ", "def"))
    assert len(mid) == 3  # one token per letter, so "XY" is complete at the second one
    ids = head + mid + tail
    logps = [-float(i + 1) for i in range(len(ids) + 1)]
    assert finish_row(ids + [eos], logps, {eos}, [], tokenizer) == (
        "abcXYZdef",
        len(ids) + 1,
        "stop",
        sum(logps),
    )
    assert finish_row(ids, logps[:-1], {eos}, [], tokenizer) == (
        "abcXYZdef",
        len(ids),
        "length",
        sum(logps[:-1]),
    )
    cut = len(head) + 2
    expected = ("abc", cut, "stop", sum(logps[:cut]))
    assert finish_row(ids + [eos], logps, {eos}, ["XY", "zzz"], tokenizer) == expected
    assert first_stop("abcXYdef", ["de", "XY"]) == 3 and first_stop("abc", ["x"]) is None


# --- the hf backend on the tiny model ---------------------------------------------------------


class EosAt(torch.nn.Module):
    """Wraps a model so that the token sampled at step ``k`` (0 = right after the prompt) is EOS."""

    def __init__(self, model, eos: int, k: int) -> None:
        super().__init__()
        self.inner, self.eos, self.k, self.calls = model, eos, k, 0
        self.config, self.generation_config = model.config, model.generation_config

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        if self.calls == self.k:
            out.logits[..., self.eos] += 1e4
        self.calls += 1
        return out


def _backend(model, tokenizer, **kw) -> HFBackend:
    kw = {"temperature": 1.0, "max_new_tokens": 6, "batch_size": 2, **kw}
    return HFBackend(model, tokenizer, _settings(**kw))


def test_hf_gives_n_samples_per_prompt_with_their_seeds(model, tokenizer):
    requests = build_requests(tokenizer, PROMPTS, KEYS, seed=0)
    samples = _backend(model, tokenizer).generate(requests, 4)
    assert [(s.prompt_index, s.sample_idx) for s in samples] == [(p, j) for p in range(3) for j in range(4)]
    assert all(s.seed == requests[s.prompt_index].seed + s.sample_idx for s in samples)
    assert all(s.n_tokens == 6 and s.finish_reason == "length" for s in samples)  # random model: no EOS
    assert len({s.completion for s in samples}) == 12  # 320-token vocabulary at T=1: all distinct
    assert all(s.logprob is not None and -6 * math.log(320) * 3 < s.logprob < 0 for s in samples)


@pytest.mark.parametrize("k", [0, 2])
def test_hf_eos_ends_a_sample_with_finish_reason_stop(model, tokenizer, k):
    eos = tokenizer.eos_token_id
    requests = build_requests(tokenizer, PROMPTS, KEYS, seed=0)
    samples = _backend(EosAt(model, eos, k), tokenizer, batch_size=3).generate(requests, 2)
    assert all(s.finish_reason == "stop" and s.n_tokens == k + 1 for s in samples)
    if k == 0:
        assert all(s.completion == "" and s.logprob == pytest.approx(0.0, abs=1e-3) for s in samples)


def test_hf_is_deterministic_for_a_seed(model, tokenizer):
    backend = _backend(model, tokenizer)
    first = backend.generate(build_requests(tokenizer, PROMPTS, KEYS, seed=0), 2)
    again = backend.generate(build_requests(tokenizer, PROMPTS, KEYS, seed=0), 2)
    other = backend.generate(build_requests(tokenizer, PROMPTS, KEYS, seed=1), 2)
    assert first == again
    assert [s.completion for s in first] != [s.completion for s in other]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hf_sample_does_not_depend_on_its_batch(model, tokenizer, temperature):
    """Left padding and per-row seeds: each prompt alone gives what it gives in a mixed-length batch."""
    requests = build_requests(tokenizer, PROMPTS, KEYS, seed=0)
    assert len({len(r.token_ids) for r in requests}) == 3  # three lengths: the batch is padded
    batched = _backend(model, tokenizer, temperature=temperature, batch_size=3).generate(requests, 2)
    alone = []
    for i, request in enumerate(requests):
        alone += [
            replace(s, prompt_index=i)
            for s in _backend(model, tokenizer, temperature=temperature).generate([request], 2)
        ]
    assert [(s.completion, s.n_tokens) for s in alone] == [(s.completion, s.n_tokens) for s in batched]
    assert [s.logprob for s in alone] == pytest.approx([s.logprob for s in batched], abs=1e-4)


class EosAfterTokensDivisibleBy3(torch.nn.Module):
    """Wraps a model so that a decode step whose input token is divisible by 3 is followed by EOS."""

    def __init__(self, model, eos: int) -> None:
        super().__init__()
        self.inner, self.eos = model, eos
        self.config, self.generation_config = model.config, model.generation_config

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        if input_ids.shape[1] == 1:
            out.logits[input_ids[:, 0] % 3 == 0, -1, self.eos] += 1e4
        return out


def test_hf_refilled_rows_sample_as_if_alone(model, tokenizer, monkeypatch):
    """Finished rows make room for new prompts (caches of other lengths merged): nothing changes per prompt."""
    import alignpipe.generation.hf as hf

    merges, real_merge = [], hf.merge
    monkeypatch.setattr(hf, "merge", lambda live, new: merges.append(1) or real_merge(live, new))
    requests = build_requests(tokenizer, LONGER_PROMPTS, [f"k{i}" for i in range(5)], seed=0)
    wrapped = EosAfterTokensDivisibleBy3(model, tokenizer.eos_token_id)
    batched = _backend(wrapped, tokenizer, batch_size=2, max_new_tokens=8).generate(requests, 2)
    assert (
        merges and len({s.n_tokens for s in batched}) > 2
    )  # rows ended at different steps and were refilled
    alone = []
    for i, request in enumerate(requests):
        alone += [
            replace(s, prompt_index=i)
            for s in _backend(wrapped, tokenizer, batch_size=1, max_new_tokens=8).generate([request], 2)
        ]
    assert [(s.completion, s.n_tokens, s.finish_reason) for s in alone] == [
        (s.completion, s.n_tokens, s.finish_reason) for s in batched
    ]
    assert [s.logprob for s in alone] == pytest.approx([s.logprob for s in batched], abs=1e-4)


def test_hf_logprobs_match_a_plain_forward_pass(model, tokenizer, monkeypatch):
    """Cached, padded, refilled decoding scores every token as one unpadded forward over prompt + sample."""
    import alignpipe.generation.hf as hf

    rows, real_sample = [], HFBackend._sample
    monkeypatch.setattr(HFBackend, "_sample", lambda self, row: rows.append(row) or real_sample(self, row))
    merges, real_merge = [], hf.merge
    monkeypatch.setattr(hf, "merge", lambda live, new: merges.append(1) or real_merge(live, new))
    requests = build_requests(tokenizer, LONGER_PROMPTS, [f"k{i}" for i in range(5)], seed=0)
    wrapped = EosAfterTokensDivisibleBy3(model, tokenizer.eos_token_id)
    _backend(wrapped, tokenizer, batch_size=2, max_new_tokens=8).generate(requests, 2)
    assert len(rows) == 10 and merges
    for row in rows:
        prompt = requests[row.prompt_index].token_ids
        with torch.no_grad():
            full = model(input_ids=torch.tensor([prompt + row.tokens])).logits[0].log_softmax(-1)
        scored = full[len(prompt) - 1 : -1].gather(1, torch.tensor(row.tokens)[:, None])[:, 0]
        unbiased = len(row.tokens) - (row.tokens[-1] == tokenizer.eos_token_id)  # a forced EOS scores ~0
        assert scored[:unbiased].tolist() == pytest.approx(row.logps[:unbiased], abs=1e-4)


def test_sample_entry_point_loads_a_model_folder(tiny_model_dir):
    settings = _settings(temperature=1.0, max_new_tokens=4)
    samples = load.sample(tiny_model_dir, PROMPTS[:2], settings, n=3, keys=["a", "b"])
    assert len(samples) == 6 and {s.prompt_index for s in samples} == {0, 1}
    assert samples == load.sample(tiny_model_dir, PROMPTS[:2], settings, n=3, keys=["a", "b"])


# --- vLLM: request building and output parsing with fakes (no GPU) ---------------------------


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def _request(seed: int) -> PromptRequest:
    return PromptRequest(text="x", token_ids=[5, 6, 7], seed=seed)


def test_vllm_sampling_kwargs_map_params_one_to_one():
    settings = _settings(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=32, stop=["\n\n"])
    assert gvllm.sampling_kwargs(settings, 4, 1234) == dict(
        n=4,
        temperature=0.7,
        top_p=0.9,
        top_k=0,
        max_tokens=32,
        seed=1234,
        stop=["\n\n"],
        logprobs=0,
        skip_special_tokens=True,
    )
    assert gvllm.sampling_kwargs(_settings(), 1, 0)["stop"] is None
    engine = gvllm.engine_kwargs("models/sft", _settings(tensor_parallel_size=2, gpu_memory_utilization=0.5))
    assert engine["dtype"] == "bfloat16" and engine["tensor_parallel_size"] == 2
    assert engine["gpu_memory_utilization"] == 0.5 and engine["generation_config"] == "vllm"
    assert gvllm.engine_kwargs("m", _settings(dtype="float16"))["dtype"] == "float16"


def test_vllm_builds_one_request_per_prompt_with_its_seed():
    prompts, params = gvllm.build_inputs([_request(10), _request(20)], _settings(), 3, FakeSamplingParams)
    assert prompts == [{"prompt_token_ids": [5, 6, 7]}] * 2
    assert [(p.kwargs["n"], p.kwargs["seed"]) for p in params] == [(3, 10), (3, 20)]


def _completion(index, text, n_tokens, reason, logprob):
    return SimpleNamespace(
        index=index,
        text=text,
        token_ids=list(range(n_tokens)),
        finish_reason=reason,
        cumulative_logprob=logprob,
    )


def test_vllm_outputs_parse_into_samples():
    outputs = [
        SimpleNamespace(
            outputs=[_completion(1, "b", 3, "length", -2.5), _completion(0, "a", 2, "stop", -1.0)]
        ),
        SimpleNamespace(outputs=[_completion(0, "c", 1, "stop", None), _completion(1, "d", 4, "stop", -0.5)]),
    ]
    samples = gvllm.parse_outputs(outputs, [_request(10), _request(20)], 2)
    assert [
        (s.prompt_index, s.sample_idx, s.completion, s.n_tokens, s.finish_reason, s.logprob, s.seed)
        for s in samples
    ] == [
        (0, 0, "a", 2, "stop", -1.0, 10),
        (0, 1, "b", 3, "length", -2.5, 11),
        (1, 0, "c", 1, "stop", None, 20),
        (1, 1, "d", 4, "stop", -0.5, 21),
    ]


def test_vllm_parse_rejects_aborted_or_missing_samples():
    aborted = [SimpleNamespace(outputs=[_completion(0, "a", 1, "abort", None)])]
    with pytest.raises(GenerationError, match="abort"):
        gvllm.parse_outputs(aborted, [_request(1)], 1)
    with pytest.raises(GenerationError, match="expected 2"):
        gvllm.parse_outputs(
            [SimpleNamespace(outputs=[_completion(0, "a", 1, "stop", None)])], [_request(1)], 2
        )
    with pytest.raises(GenerationError, match="2 outputs for 1 prompts"):
        gvllm.parse_outputs(aborted * 2, [_request(1)], 1)


def test_vllm_backend_drives_llm_generate(monkeypatch):
    calls = []

    class FakeLLM:
        def generate(self, prompts, params, use_tqdm):
            calls.append((prompts, params))
            return [
                SimpleNamespace(
                    outputs=[_completion(j, f"s{j}", 2, "stop", -1.0) for j in range(p.kwargs["n"])]
                )
                for p in params
            ]

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=FakeSamplingParams, LLM=None))
    backend = gvllm.VllmBackend("unused", _settings(), llm=FakeLLM())
    done = []
    samples = backend.generate([_request(1), _request(2)], 2, done.append)
    assert [(s.prompt_index, s.sample_idx, s.seed) for s in samples] == [
        (0, 0, 1),
        (0, 1, 2),
        (1, 0, 2),
        (1, 1, 3),
    ]
    assert len(calls) == 1 and done == [2]
