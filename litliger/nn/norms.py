"""Normalisation layers on the fused kernels. ``norm(x, residual=r)`` adds the residual first and returns
``(norm(x + r), x + r)``: for RMSNorm the add is fused into the kernel (one read of each input)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ..kernels import add_rms_norm, layer_norm, rms_norm
from . import init


class RMSNorm(nn.Module):
    """``y = x * rsqrt(mean(x^2) + eps) * (offset + weight)``; ``offset=1`` is Gemma's ``(1 + w)``."""

    def __init__(
        self,
        size: int,
        eps: float = 1e-6,
        offset: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.empty(size, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        init.init_parameter(self, "weight", "norm_weight", norm_offset=self.offset)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rms_norm(x, self.weight, self.eps, self.offset)
        return add_rms_norm(x, residual, self.weight, self.eps, self.offset)

    def recompute_fn(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """``self(x)`` as a call for later, on the weight of now (litliger.nn.recompute): for ``(h, s) =
        self(x, residual=r)`` pass ``s``, whose norm is exactly ``h``."""
        return partial(rms_norm, x, self.weight, self.eps, self.offset)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}"


class LayerNorm(nn.Module):
    """``y = (x - mean) * rsqrt(var + eps) * weight + bias`` (biased variance, as ``torch.nn.LayerNorm``)."""

    def __init__(
        self,
        size: int,
        eps: float = 1e-5,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(size, device=device, dtype=dtype)) if bias else None

    def reset_parameters(self) -> None:
        init.init_parameter(self, "weight", "norm_weight")
        init.init_parameter(self, "bias", "norm_bias")

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return layer_norm(x, self.weight, self.bias, self.eps)
        s = x + residual
        return layer_norm(s, self.weight, self.bias, self.eps), s

    def recompute_fn(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """``self(x)`` as a call for later, on the weights of now (see ``RMSNorm.recompute_fn``)."""
        return partial(layer_norm, x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}"
