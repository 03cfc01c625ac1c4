"""Fused LM head + cross-entropy: ``cross_entropy(hidden @ weight.T + bias, targets)`` without ever
holding the (tokens x vocab) logits.

The tokens are walked in chunks of ``chunk_size`` rows. For "mean"/"sum" the Triton path computes each
chunk's logits, its loss and the gradient w.r.t. the logits in one kernel pass, and turns that into the
hidden/weight/bias gradients during forward (grad_weight accumulated in fp32); backward only scales them
by the incoming gradient. For "none" the per-row gradient is unknown at forward time, so backward walks
the chunks again. Loss semantics are those of :mod:`litliger.kernels.cross_entropy`.

The Triton launchers and autograd Function are filled in below the twin.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ._checks import check_float, check_loss_args, check_same_device, check_targets, check_vector
from .backend import use_triton
from .cross_entropy import _reduce, cross_entropy_torch


def default_chunk_size(n_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Rows per chunk so that a chunk's logits take about as much memory as the whole hidden input.

    Rounded to a power of two, at least 16 rows (small chunks starve the matmul), at most ``n_tokens``.
    """
    rows = math.ceil(n_tokens / max(1, math.ceil(vocab_size / hidden_size)))
    return max(1, min(n_tokens, max(16, 1 << max(0, rows - 1).bit_length())))


def _chunk_row_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    t: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
    return cross_entropy_torch(logits, t, ignore_index, "none", label_smoothing, z_loss)


def fused_linear_cross_entropy_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`fused_linear_cross_entropy`.

    Chunked too, with each chunk's logits recomputed in backward (activation checkpointing), so the CPU
    path is also lean in memory; the math is exactly ``cross_entropy_torch(hidden @ weight.T + bias)``.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    n = h.shape[0]
    chunk = chunk_size or default_chunk_size(n, h.shape[1], weight.shape[0])
    track = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    losses = []
    for start in range(0, n, chunk):
        args = (h[start : start + chunk], weight, bias, t[start : start + chunk], ignore_index, label_smoothing, z_loss)
        if track and n > chunk:
            losses.append(checkpoint(_chunk_row_loss, *args, use_reentrant=False))
        else:
            losses.append(_chunk_row_loss(*args))
    loss = torch.cat(losses) if losses else h.new_zeros(0, dtype=torch.float32)
    return _reduce(loss.reshape(targets.shape), t != ignore_index, reduction)


def _check(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    ignore_index: int,
    chunk_size: int | None,
) -> None:
    op = "fused_linear_cross_entropy"
    check_float("hidden", hidden, op)
    check_float("weight", weight, op)
    if hidden.dim() == 0:
        raise ValueError(f"{op}: hidden must have a last (hidden-size) dimension, got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{op}: weight has shape {tuple(weight.shape)} but hidden has last dimension {hidden.shape[-1]}; "
            f"expected weight of shape (vocab_size, {hidden.shape[-1]})"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{op}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    check_vector(op, "bias", bias, weight.shape[0], "the vocabulary (weight.shape[0])")
    check_loss_args(op, reduction, label_smoothing, z_loss)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op}: chunk_size={chunk_size} must be a positive number of rows (or None)")
    check_targets(op, targets, hidden.shape[:-1], weight.shape[0], ignore_index)
    check_same_device(op, hidden=hidden, weight=weight, targets=targets, bias=bias)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` without materialising the logits.

    hidden (..., H), weight (V, H), bias (V,) or None, targets (...) integer.
    """
    _check(hidden, weight, targets, bias, reduction, label_smoothing, z_loss, ignore_index, chunk_size)
    if use_triton(hidden):
        return FusedLinearCrossEntropyFunction.apply(
            hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size
        )
    return fused_linear_cross_entropy_torch(
        hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size
    )
