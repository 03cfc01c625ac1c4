"""Rotary position embedding (rotate-half / GPT-NeoX layout) on q and k at once.

For the first ``r`` dims of each head (``r = cos.shape[-1] <= head_size``, even), with
``x1 = x[..., :r/2]`` and ``x2 = x[..., r/2:r]``:

    out[..., :r] = x[..., :r] * cos + cat(-x2, x1) * sin
    out[..., r:] = x[..., r:]                          (partial rotary passes the rest through)

q is (B, n_head, T, hs), k is (B, n_kv, T, hs) with n_kv dividing n_head or not (any count works);
cos and sin are (T, r). The Triton kernels, their launchers and autograd Function are filled in below the twin.
"""

from __future__ import annotations

import torch

from ._checks import check_float, check_same_device, compute_dtype
from .backend import use_triton


def _rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dt = compute_dtype(x, cos)
    r = cos.shape[-1]
    xr = x[..., :r].to(dt)
    x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
    out = xr * cos.to(dt) + torch.cat((-x2, x1), dim=-1) * sin.to(dt)
    if r < x.shape[-1]:
        out = torch.cat((out, x[..., r:].to(dt)), dim=-1)
    return out.to(x.dtype)


def rope_torch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch twin of :func:`rope`."""
    return _rotate_torch(q, cos, sin), _rotate_torch(k, cos, sin)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    op = "rope"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, t, op)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must be 4-D (batch, heads, seq_len, head_size)"
        )
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, seq_len and head_size"
        )
    if cos.shape != sin.shape or cos.dim() != 2:
        raise ValueError(f"{op}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be (seq_len, rotary_dims)")
    T, hs, r = q.shape[2], q.shape[3], cos.shape[1]
    if cos.shape[0] != T:
        raise ValueError(f"{op}: cos/sin cover {cos.shape[0]} positions but q and k have seq_len {T}")
    if r == 0 or r % 2 or r > hs:
        raise ValueError(f"{op}: rotary_dims={r} (cos.shape[-1]) must be even and in [2, head_size={hs}]")
    if q.dtype != k.dtype:
        raise ValueError(f"{op}: q ({q.dtype}) and k ({k.dtype}) must have the same dtype")
    check_same_device(op, q=q, k=k, cos=cos, sin=sin)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary embeddings to ``q`` and ``k``; returns new tensors ``(q_out, k_out)``."""
    _check(q, k, cos, sin)
    if use_triton(q):
        return RoPEFunction.apply(q, k, cos, sin)
    return rope_torch(q, k, cos, sin)
