"""``alignpipe chat MODEL_DIR``: talk to any model folder in the terminal, as ``trl chat`` does.

The conversation is rendered with the folder's own chat template (:func:`alignpipe.chat.render_prompt`,
the path every stage uses) and the answer streams token by token from the sampler of the HF
backend (:func:`alignpipe.generation.hf.pick_tokens`: temperature, top-k, top-p; greedy at
temperature 0). Sampling settings come from the ``generate`` section of ``--params``
(params.yaml when it exists, else the defaults); flags override them.

Commands: ``/reset`` forgets the conversation (the system prompt stays), ``/system <text>`` sets
the system prompt and starts over, ``/help``, ``/quit`` (or Ctrl-D). Ctrl-C stops an answer.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from alignpipe.core.chat import Message, encode_ids, render_prompt, require_chat_template
from alignpipe.params import GenerateParams, load_section

PROMPT = ">>> "
HELP = "/reset: forget the conversation; /system <text>: set the system prompt; /quit: leave"


def settings_from(args: argparse.Namespace) -> GenerateParams:
    """The ``generate`` section of ``args.params`` (defaults if the file is absent), flags on top."""
    params = load_section("generate", args.params) if Path(args.params).exists() else GenerateParams()
    overrides = {
        k: v
        for k, v in (
            ("temperature", args.temperature),
            ("top_p", args.top_p),
            ("top_k", args.top_k),
            ("max_new_tokens", args.max_new_tokens),
            ("seed", args.seed),
        )  # fmt: skip
        if v is not None
    }
    # a chat samples one answer a turn (generate.n is best-of-N, and greedy needs n == 1)
    return params.model_validate(params.model_dump() | {"n": 1} | overrides)


class ChatSession:
    """A model, its tokenizer, the sampling settings and the conversation so far."""

    def __init__(
        self, model: Any, tokenizer: Any, settings: GenerateParams, system: str | None = None
    ) -> None:
        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.system = system
        self.history: list[Message] = []
        self.rng = random.Random(settings.seed)
        self.device = next(model.parameters()).device
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids = {i for i in [tokenizer.eos_token_id, *gen_eos] if i is not None}

    def messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: str) -> None:
        self.system = text or None
        self.reset()

    @torch.inference_mode()
    def stream(self, user: str) -> Iterator[str]:
        """Pieces of the answer to ``user`` as they are sampled; the whole answer joins the history."""
        from transformers import DynamicCache

        from alignpipe.generation.hf import pick_tokens

        self.history.append({"role": "user", "content": user})
        ids = encode_ids(self.tokenizer, render_prompt(self.tokenizer, self.messages()))
        cache = DynamicCache(config=self.model.config)
        step = torch.tensor([ids], device=self.device)
        tokens: list[int] = []
        shown = ""
        try:
            for _ in range(self.settings.max_new_tokens):
                out = self.model(input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=1)
                uniform = torch.tensor([self.rng.random()], dtype=torch.float64, device=self.device)
                token = int(pick_tokens(out.logits[:, -1].float(), uniform, self.settings)[0])
                if token in self.eos_ids:
                    break
                tokens.append(token)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if text.startswith(shown) and not text.endswith("\ufffd"):  # no half-decoded character
                    yield text[len(shown) :]
                    shown = text
                step = torch.tensor([[token]], device=self.device)
        finally:  # an interrupted answer stays in the history as far as it got
            answer = self.tokenizer.decode(tokens, skip_special_tokens=True)
            self.history.append({"role": "assistant", "content": answer})
        if answer.startswith(shown) and answer != shown:
            yield answer[len(shown) :]


def command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run a ``/command``; False when it asks to leave."""
    name, _, rest = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        session.reset()
        print("(conversation cleared)", file=out)
    elif name == "/system":
        session.set_system(rest.strip())
        print(f"(system prompt {'set' if session.system else 'removed'}; conversation cleared)", file=out)
    else:
        print(HELP, file=out)
    return True


def repl(session: ChatSession, read: Any = input, out: TextIO = sys.stdout) -> None:
    """Read a line, answer it streaming, until /quit, Ctrl-D or Ctrl-C at the prompt."""
    while True:
        out.write(PROMPT)  # here, not input(PROMPT): without readline a tty prompt would go to stderr
        out.flush()
        try:
            line = read().strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        if not line:
            continue
        if line.startswith("/"):
            if not command(session, line, out):
                return
            continue
        try:
            for piece in session.stream(line):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" (stopped)")
        out.write("\n")
        out.flush()


def load_session(args: argparse.Namespace) -> ChatSession:
    from alignpipe.core.models import check_model_folder, load_causal_lm, load_tokenizer

    settings = settings_from(args)
    check_model_folder(args.model_dir)
    tokenizer = load_tokenizer(args.model_dir, trust_remote_code=args.trust_remote_code)
    require_chat_template(tokenizer, where=str(args.model_dir))
    model = load_causal_lm(args.model_dir, dtype=settings.dtype, trust_remote_code=args.trust_remote_code)
    return ChatSession(model, tokenizer, settings, system=args.system)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="alignpipe", description="alignpipe tools")
    sub = top.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat with a model folder in the terminal", description=__doc__)
    chat.add_argument("model_dir", type=Path, help="an HF model folder (e.g. models/dpo)")
    chat.add_argument("--params", default="params.yaml", help="sampling settings: its generate section")
    chat.add_argument("--temperature", type=float, help="overrides generate.temperature (0 = greedy)")
    chat.add_argument("--top-p", type=float, help="overrides generate.top_p")
    chat.add_argument("--top-k", type=int, help="overrides generate.top_k (0 = off)")
    chat.add_argument("--max-new-tokens", type=int, help="overrides generate.max_new_tokens")
    chat.add_argument("--seed", type=int, help="overrides generate.seed")
    chat.add_argument("--system", help="system prompt to start with")
    chat.add_argument("--trust-remote-code", action="store_true", help="run the folder's own model code")
    return top


def main(argv: Sequence[str] | None = None) -> None:
    from alignpipe.cli import stage_main

    args = parser().parse_args(argv)

    @stage_main
    def run() -> None:
        session = load_session(args)
        s = session.settings
        print(
            f"alignpipe chat: {args.model_dir} (temperature={s.temperature}, top_p={s.top_p}, "
            f"top_k={s.top_k}, max_new_tokens={s.max_new_tokens}); {HELP}",
            flush=True,
        )
        repl(session)

    run()


if __name__ == "__main__":
    main()
