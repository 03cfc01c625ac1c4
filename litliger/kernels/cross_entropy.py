"""Cross-entropy over a vocabulary, with ignore_index, label smoothing and z-loss.

Per row with logits x (V,), target t, lse = logsumexp(x), smoothing e and z-loss weight z:

    loss = (1 - e) * (lse - x[t]) + e * (lse - mean(x)) + z * lse^2        (0 for t == ignore_index)

Label smoothing matches ``torch.nn.functional.cross_entropy(label_smoothing=e)``; the z-loss term is
PaLM's auxiliary ``z * log(Z)^2``. ``reduction="mean"`` divides by the number of non-ignored rows and
gives 0 (not NaN, unlike PyTorch) when every row is ignored. Losses are fp32 (fp64 for fp64 input).
A row whose target is outside [0, V) and not ignore_index gets a NaN loss (CPU inputs raise instead).

The Triton kernels, their launchers and autograd Function are filled in below the twin.
"""

from __future__ import annotations

import torch

from ._checks import check_float, check_loss_args, check_targets, compute_dtype
from .backend import use_triton


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def cross_entropy_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`cross_entropy`."""
    dt = compute_dtype(logits)
    x = logits.reshape(-1, logits.shape[-1]).to(dt)
    t = targets.reshape(-1)
    vocab = x.shape[-1]
    valid = t != ignore_index
    in_range = (t >= 0) & (t < vocab)
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(1, torch.where(in_range, t, 0).long().unsqueeze(1)).squeeze(1)
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss > 0.0:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    loss = torch.where(valid & ~in_range, torch.full_like(loss, float("nan")), loss)
    return _reduce(loss.reshape(targets.shape), valid, reduction)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., V) against integer ``targets`` (...)."""
    op = "cross_entropy"
    check_float("logits", logits, op)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have a non-empty last (vocabulary) dimension, got {tuple(logits.shape)}")
    check_loss_args(op, reduction, label_smoothing, z_loss)
    check_targets(op, targets, logits.shape[:-1], logits.shape[-1], ignore_index)
    if targets.device != logits.device:
        raise ValueError(f"{op}: logits on {logits.device} and targets on {targets.device} must share a device")
    if use_triton(logits):
        return CrossEntropyFunction.apply(logits, targets, ignore_index, reduction, label_smoothing, z_loss)
    return cross_entropy_torch(logits, targets, ignore_index, reduction, label_smoothing, z_loss)
