"""RMSNorm and fused residual-add + RMSNorm.

    y = x * rsqrt(mean(x^2) + eps) * (offset + w)        offset = 0 (Llama), 1 (Gemma's (1 + w))
    s = x + residual;  y = rms_norm(s)                   (add_rms_norm)

The Triton kernels, their launchers and autograd Functions are filled in below the twins.
"""

from __future__ import annotations

import torch

from ._checks import check_float, check_same_device, check_same_shape, check_vector, compute_dtype
from .backend import use_triton


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`rms_norm`: fp32 math (fp64 for fp64 input), output in ``x.dtype``."""
    dt = compute_dtype(x, weight)
    xf = x.to(dt)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.to(dt))
    return y.to(x.dtype)


def add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch twin of :func:`add_rms_norm`: returns ``(rms_norm(x + residual), x + residual)``."""
    dt = compute_dtype(x, residual, weight)
    s = x.to(dt) + residual.to(dt)
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.to(dt))
    return y.to(x.dtype), s.to(x.dtype)


def _check(op: str, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    check_float("x", x, op)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_vector(op, "weight", weight, x.shape[-1], "x")
    if residual is not None:
        check_float("residual", residual, op)
        check_same_shape(op, "x", x, "residual", residual)
    check_same_device(op, x=x, weight=weight, residual=residual)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """RMS-normalise the last dimension of ``x`` and scale by ``offset + weight``."""
    _check("rms_norm", x, weight)
    if use_triton(x):
        return RMSNormFunction.apply(x, weight, eps, offset)
    return rms_norm_torch(x, weight, eps, offset)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` and ``rms_norm(s)`` in one pass; returns ``(y, s)``."""
    _check("add_rms_norm", x, weight, residual)
    if use_triton(x):
        return AddRMSNormFunction.apply(x, residual, weight, eps, offset)
    return add_rms_norm_torch(x, residual, weight, eps, offset)
