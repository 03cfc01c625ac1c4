"""``litliger chat``: turns stay in the KV cache (only the new text is encoded), /reset, /exit, end of input,
a conversation longer than the cache, and a message that cannot fit, all by piping stdin."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_finetune import REPO, make_base, tiny_config

from litliger import GPT
from litliger.data import Tokenizer
from litliger.inference.chat import chat_style, conversation_text
from litliger.inference.chat import main as chat


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A checkpoint whose tokenizer has a short chat template ("u: ...", "a: ...<|endoftext|>")."""
    return make_base(tmp_path_factory.mktemp("chat"), tiny_config(block_size=96))


@pytest.fixture
def forwards(monkeypatch) -> list[tuple[list[int], int | None]]:
    """Every forward's (token ids, input_pos)."""
    calls = []
    original = GPT.forward

    def spy(self, idx, *args, **kwargs):
        calls.append((idx[0].tolist(), kwargs.get("input_pos")))
        return original(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", spy)
    return calls


def run_chat(monkeypatch, base: Path, lines: str, **flags) -> list[dict[str, str]]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    return chat(base, temperature=0, device="cpu", **{"max_new_tokens": 6, **flags})


def cache_contents(calls: list[tuple[list[int], int | None]]) -> list[int]:
    """The ids in the cache after these forwards (each writes its ids at input_pos)."""
    ids: list[int] = []
    for tokens, pos in calls:
        ids = ids[:pos] + tokens
    return ids


def test_turns_stay_in_the_cache_and_only_new_text_is_encoded(base, forwards, monkeypatch, capsys):
    messages = run_chat(monkeypatch, base, "alpha beta\ngamma delta\n")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    tokenizer, style = Tokenizer.from_dir(base), chat_style(base)
    second = [i for i, (_, pos) in enumerate(forwards) if pos and len(forwards[i][0]) > 1]
    assert len(second) == 1  # turn 2 is one prefill at an offset: turn 1 is not encoded again
    prefill, pos = forwards[second[0]]
    first_turn = forwards[: second[0]]
    assert pos == len(cache_contents(first_turn))  # it starts right after what turn 1 left in the cache
    # what the cache holds then is exactly the conversation, as the template renders it
    text = tokenizer.decode(cache_contents(forwards[: second[0] + 1]))
    assert text == conversation_text(style, tokenizer, messages[:3])
    out = capsys.readouterr().out
    assert out == messages[1]["content"] + "\n" + messages[3]["content"] + "\n"


def test_reset_exit_and_end_of_input(base, forwards, monkeypatch, capsys):
    messages = run_chat(monkeypatch, base, "alpha\n/reset\nbeta\n/exit\ngamma\n")
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "beta"
    ]  # reset forgot alpha; exit kept gamma out
    prefills = [pos for tokens, pos in forwards if len(tokens) > 1]
    assert prefills == [0, 0]  # after /reset the conversation starts again at slot 0
    assert "reset" in capsys.readouterr().err
    assert run_chat(monkeypatch, base, "") == []  # end of input at once: nothing to do


def test_a_conversation_longer_than_the_cache_drops_the_oldest_turns(base, monkeypatch, capsys):
    lines = "".join(f"alpha beta gamma delta {w}\n" for w in ("one", "two", "three", "four", "five"))
    messages = run_chat(monkeypatch, base, lines, max_seq_length=48, max_new_tokens=8)
    err = capsys.readouterr().err
    assert "no longer fits the KV cache (48 tokens): dropped the oldest" in err
    assert messages[-2]["content"].endswith("five") and messages[-1]["role"] == "assistant"
    assert len(messages) < 10  # the oldest turns are gone
    tokenizer, style = Tokenizer.from_dir(base), chat_style(base)
    assert len(tokenizer.encode(conversation_text(style, tokenizer, messages[:-1]), bos=False)) <= 48


def test_a_message_that_cannot_fit_is_refused_and_the_chat_goes_on(base, monkeypatch, capsys):
    messages = run_chat(monkeypatch, base, "alpha " * 40 + "\nbeta\n", max_seq_length=24)
    assert "more than the KV cache's 24 slots hold; send a shorter one" in capsys.readouterr().err
    assert [m["content"] for m in messages if m["role"] == "user"] == ["beta"]


def test_chat_by_pipe(base):
    result = subprocess.run(
        [sys.executable, "-m", "litliger", "chat", str(base), "--temperature", "0", "--max_new_tokens", "4",
         "--device", "cpu"],
        input="alpha beta\n", capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.strip()
    assert "/reset starts over" in result.stderr


def test_stop_at_the_end_of_turn_token(base, monkeypatch, capsys):
    # greedy replies of a model that puts all weight on the end-of-turn token stop after one token
    tokenizer = Tokenizer.from_dir(base)
    original = GPT.forward

    def eos_always(self, idx, *args, **kwargs):
        logits = original(self, idx, *args, **kwargs)
        return logits.index_fill(-1, torch.tensor([tokenizer.eos_id]), 1e4)

    monkeypatch.setattr(GPT, "forward", eos_always)
    messages = run_chat(monkeypatch, base, "alpha\nbeta\n")
    assert [m["content"] for m in messages if m["role"] == "assistant"] == ["", ""]
    assert capsys.readouterr().out == "\n\n"
