"""Gated linear units: swiglu(gate, up) = silu(gate) * up, geglu(gate, up) = gelu(gate) * up.

geglu's ``approximate`` is ``"tanh"`` (GPT-NeoX / Gemma's gelu_pytorch_tanh) or ``"none"`` (exact erf).
The Triton kernels, their launchers and autograd Functions are filled in below the twins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_float, check_same_device, check_same_shape, compute_dtype
from .backend import use_triton

GELU_APPROXIMATIONS = ("tanh", "none")


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`swiglu`."""
    dt = compute_dtype(gate, up)
    return (F.silu(gate.to(dt)) * up.to(dt)).to(gate.dtype)


def geglu_torch(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """Plain-PyTorch twin of :func:`geglu`."""
    dt = compute_dtype(gate, up)
    return (F.gelu(gate.to(dt), approximate=approximate) * up.to(dt)).to(gate.dtype)


def _check(op: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    check_float("gate", gate, op)
    check_float("up", up, op)
    check_same_shape(op, "gate", gate, "up", up)
    if gate.dtype != up.dtype:
        raise ValueError(f"{op}: gate ({gate.dtype}) and up ({up.dtype}) must have the same dtype")
    check_same_device(op, gate=gate, up=up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` elementwise."""
    _check("swiglu", gate, up)
    if use_triton(gate):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_torch(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate) * up`` elementwise, with the tanh approximation or exact erf (``approximate="none"``)."""
    _check("geglu", gate, up)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"geglu: approximate={approximate!r}; choose one of {GELU_APPROXIMATIONS}")
    if use_triton(gate):
        return GeGLUFunction.apply(gate, up, approximate)
    return geglu_torch(gate, up, approximate)
