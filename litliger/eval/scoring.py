"""Scoring a model: the mean loss over a data split; the log-likelihoods of continuations (lm_eval's requests)
are ``litliger.inference.scoring``'s, re-exported here."""

from __future__ import annotations

import torch
from torch import nn

from ..data.base import batch_inputs
from ..inference.scoring import continuation_logprob, rolling_logprob

__all__ = ["continuation_logprob", "rolling_logprob", "split_loss"]


@torch.no_grad()
def split_loss(model: nn.Module, loader, *, device: str | torch.device, max_batches: int | None = None) -> dict:
    """Summed loss, target count and batches over ``loader``: any data module's batches (token blocks or
    instruction batches, with document ids or not: ``litliger.data.base.batch_inputs``)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = batches = 0
    for batch in loader:
        if max_batches is not None and batches >= max_batches:
            break
        idx, targets, document_ids = (t if t is None else t.to(device) for t in batch_inputs(batch))
        total += model(idx, targets=targets, reduction="sum", document_ids=document_ids).double()
        count += int((targets != -100).sum())
        batches += 1
    return {"loss_sum": total.item(), "tokens": count, "batches": batches}
