"""Log-likelihoods of continuations and of whole texts (what ``LLM.loglikelihood`` and lm_eval's requests need)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def continuation_logprob(model: nn.Module, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log P(continuation | context) and whether every continuation token is the greedy choice. The context is
    cut from the left so that both fit the model (the continuation is scored whole)."""
    if not continuation:
        return 0.0, True
    ids = (context + continuation)[-(model.max_seq_length + 1) :]
    idx = torch.tensor([ids[:-1]], device=model.transformer.wte.weight.device)
    logprobs = torch.log_softmax(model(idx)[0, -len(continuation) :].float(), dim=-1)  # (n, V)
    target = torch.tensor(continuation, device=logprobs.device)
    total = logprobs.gather(1, target[:, None]).sum().item()
    return total, bool((logprobs.argmax(dim=-1) == target).all())


def rolling_logprob(model: nn.Module, ids: list[int], first: int) -> float:
    """log P(ids) of a whole text: the first token given ``first`` (BOS or EOS), then windows of the model's
    max_seq_length, each scoring only its own tokens with up to a window of context before them (lm_eval's
    loglikelihood_rolling)."""
    tokens, window, total = [first, *ids], model.max_seq_length, 0.0
    for start in range(0, len(ids), window):
        end = min(start + window, len(ids))
        # tokens[k] precedes ids[k]: the inputs tokens[end - window .. end - 1] predict ids[start:end]
        total += continuation_logprob(model, tokens[max(0, end - window) : start + 1], ids[start:end])[0]
    return total
