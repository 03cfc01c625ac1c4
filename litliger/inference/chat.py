"""``litliger chat``: a conversation on stdin/stdout whose turns stay in the KV cache.

Each user line is formatted by the checkpoint's prompt style (the one its finetune saved, else the
tokenizer's chat template, else Alpaca exchanges one after another). Only the new text is encoded and
prefilled after the cached conversation; the reply streams until the end-of-turn token (or EOS). When the
next turn and its reply no longer fit the cache, the oldest turns are dropped (said on stderr) and the
rest is encoded again. ``/reset`` starts over, ``/exit`` or end of input ends the session.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch

from ..data import PromptStyle, resolve_prompt_style
from ..data.prompts import ChatTemplate, bos_ids
from ..util.checks import check_positive
from .generate import TextStream, stop_ids, stream
from .loading import Precision, load_for_inference, recorded_prompt_style
from .sampling import check_sampling


def conversation_text(style: PromptStyle, tokenizer, messages: list[dict[str, str]]) -> str:
    """The text a model continues for ``messages`` (ending with a user turn). Alpaca takes one instruction,
    so a conversation is its exchanges in a row, each reply ended by EOS."""
    if isinstance(style, ChatTemplate):
        return style.render_prompt(messages)
    roles = [m["role"] for m in messages]
    if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise ValueError(
            f"the {style.name} prompt style takes user and assistant turns in turn, ending with a user turn (got "
            f"{', '.join(roles)}), in messages; drop system messages, or finetune with a chat template"
        )
    eos = tokenizer.decode([tokenizer.eos_id])
    done = [(u, a) for u, a in zip(messages[:-1:2], messages[1:-1:2], strict=True)]
    return "".join(style.render_prompt([u]) + a["content"] + eos for u, a in done) + style.render_prompt(messages[-1:])


def conversation_ids(style: PromptStyle, tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The ids of :func:`conversation_text`, with BOS as training put it: what ``LLM.chat`` and ``litliger serve``
    feed for a conversation (``litliger chat`` feeds the same, minus the turns its cache already holds)."""
    text = conversation_text(style, tokenizer, messages)
    return bos_ids(tokenizer, text) + tokenizer.encode(text, bos=False)


class TurnTooLong(ValueError):
    """A message that does not fit the KV cache even alone: the chat says so and goes on."""


class Conversation:
    """The messages so far and the KV cache that holds them (one row of ``max_seq_length`` slots).

    The cache holds the conversation's tokens up to ``pos``; ``pending`` (the reply's last token, which is
    sampled but never fed) goes in with the next turn. ``text`` is the conversation as text, what the
    next turn's prompt must start with for its cached part to be reused.
    """

    def __init__(self, model, tokenizer, style: PromptStyle, *, max_seq_length: int, device: str, **sampling) -> None:
        self.model, self.tokenizer, self.style, self.device = model, tokenizer, style, device
        self.max_seq_length, self.sampling = max_seq_length, sampling
        self.stops = stop_ids(tokenizer, style)
        model.set_kv_cache(1, max_seq_length)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.pos, self.pending, self.text = 0, [], ""

    def _encode(self, text: str) -> list[int]:
        return bos_ids(self.tokenizer, text) + self.tokenizer.encode(text, bos=False)  # conversation_ids' encoding

    def reply(self, user: str, max_new_tokens: int) -> Iterator[str]:
        """Stream the assistant's answer to ``user`` as text pieces; the turn is then part of the conversation."""
        messages = [*self.messages, {"role": "user", "content": user}]
        prompt = conversation_text(self.style, self.tokenizer, messages)
        if self.messages and prompt.startswith(self.text):
            feed = self.pending + self.tokenizer.encode(prompt[len(self.text) :], bos=False)
        else:  # a new conversation, or a template that rewrites earlier turns: encode it all
            self.pos, feed = 0, self._encode(prompt)
        if self.pos + len(feed) + max_new_tokens - 1 > self.max_seq_length:
            messages, prompt, feed = self._drop_oldest(messages, max_new_tokens)
            self.pos = 0
        room = self.max_seq_length - self.pos - len(feed) + 1
        if room < 1:
            raise TurnTooLong(
                f"the message is {len(feed)} tokens, more than the KV cache's {self.max_seq_length} slots hold; "
                "send a shorter one or raise --max_seq_length"
            )
        shown = TextStream(self.tokenizer, skip=self.stops)
        tokens = []
        for token in stream(self.model, torch.tensor([feed], device=self.device), min(max_new_tokens, room),
                            input_pos=self.pos, stop_ids=self.stops, **self.sampling):  # fmt: skip
            tokens.append(int(token))
            yield shown.add(tokens[-1])
        self.pos += len(feed) + len(tokens) - 1
        self.pending = tokens[-1:]
        stop = self.tokenizer.decode(tokens[-1:]) if tokens and tokens[-1] in self.stops else ""
        self.text = prompt + shown.text + stop
        self.messages = [*messages, {"role": "assistant", "content": shown.text}]

    def _drop_oldest(self, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[list, str, list[int]]:
        """Drop the oldest user/assistant turns (a system message stays) until the prompt and a whole reply
        fit the cache, or only the new message is left; the kept turns are encoded again."""
        head = messages[:1] if messages[0]["role"] == "system" else []
        turns = messages[len(head) :]
        dropped = 0
        while True:
            prompt = conversation_text(self.style, self.tokenizer, head + turns)
            feed = self._encode(prompt)
            if len(feed) + max_new_tokens - 1 <= self.max_seq_length or len(turns) == 1:
                break
            turns, dropped = turns[2:], dropped + 1
        if dropped:
            print(
                f"litliger: the conversation no longer fits the KV cache ({self.max_seq_length} tokens): "
                f"dropped the oldest {dropped} turn{'s' if dropped > 1 else ''}",
                file=sys.stderr,
            )
        return head + turns, prompt, feed


def read_line(stdin: TextIO, number: int) -> str:
    """Line ``number`` of stdin ("" at its end); one that is not UTF-8 text is a ValueError that says so.

    Bad bytes become lone surrogates (stdin decodes with surrogateescape, see main), which no tokenizer takes;
    a stream that decodes strictly raises instead, possibly for a later line of the chunk it read ahead.
    """
    try:
        line = stdin.readline()
        line.encode("utf-8")
    except UnicodeError as e:
        raise ValueError(
            f"line {number} is not valid UTF-8 text ({e.reason}), in litliger chat's stdin; send UTF-8 text"
        ) from None
    return line


def chat_style(checkpoint_dir: Path) -> PromptStyle:
    """The finetune's saved prompt style, else the tokenizer's chat template, else Alpaca."""
    return recorded_prompt_style(checkpoint_dir) or resolve_prompt_style(Path(checkpoint_dir), None)


def main(
    checkpoint_dir: Path,
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float = 1.0,
    seed: int = 1234,
    max_seq_length: int | None = None,
    precision: Precision = "auto",
    device: str = "auto",
) -> list[dict[str, str]]:
    """``litliger chat``: talk to a checkpoint; one user message per line of stdin, the reply on stdout.

    Args:
        checkpoint_dir: a checkpoint folder or a finetuning step folder, with its tokenizer.
        max_new_tokens: the longest reply; it ends earlier at the end-of-turn token.
        temperature: divides the logits before sampling; 0 for greedy decoding.
        top_k: sample from the k most likely tokens only (null: all).
        top_p: then from the most likely tokens that together hold this probability (1.0: all).
        seed: seeds the sampler once for the session.
        max_seq_length: the KV cache's length, the longest conversation kept (default the model's block_size).
        precision: the weights' and the cache's dtype (auto: bf16-true on GPUs that support it, else 32-true).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    check_positive("max_seq_length", max_seq_length, "set the KV cache's length in tokens", optional=True)
    stdin = sys.stdin
    # `litliger chat CKPT <&-` leaves no stdin at all: there is nothing to read, not even an end of input
    if stdin is None or getattr(stdin, "closed", False):
        raise ValueError("stdin is closed, in litliger chat; pipe messages in or run it in a terminal")
    model, tokenizer, device = load_for_inference(checkpoint_dir, device, precision)
    block_size = model.config.block_size
    if max_seq_length is not None and max_seq_length > block_size:
        raise ValueError(
            f"max_seq_length={max_seq_length} exceeds the model's block_size={block_size}, in --max_seq_length; "
            f"use at most {block_size}"
        )
    style = chat_style(checkpoint_dir)
    conversation = Conversation(
        model, tokenizer, style, max_seq_length=max_seq_length or block_size, device=device,
        temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=tokenizer.vocab_size,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    interactive = stdin.isatty()
    if hasattr(stdin, "reconfigure"):  # bad bytes become surrogates, found line by line (not chunk by chunk)
        stdin.reconfigure(errors="surrogateescape")
    print(f"chatting with {checkpoint_dir} ({style.name}); /reset starts over, /exit ends", file=sys.stderr)
    for number in itertools.count(1):
        if interactive:
            print(">> ", end="", flush=True)
        line = read_line(stdin, number)
        if not line:  # end of input
            break
        message = line.rstrip("\n")
        if message.strip() == "/exit":
            break
        if message.strip() == "/reset":
            conversation.reset()
            print("litliger: the conversation was reset", file=sys.stderr)
            continue
        if not message.strip():
            continue
        try:
            for piece in conversation.reply(message, max_new_tokens):
                print(piece, end="", flush=True)
        except TurnTooLong as e:
            print(f"litliger: {e}", file=sys.stderr)
            continue
        print(flush=True)
    model.clear_kv_cache()
    return conversation.messages
