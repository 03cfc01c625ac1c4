"""Rotary position embedding (rotate-half / GPT-NeoX layout) on q and k at once.

For the first ``r`` dims of each head (``r = cos.shape[-1] <= head_size``, even), with
``x1 = x[..., :r/2]`` and ``x2 = x[..., r/2:r]``:

    out[..., :r] = x[..., :r] * cos + cat(-x2, x1) * sin
    out[..., r:] = x[..., r:]                          (partial rotary passes the rest through)

q is (B, n_head, T, hs), k is (B, n_kv, T, hs) with n_kv dividing n_head or not (any count works);
cos and sin are (T, r). The two halves of cos (and of sin) need not be equal: with c1, c2 = cos[:, :r/2],
cos[:, r/2:] and s1, s2 likewise, the forward is

    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2

and its backward (the transpose of that linear map: the inverse rotation when the halves are equal) is

    dx1 = dy1 * c1 + dy2 * s2
    dx2 = dy2 * c2 - dy1 * s1

while the pass-through dims copy the gradient. cos and sin are buffers: the Triton path gives them no
gradient (it raises if they require one rather than silently dropping it).

Triton path: one program per (batch, position) row handles every head of q and then of k (one launch for
both), loading cos/sin for its position once. q and k are read through all four strides (they are usually
transposed views of a projection's output); nothing is copied. The outputs (and the gradients of q and k) are
new tensors laid out in memory as (B, T, heads, hs) and returned as the (B, heads, T, hs) view, the layout
q and k come in from ``linear(x).view(B, T, nh, hs).transpose(1, 2)`` and the one flash attention reads and
writes: each program's loads and stores are then contiguous, and the transpose back to (B, T, nh * hs) is free.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_float, check_same_device, compute_dtype
from ._launch import launch
from .backend import dispatch


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


@triton.jit
def _rope_heads(
    x_ptr,
    y_ptr,
    x_base,
    y_base,
    sx_h,
    sx_d,
    sy_h,
    sy_d,
    c1,
    c2,
    s1,
    s2,
    N_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """Rotate (or, with BACKWARD, inverse-rotate) the first 2*HALF dims of N_HEADS heads of one (b, t) row.

    ``x_base``/``y_base`` point at head 0, dim 0 of the row; c1, c2, s1, s2 are fp32 (1, BLOCK_HALF) rows.
    Dims 2*HALF..HEAD_SIZE are copied unchanged (partial rotary).
    """
    d = tl.arange(0, BLOCK_HALF)[None, :]
    for h0 in range(0, N_HEADS, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[:, None]
        mask = (h < N_HEADS) & (d < HALF)
        x1_ptrs = x_ptr + x_base + h * sx_h + d * sx_d
        y1_ptrs = y_ptr + y_base + h * sy_h + d * sy_d
        x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x1_ptrs + HALF * sx_d, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(y1_ptrs, y1.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y1_ptrs + HALF * sy_d, y2.to(y_ptr.dtype.element_ty), mask=mask)
        # Partial rotary: the tail of each head passes through (its gradient too).
        for p0 in range(2 * HALF, HEAD_SIZE, BLOCK_PASS):
            p = p0 + tl.arange(0, BLOCK_PASS)[None, :]
            pmask = (h < N_HEADS) & (p < HEAD_SIZE)
            v = tl.load(x_ptr + x_base + h * sx_h + p * sx_d, mask=pmask, other=0.0)
            tl.store(y_ptr + y_base + h * sy_h + p * sy_d, v.to(y_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    cos_ptr,
    sin_ptr,
    sq_b,
    sq_h,
    sq_t,
    sq_d,
    sk_b,
    sk_h,
    sk_t,
    sk_d,
    sqo_b,
    sqo_h,
    sqo_t,
    sqo_d,
    sko_b,
    sko_h,
    sko_t,
    sko_d,
    sc_t,
    sc_d,
    ss_t,
    ss_d,
    seq_len,
    N_QH: tl.constexpr,
    N_KH: tl.constexpr,
    HALF: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """One program per (b, t): rotate all q heads, then all k heads, with cos/sin of position t loaded once.

    Forward (BACKWARD=False) reads q/k and writes q_out/k_out; backward reads dq_out/dk_out through the q/k
    pointers and writes dq/dk. Row offsets are int64: B * T * heads * hs can exceed 2**31.
    """
    pid = tl.program_id(0)
    b = tl.cast(pid // seq_len, tl.int64)
    t = tl.cast(pid % seq_len, tl.int64)

    d = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = d < HALF
    c1 = tl.load(cos_ptr + t * sc_t + d * sc_d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * sc_t + (d + HALF) * sc_d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * ss_t + d * ss_d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * ss_t + (d + HALF) * ss_d, mask=dmask, other=0.0).to(tl.float32)

    _rope_heads(
        q_ptr,
        qo_ptr,
        b * sq_b + t * sq_t,
        b * sqo_b + t * sqo_t,
        sq_h,
        sq_d,
        sqo_h,
        sqo_d,
        c1,
        c2,
        s1,
        s2,
        N_QH,
        HALF,
        HEAD_SIZE,
        BLOCK_QH,
        BLOCK_HALF,
        BLOCK_PASS,
        BACKWARD,
    )
    _rope_heads(
        k_ptr,
        ko_ptr,
        b * sk_b + t * sk_t,
        b * sko_b + t * sko_t,
        sk_h,
        sk_d,
        sko_h,
        sko_d,
        c1,
        c2,
        s1,
        s2,
        N_KH,
        HALF,
        HEAD_SIZE,
        BLOCK_KH,
        BLOCK_HALF,
        BLOCK_PASS,
        BACKWARD,
    )


# Elements per (heads x dims) tile a program keeps live per half; bounds registers for many-head models.
_MAX_TILE = 2048
# Pass-through dims copied per inner step (partial rotary tails are walked in blocks of this).
_MAX_PASS_BLOCK = 64


def _empty_bthd(like: torch.Tensor) -> torch.Tensor:
    """A new (B, heads, T, hs) tensor stored as (B, T, heads, hs): see the module docstring for why."""
    B, nh, T, hs = like.shape
    return torch.empty(B, T, nh, hs, dtype=like.dtype, device=like.device).transpose(1, 2)


def _rope_launch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :func:`_rope_kernel` on (q, k) (forward) or on (dq_out, dk_out) (``backward=True``)."""
    B, n_qh, T, hs = q.shape
    n_kh = k.shape[1]
    half = cos.shape[1] // 2
    q_out, k_out = _empty_bthd(q), _empty_bthd(k)
    if B * T == 0:
        return q_out, k_out
    block_half = triton.next_power_of_2(half)
    block_pass = min(triton.next_power_of_2(max(1, hs - 2 * half)), _MAX_PASS_BLOCK)
    width = max(block_half, block_pass if hs > 2 * half else 1)
    max_heads = max(1, _MAX_TILE // width)
    block_qh = min(triton.next_power_of_2(max(1, n_qh)), max_heads)
    block_kh = min(triton.next_power_of_2(max(1, n_kh)), max_heads)
    num_warps = 8 if block_qh * width >= 1024 else 4
    launch(
        _rope_kernel,
        (B * T,),
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        *q.stride(),
        *k.stride(),
        *q_out.stride(),
        *k_out.stride(),
        *cos.stride(),
        *sin.stride(),
        T,
        N_QH=n_qh,
        N_KH=n_kh,
        HALF=half,
        HEAD_SIZE=hs,
        BLOCK_QH=block_qh,
        BLOCK_KH=block_kh,
        BLOCK_HALF=block_half,
        BLOCK_PASS=block_pass,
        BACKWARD=backward,
        num_warps=num_warps,
    )
    return q_out, k_out


_NO_TABLE_GRAD = (
    "rope: the Triton kernel does not differentiate with respect to cos/sin (rotary caches are "
    "buffers); pass cos.detach() and sin.detach(), or use the torch backend"
)


class RoPEFunction(torch.autograd.Function):
    """Autograd wrapper of the rotary kernel: saves only cos and sin; the backward is the transposed rotation."""

    @staticmethod
    def forward(
        ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            raise ValueError(_NO_TABLE_GRAD)
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        # Autograd runs a backward with grad mode on exactly when create_graph=True. The kernel's backward builds
        # no graph, so a higher-order gradient would be silently wrong: refuse it instead.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "rope: the Triton backward cannot be differentiated again (create_graph=True); "
                "use the torch backend (use_backend('torch')) for higher-order gradients"
            )
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_launch(dq_out, dk_out, cos, sin, backward=True)
        return dq, dk, None, None


# ---------------------------------------------------------------------------------------------------------------------
# Custom op: the Triton path as torch.compile sees it (see litliger/kernels/_custom_ops.py)
# ---------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("litliger::rope", mutates_args=())
def _rope_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation (or with ``backward`` its transpose) of q and k, outputs laid out as (B, T, heads, hs)."""
    return _rope_launch(q, k, cos, sin, backward)


@_rope_op.register_fake
def _(q, k, cos, sin, backward):
    return _empty_bthd(q), _empty_bthd(k)


def _rope_setup(ctx, inputs, output) -> None:
    _, _, cos, sin, _ = inputs
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope_op(dq_out, dk_out, cos, sin, True)
    return dq, dk, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


def _rope_compiled(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(_NO_TABLE_GRAD)  # as RoPEFunction.forward does in eager
    return _rope_op(q, k, cos, sin, False)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    op = "rope"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, t, op)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must be 4-D (batch, heads, seq_len, head_size)"
        )
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, seq_len and head_size")
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


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary embeddings to ``q`` and ``k``; returns new tensors ``(q_out, k_out)``."""
    _check(q, k, cos, sin)
    return dispatch((q, k, cos, sin), triton=RoPEFunction.apply, compiled=_rope_compiled, twin=rope_torch)
