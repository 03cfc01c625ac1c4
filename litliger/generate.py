"""Sampling text from a model (no KV cache: the context is re-encoded every token)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    max_seq_length: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``idx`` (1, T) by up to ``max_new_tokens`` sampled tokens; stops early at ``eos_id``.

    ``temperature=0`` is greedy. Logits beyond ``vocab_size`` (embedding padding) are never sampled. Every
    rank of a sharded model must call this with the same inputs and an identically seeded ``generator``.
    """
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(f"generate expects one prompt of shape (1, T), got {tuple(idx.shape)}")
    if idx.shape[1] == 0:
        raise ValueError("generate needs a prompt of at least one token")
    for _ in range(max_new_tokens):
        logits = model(idx[:, -max_seq_length:])[0, -1].float()  # (padded_vocab,)
        if vocab_size is not None:
            logits = logits[:vocab_size]
        if temperature == 0:
            token = logits.argmax().view(1)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            token = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
        idx = torch.cat((idx, token.view(1, 1)), dim=1)
        if eos_id is not None and token.item() == eos_id:
            break
    return idx


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
    seed: int = 1234,
) -> str:
    """``prompt`` followed by a sampled continuation (special tokens such as a BOS are not shown).

    The sampler is seeded with ``seed`` on every rank, so a sharded model samples in lockstep.
    """
    ids = tokenizer.encode(prompt, bos=True) or [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
    out = generate(
        model,
        torch.tensor([ids], device=device),
        max_new_tokens,
        max_seq_length=max_seq_length,
        temperature=temperature,
        top_k=top_k,
        eos_id=tokenizer.eos_id,
        vocab_size=tokenizer.vocab_size,
        generator=torch.Generator().manual_seed(seed),
    )
    return prompt + tokenizer.decode(out[0, len(ids) :].tolist())


def main(
    checkpoint_dir: Path,
    prompt: str = "",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 1234,
    device: str = "auto",
) -> str:
    """``litliger generate``: sample a continuation of ``prompt`` from a litliger checkpoint folder.

    Args:
        checkpoint_dir: a checkpoint folder with model.safetensors, model_config.yaml and tokenizer.json.
        prompt: the text to continue (an empty prompt starts from the tokenizer's BOS/EOS token).
        temperature: 0 for greedy decoding.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """
    from .data import Tokenizer
    from .model import GPT

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    tokenizer = Tokenizer.from_dir(checkpoint_dir)
    model = GPT.from_checkpoint(checkpoint_dir, device=device).eval()
    text = complete(
        model,
        tokenizer,
        prompt,
        max_new_tokens,
        max_seq_length=model.max_seq_length,
        device=device,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )
    print(text)
    return text
