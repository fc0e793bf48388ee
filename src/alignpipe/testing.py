"""Tiny models and tokenizers built in-process, for tests and smoke runs (no download).

``python -m alignpipe.testing OUT_DIR`` writes a tiny causal LM folder in HF format
(2-layer Llama, byte-level BPE tokenizer trained on the spot, ChatML template as in
SmolLM2), which every stage accepts in place of the embedded default.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# The ChatML template of SmolLM2-Instruct, without its default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Describe the ocean in one short sentence without commas.",
    "Answer with only the number: what is 7 + 5? 12",
    "- first item\n- second item\n- third item",
    '{"name": "tea", "color": "green"}',
    "user assistant system hello world sleep water tip answer",
    "all lowercase words are easy to read and write.",
] * 4


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens (any text encodes)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A 2-layer Llama config small enough to train in a test (about 100k parameters)."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides) -> LlamaForCausalLM:
    import torch

    torch.manual_seed(seed)
    config = tiny_config(len(tokenizer), **overrides)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return LlamaForCausalLM(config)


def save_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny causal LM folder (safetensors, tokenizer, chat template, generation config)."""
    out_dir = Path(out_dir)
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def pair_row(i: int, prefix: str = "p", prompt_id: str | None = None) -> dict:
    """Row ``i`` of a tiny preference table (schema PAIRS): prompts, chosen and rejected of 3 lengths."""
    return {
        "pair_id": f"{prefix}{i}",
        "prompt_id": prompt_id if prompt_id is not None else f"q{i}",
        "prompt": [{"role": "user", "content": "hello world " * (1 + i % 3)}],
        "chosen": [{"role": "assistant", "content": "the quick brown fox " * (1 + i % 2)}],
        "rejected": [{"role": "assistant", "content": "lazy dog" + " x" * i}],
        "chosen_reward": 1.0,
        "rejected_reward": 0.0,
        "margin": 1.0,
        "source": "generated",
    }


def unpaired_row(i: int, label: bool | None = None, prompt_id: str | None = None, prefix: str = "u") -> dict:
    """Row ``i`` of a tiny unpaired table (schema UNPAIRED): two completions per prompt (q0, q0, q1, ...),
    labels alternating desirable / undesirable unless given."""
    return {
        "example_id": f"{prefix}{i}",
        "prompt_id": prompt_id if prompt_id is not None else f"q{i // 2}",
        "prompt": [{"role": "user", "content": "hello world " * (1 + (i // 2) % 3)}],
        "completion": [
            {
                "role": "assistant",
                "content": ("the quick brown fox " if i % 2 == 0 else "lazy dog") + " x" * i,
            }
        ],
        "label": label if label is not None else i % 2 == 0,
        "reward": float(i % 2 == 0),
        "source": "generated",
    }


def save_cli(save: Callable[..., Path], description: str, argv: Sequence[str] | None = None) -> Path:
    """``python -m <module> OUT_DIR [--seed N]`` of a tiny-model module: ``save(OUT_DIR, seed=N)``,
    and print the folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = save(args.out_dir, seed=args.seed)
    print(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    save_cli(save_tiny_model, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
