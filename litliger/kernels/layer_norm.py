"""LayerNorm: y = (x - mean(x)) * rsqrt(var(x) + eps) * w + b  (biased variance, as torch.nn.LayerNorm).

The Triton kernels, their launchers and autograd Function are filled in below the twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_float, check_same_device, check_vector, compute_dtype
from .backend import use_triton


def layer_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`layer_norm`: fp32 math (fp64 for fp64 input), output in ``x.dtype``."""
    dt = compute_dtype(x, weight, bias)
    b = None if bias is None else bias.to(dt)
    return F.layer_norm(x.to(dt), (x.shape[-1],), weight.to(dt), b, eps).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x``; ``bias`` may be None."""
    op = "layer_norm"
    check_float("x", x, op)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_vector(op, "weight", weight, x.shape[-1], "x")
    check_vector(op, "bias", bias, x.shape[-1], "x")
    check_same_device(op, x=x, weight=weight, bias=bias)
    if use_triton(x):
        return LayerNormFunction.apply(x, weight, bias, eps)
    return layer_norm_torch(x, weight, bias, eps)
