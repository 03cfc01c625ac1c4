"""Sampling text from a model: the decoding loop over the KV cache, and ``litliger generate``.

``generate`` / ``generate_tokens`` create a KV cache for the prompt and its continuation, prefill the prompt
in one forward, then feed one token per step (``GPT.forward(..., input_pos=n)``), and free the cache. A
batch of prompts of different lengths is left-padded with an attention mask; padding never changes a
row's tokens. ``kv_cache=False`` re-encodes the context every token (the reference, and the benchmark's
baseline). ``stream`` is the loop itself on a cache the caller holds (``litliger chat`` keeps one open).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..model.parallelize import unwrap
from .loading import Precision, load_for_inference, recorded_prompt_style
from .sampling import check_sampling, next_token

# --- sampling ---------------------------------------------------------------------------------------------


# --- the decoding loop ------------------------------------------------------------------------------------


@torch.no_grad()
def stream(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    input_pos: int | None = 0,
    left_pad: torch.Tensor | None = None,
    max_seq_length: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield up to ``max_new_tokens`` next tokens (B,) after ``idx`` (B, T), one per step.

    Cached (``input_pos`` an int): ``idx`` goes to the caller's KV cache at slots input_pos.. in one forward,
    then each new token at the next slot; the last token yielded is not fed (slots needed: T +
    max_new_tokens - 1). Uncached (``input_pos=None``): the last ``max_seq_length`` tokens of the context are
    re-encoded every step. A row that produced one of ``stop_ids`` yields ``pad_id`` from then on; the loop
    ends when every row has stopped. Logits beyond ``vocab_size`` (embedding padding) are never sampled.
    """
    B = idx.shape[0]
    stops = torch.tensor(sorted(set(stop_ids)), device=idx.device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    x, context, pos = idx, idx, input_pos
    for _ in range(max_new_tokens):
        if input_pos is None:
            # any model(idx) -> logits here (the uncached path takes models without a cache too)
            logits = model(context if max_seq_length is None else context[:, -max_seq_length:])[:, -1]
        else:
            logits = model(x, input_pos=pos, left_pad=left_pad, last_only=True)[:, -1]  # (B, padded_vocab)
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        token = next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if not stops.numel():
            yield token
        else:  # a stopped row shows pad_id, but is fed the sampled token (pad_id need not be a valid id)
            yield torch.where(done, pad_id, token)
            done |= torch.isin(token, stops)
        if stops.numel() and bool(done.all()):
            return
        if input_pos is None:
            context = torch.cat((context, token.view(B, 1)), dim=1)
        else:
            pos += x.shape[1]
            x = token.view(B, 1)


def left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Padding slots per row (B,) of a left-padded ``attention_mask`` (B, T): 0s, then 1s, at least one 1."""
    mask = attention_mask.bool()
    pad = (~mask).sum(dim=1)
    real = torch.arange(mask.shape[1], device=mask.device)[None, :] >= pad[:, None]
    if not torch.equal(mask, real) or bool((pad == mask.shape[1]).any()):
        raise ValueError(
            "attention_mask must left-pad every row (0s, then 1s) and keep at least one token per row; "
            "use left_pad_prompts to batch prompts of different lengths"
        )
    return pad


def left_pad_prompts(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as ``(idx, attention_mask)`` (B, T_max), padded on the left."""
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return idx, mask


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    max_seq_length: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    eos_id: int | None = None,
    stop_ids: Iterable[int] = (),
    pad_id: int | None = None,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    kv_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """:func:`generate`, streamed: the new tokens (B,) of each step as they are sampled."""
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"generate needs prompts of shape (batch, T) with T >= 1, got {tuple(idx.shape)}")
    B, T = idx.shape
    stops = {*stop_ids, *([eos_id] if eos_id is not None else [])}
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else min(stops, default=0))
    left_pad = left_padding(attention_mask.to(idx.device)) if attention_mask is not None else None
    gpt = unwrap(model)
    cached = kv_cache and hasattr(gpt, "set_kv_cache")
    if not cached:
        if left_pad is not None and bool(left_pad.any()):
            raise ValueError("left-padded prompts need the KV cache (kv_cache=True and a GPT model)")
        yield from stream(model, idx, max_new_tokens, input_pos=None, max_seq_length=max_seq_length,
                          temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stops, pad_id=pad_id,
                          vocab_size=vocab_size, generator=generator)  # fmt: skip
        return
    limit = min(max_seq_length or gpt.config.block_size, gpt.config.block_size)
    if T > limit:
        raise ValueError(f"the prompt has {T} tokens, more than the KV cache's max_seq_length={limit}")
    max_new_tokens = min(max_new_tokens, limit - T + 1)  # the last token is sampled, never stored
    if max_new_tokens <= 0:
        return
    gpt.set_kv_cache(B, T + max_new_tokens - 1, device=idx.device)
    try:
        yield from stream(model, idx, max_new_tokens, input_pos=0, left_pad=left_pad, temperature=temperature,
                          top_k=top_k, top_p=top_p, stop_ids=stops, pad_id=pad_id, vocab_size=vocab_size,
                          generator=generator)  # fmt: skip
    finally:
        gpt.clear_kv_cache()


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    max_seq_length: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    eos_id: int | None = None,
    stop_ids: Iterable[int] = (),
    pad_id: int | None = None,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    kv_cache: bool = True,
) -> torch.Tensor:
    """Extend ``idx`` (B, T) by up to ``max_new_tokens`` sampled tokens: (B, T + new).

    ``temperature=0`` is greedy; ``top_k`` / ``top_p`` as in :func:`next_token`. A row stops at ``eos_id``
    or any of ``stop_ids`` (included in the output) and is then filled with ``pad_id`` (default ``eos_id``)
    until every row has stopped. Prompts of different lengths come left-padded with ``attention_mask``
    (B, T) of 0 for padding (:func:`left_pad_prompts`). With the KV cache (a GPT model, ``kv_cache=True``)
    the cache holds ``max_seq_length`` slots at most (default the model's): a longer prompt is refused
    and generation ends when the cache is full. Without it the last ``max_seq_length`` tokens are
    re-encoded every step. Every rank of a sharded model must call this with the same inputs and an
    identically seeded ``generator``.
    """
    tokens = list(
        generate_tokens(
            model,
            idx,
            max_new_tokens,
            max_seq_length=max_seq_length,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=eos_id,
            stop_ids=stop_ids,
            pad_id=pad_id,
            vocab_size=vocab_size,
            generator=generator,
            attention_mask=attention_mask,
            kv_cache=kv_cache,
        )
    )
    if not tokens:
        return idx
    return torch.cat((idx, torch.stack(tokens, dim=1).to(idx.device)), dim=1)


# --- text in, text out ------------------------------------------------------------------------------------


class TextStream:
    """Decodes a growing list of token ids into the text to print next (never half a UTF-8 character)."""

    def __init__(self, tokenizer, skip: Iterable[int] = ()) -> None:
        self.tokenizer, self.skip = tokenizer, set(skip)
        self.ids: list[int] = []
        self.printed = ""

    def add(self, token: int) -> str:
        if token not in self.skip:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return ""  # a multi-byte character is still incomplete
        new, self.printed = text[len(self.printed) :], text
        return new

    def flush(self) -> str:
        """At the end of the stream: the text not printed yet, an incomplete character shown as U+FFFD."""
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.printed) :] if text.startswith(self.printed) else ""
        self.printed = text
        return new

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


def start_id(tokenizer) -> int:
    """The token a prompt with no tokens starts from: BOS when the tokenizer has one (even one it does not add
    by itself), else EOS, the token that precedes every document after the first in the training data."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """``prompt``'s ids with BOS exactly when the tokenizer adds it (``add_bos``, as in training and as
    transformers' tokenizer encodes it); an empty prompt is ``[start_id(tokenizer)]``, since decoding needs
    a token to start from."""
    return tokenizer.encode(prompt) or [start_id(tokenizer)]


def complete(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    max_seq_length: int,
    device: torch.device | str,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float = 1.0,
    seed: int = 1234,
) -> str:
    """``prompt`` followed by a sampled continuation (special tokens such as a BOS are not shown).

    A prompt longer than ``max_seq_length - 1`` tokens is cut to its end. The sampler is seeded with
    ``seed`` on every rank, so a sharded model samples in lockstep.
    """
    ids = prompt_ids(tokenizer, prompt)[-max_seq_length + 1 :]
    out = generate(
        model,
        torch.tensor([ids], device=device),
        max_new_tokens,
        max_seq_length=max_seq_length,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=tokenizer.eos_id,
        vocab_size=tokenizer.vocab_size,
        generator=torch.Generator().manual_seed(seed),
    )
    return prompt + tokenizer.decode(out[0, len(ids) :].tolist())


def stop_ids(tokenizer, style) -> list[int]:
    """The ids that end an answer: EOS and the style's end-of-turn token (e.g. ``<|im_end|>``) if it is one."""
    stop = style.stop_text() if style is not None else None
    stop_id = tokenizer.backend.token_to_id(stop) if stop else None
    return [tokenizer.eos_id] + ([stop_id] if stop_id is not None and stop_id != tokenizer.eos_id else [])


def respond(
    model: nn.Module,
    tokenizer,
    style,
    messages: list[dict[str, str]],
    max_new_tokens: int,
    *,
    max_seq_length: int,
    device: torch.device | str,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float = 1.0,
    seed: int = 1234,
) -> str:
    """The assistant's answer to ``messages`` (a conversation ending with a user turn), formatted by the
    finetune's prompt style (``litliger.data.PromptStyle``) and ended by EOS or the style's end-of-turn."""
    ids = style.encode_prompt(tokenizer, messages)[-max_seq_length + 1 :]
    stops = stop_ids(tokenizer, style)
    out = generate(
        model,
        torch.tensor([ids], device=device),
        max_new_tokens,
        max_seq_length=max_seq_length,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_ids=stops,
        vocab_size=tokenizer.vocab_size,
        generator=torch.Generator().manual_seed(seed),
    )
    return tokenizer.decode([t for t in out[0, len(ids) :].tolist() if t not in stops])


# --- loading a checkpoint for inference (generate, chat, evaluate) ----------------------------------------


def main(
    checkpoint_dir: Path,
    prompt: str = "",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float = 1.0,
    seed: int = 1234,
    precision: Precision = "auto",
    device: str = "auto",
    raw: bool = False,
) -> str:
    """``litliger generate``: stream a continuation of ``prompt`` from a litliger checkpoint folder.

    Then one line on stderr: prompt tokens, new tokens, time to first token, decode tokens/s.

    Args:
        checkpoint_dir: a checkpoint folder with model.safetensors, model_config.yaml and tokenizer.json,
            or a finetuning step folder (base + trainable.safetensors).
        prompt: the text to continue, encoded as the tokenizer encodes text (a BOS only if it adds one, as
            in training). For a finetuned checkpoint (finetune.yaml) it is the user's turn, formatted by the
            prompt style the finetune trained with, and the answer is printed.
        max_new_tokens: the most tokens to generate; it ends earlier at an end-of-text (or end-of-turn) token,
            or when the prompt and its continuation fill the model's context (then stderr says so).
        raw: continue ``prompt`` as plain text even when the checkpoint records a prompt style.
        temperature: divides the logits before sampling; 0 for greedy decoding.
        top_k: sample from the k most likely tokens only (null: all).
        top_p: then from the most likely tokens that together hold this probability (1.0: all).
        seed: seeds the sampler.
        precision: the weights' dtype (auto: bf16-true on GPUs that support it, else 32-true).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    model, tokenizer, device = load_for_inference(checkpoint_dir, device, precision)
    if not prompt:
        raise ValueError("the prompt is empty, in --prompt; give the text to continue (or the instruction)")
    style = None if raw else recorded_prompt_style(checkpoint_dir)
    if style is not None:
        ids = style.encode_prompt(tokenizer, [{"role": "user", "content": prompt}])
    else:
        ids = prompt_ids(tokenizer, prompt)
    if len(ids) > model.max_seq_length:
        raise ValueError(
            f"the prompt is {len(ids)} tokens, longer than the model's max_seq_length={model.max_seq_length}, "
            "in --prompt; shorten it"
        )
    stops = stop_ids(tokenizer, style)
    shown = TextStream(tokenizer, skip=stops)
    text = "" if style is not None else prompt
    print(text, end="", flush=True)
    start = time.perf_counter()
    first = now = start
    n, last, limit = 0, None, model.max_seq_length
    for token in generate_tokens(model, torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, stop_ids=stops, vocab_size=tokenizer.vocab_size,
                                 generator=torch.Generator().manual_seed(seed), max_seq_length=limit):  # fmt: skip
        n += 1
        now = time.perf_counter()
        if n == 1:
            first = now
        last = int(token)
        print(shown.add(last), end="", flush=True)
    print(shown.flush(), flush=True)
    if n < max_new_tokens and last not in stops:  # the KV cache is full: the prompt and its continuation hit the limit
        print(
            f"litliger: generated {n} of {max_new_tokens} tokens: the context limit of {limit} tokens was reached "
            f"(the prompt is {len(ids)}); lower --max_new_tokens or shorten --prompt",
            file=sys.stderr,
        )
    rate = f"{(n - 1) / (now - first):.1f}" if n > 1 and now > first else "n/a"
    print(
        f"prompt tokens: {len(ids)} | new tokens: {n} | time to first token: {first - start:.3f} s | "
        f"decode: {rate} tokens/s",
        file=sys.stderr,
    )
    return text + shown.text
