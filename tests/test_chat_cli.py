"""``alignpipe chat MODEL_DIR`` under a pseudo-terminal, on a tiny model trained here to answer "hi".

Greedy answers are checked against transformers' own ``generate`` on the conversation rendered
with the folder's chat template, so the history, ``/system`` and ``/reset`` are checked by what
the model is given, not by what the CLI prints about itself.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

from alignpipe.chat_cli import ChatSession, main, parser, settings_from
from alignpipe.core.chat import encode_completion, encode_ids, render_prompt
from alignpipe.params import GenerateParams
from alignpipe.testing import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
HI = [{"role": "user", "content": "hi"}]
ANSWER = "The ocean is vast."


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny model overfit (80 Adam steps, ~2 s) to answer "hi" with ANSWER."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0)
    enc = encode_completion(tok, HI, [{"role": "assistant", "content": ANSWER}])
    ids = torch.tensor([enc.input_ids])
    labels = torch.tensor([[-100] * len(enc.prompt_ids) + enc.completion_ids])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("chat") / "model"
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def greedy(model_dir: Path, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """transformers' greedy generate on the conversation rendered with the folder's template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([encode_ids(tok, render_prompt(tok, messages))])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


class Terminal:
    """The CLI on a pseudo-terminal: ``send`` a line, read what it prints up to the next prompt."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TERM": "dumb", "OMP_NUM_THREADS": "1"}
        self.stderr = (cwd / "stderr.txt").open("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "alignpipe.chat_cli", *argv], stdin=slave,
                                     stdout=slave, stderr=self.stderr, cwd=cwd, env=env)  # fmt: skip
        os.close(slave)

    def read_until(self, marker: str = ">>> ", timeout: float = 120.0) -> str:
        buf, deadline = b"", time.monotonic() + timeout  # a guard against a hang, not a timing check
        while not buf.decode(errors="replace").endswith(marker):
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.stderr.seek(0)
                raise AssertionError(f"no {marker!r} after {buf!r}; stderr: {self.stderr.read()[-2000:]}")
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            buf += chunk
        return buf.decode(errors="replace").replace("\r\n", "\n")

    def send(self, line: str) -> str:
        """What the CLI printed after the echoed ``line``, up to its next prompt."""
        os.write(self.master, (line + "\n").encode())
        echoed, _, printed = self.read_until().partition("\n")
        assert echoed == line
        return printed.removesuffix(">>> ").removesuffix("\n")


def test_chat_under_a_pty_follows_the_template_history_system_and_reset(chat_model, tmp_path):
    params = {"generate": {"temperature": 0.9, "top_p": 0.5, "max_new_tokens": 50}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    term = Terminal(["chat", str(chat_model), "--temperature", "0", "--max-new-tokens", "12"], tmp_path)
    banner = term.read_until()
    assert "temperature=0.0, top_p=0.5, top_k=0, max_new_tokens=12" in banner  # params.yaml + flags
    first = term.send("hi")
    assert first == greedy(chat_model, HI, 12) == ANSWER
    second = term.send("hi")  # the history goes in
    assert second == greedy(chat_model, [*HI, {"role": "assistant", "content": first}, *HI], 12)
    assert term.send("/system Be brief.") == "(system prompt set; conversation cleared)"
    system = [{"role": "system", "content": "Be brief."}, *HI]
    with_system = term.send("hi")
    assert with_system == greedy(chat_model, system, 12)
    assert term.send("/reset") == "(conversation cleared)"
    assert term.send("hi") == with_system  # same system prompt, no history
    assert "/quit" in term.send("/help")
    os.write(term.master, b"/quit\n")
    assert term.proc.wait(timeout=60) == 0


def test_answers_stream_in_pieces_that_make_the_answer(chat_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    session = ChatSession(AutoModelForCausalLM.from_pretrained(chat_model), AutoTokenizer.from_pretrained(chat_model),
                          GenerateParams(n=1, temperature=0.0, max_new_tokens=12))  # fmt: skip
    pieces = list(session.stream("hi"))
    assert len(pieces) > 1 and "".join(pieces) == ANSWER
    assert session.history == [*HI, {"role": "assistant", "content": ANSWER}]


def test_sampling_settings_come_from_params_and_flags(tmp_path):
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"generate": {"temperature": 0.3, "top_p": 0.9, "seed": 7}})
    )
    args = parser().parse_args(["chat", "m", "--params", str(tmp_path / "params.yaml"), "--top-p", "0.5"])
    s = settings_from(args)
    assert (s.temperature, s.top_p, s.seed, s.max_new_tokens) == (
        0.3,
        0.5,
        7,
        GenerateParams().max_new_tokens,
    )
    defaults = settings_from(parser().parse_args(["chat", "m", "--params", str(tmp_path / "none.yaml")]))
    assert defaults == GenerateParams(n=1)  # a chat samples one answer a turn


def test_a_bad_folder_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["chat", str(tmp_path / "missing")])
    assert info.value.code == 1
    assert (
        capsys.readouterr().err.strip()
        == f"error: {tmp_path / 'missing'}: model folder missing (run the stage that writes it)"
    )


def test_the_alignpipe_command_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["alignpipe"] == "alignpipe.chat_cli:main"
