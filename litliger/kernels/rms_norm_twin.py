"""The plain-PyTorch twins of :func:`~litliger.kernels.rms_norm.rms_norm` and
:func:`~litliger.kernels.rms_norm.add_rms_norm`: the CPU path, the test oracle and the benchmark baseline.

The math (forward and backward) is in the docstring of :mod:`litliger.kernels.rms_norm`, whose Triton path these
match: fp32 math (fp64 for fp64 input), outputs in the input dtype, and ``s = x + residual`` rounded once to
``x.dtype`` before it is normalised.
"""

from __future__ import annotations

import torch

from ._checks import compute_dtype


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`rms_norm`: fp32 math (fp64 for fp64 input), output in ``x.dtype``.

    With gradients, a small autograd Function that keeps ``x`` and the per-row ``rstd`` for backward, where
    autograd through the formula keeps ``x``, ``x * rstd`` and the intermediate powers too.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNormTwin.apply(x, weight, eps, offset)
    dt = compute_dtype(x, weight)
    xf = x.to(dt)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.to(dt))
    return y.to(x.dtype)


class _RMSNormTwin(torch.autograd.Function):
    """``y = x r w'`` with ``r = rsqrt(mean(x^2) + eps)``, ``w' = offset + w``. Backward, with ``g = dy w'``:
    ``dx = r g - x r^3 mean(g x)`` and ``dw = sum over rows of dy x r``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        dt = compute_dtype(x, weight)
        xf = x.to(dt)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return (xf * rstd * (offset + weight.to(dt))).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        dt = rstd.dtype
        xf, d = x.to(dt), dy.to(dt)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (d * xf * rstd).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            g = d * (ctx.offset + weight.to(dt))
            dot = (g * xf).mean(-1, keepdim=True)
            dx = (g * rstd - xf * (rstd.pow(3) * dot)).to(x.dtype)
        return dx, dw, None, None


def add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch twin of :func:`add_rms_norm`: returns ``(rms_norm(s), s)`` with ``s = x + residual``.

    s is added in fp32 and stored in ``x.dtype``; y normalises s as stored, so y is exactly rms_norm(s).
    """
    dt = compute_dtype(x, residual, weight)
    s = (x.to(dt) + residual.to(dt)).to(x.dtype)
    return rms_norm_torch(s, weight, eps, offset), s
