"""Gated linear units: swiglu(gate, up) = silu(gate) * up, geglu(gate, up) = gelu(gate) * up.

geglu's ``approximate`` is ``"tanh"`` (GPT-NeoX / Gemma's gelu_pytorch_tanh) or ``"none"`` (exact erf).

With y = act(gate) * up, the backward is d_up = dy * act(gate) and d_gate = dy * up * act'(gate), where

    silu(x)      = x * sigmoid(x)                       silu'      = s + x * s * (1 - s),  s = sigmoid(x)
    gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x * sigmoid(2u),   u = sqrt(2/pi) (x + 0.044715 x^3)
                                                        gelu_tanh' = S + x * S * (1 - S) * 2u',  S = sigmoid(2u)
    gelu(x)      = 0.5 x (1 + erf(x / sqrt(2)))         gelu'      = Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi)

The kernels evaluate sigmoid (and with it tanh, as 2 sigmoid(2u) - 1) from exp(-|z|) <= 1, so nothing
overflows for large |gate|, and take 1 - sigmoid from the same two terms rather than by cancellation.
Exact erf is ``tl.math.erf`` (a Triton builtin, also run by the interpreter).

Triton path: elementwise kernels over a 1-D grid. Contiguous inputs are walked as one flat row of numel
elements; a (..., N) view with unit-stride rows (e.g. a chunk of a fused gate/up projection) is walked
as rows through its row stride without a copy. The forward saves gate and up (not the output); the
backward recomputes the activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._checks import check_float, check_same_device, check_same_shape, compute_dtype
from ._launch import as_rows, launch
from .backend import dispatch

GELU_APPROXIMATIONS = ("tanh", "none")


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`swiglu`: ``silu(gate) * up`` in fp32 (fp64 for fp64 inputs).

    A small autograd Function that keeps only ``gate`` and ``up`` for backward and recomputes the sigmoid
    there (one cheap pass), where autograd through ``F.silu(gate) * up`` also keeps ``silu(gate)``: a third
    (tokens x intermediate) tensor per MLP, the largest activation of a transformer block.
    """
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLUTwin.apply(gate, up)
    dt = compute_dtype(gate, up)
    return (F.silu(gate.to(dt)) * up.to(dt)).to(gate.dtype)


class _SwiGLUTwin(torch.autograd.Function):
    """``silu(g) * u``; backward ``du = dy silu(g)``, ``dg = dy u s (1 + g (1 - s))`` with ``s = sigmoid(g)``."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        dt = compute_dtype(gate, up)
        return (F.silu(gate.to(dt)) * up.to(dt)).to(gate.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        dt = compute_dtype(gate, up)
        g, u, d = gate.to(dt), up.to(dt), dy.to(dt)
        d_up = (d * F.silu(g)).to(up.dtype)
        # aten's fused silu backward: (d u) s (1 + g (1 - s)) in one pass (four passes fewer than spelling it out)
        d_gate = torch.ops.aten.silu_backward(d * u, g)
        return d_gate.to(gate.dtype), d_up


def geglu_torch(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """Plain-PyTorch twin of :func:`geglu`."""
    dt = compute_dtype(gate, up)
    return (F.gelu(gate.to(dt), approximate=approximate) * up.to(dt)).to(gate.dtype)


# Activation ids, compile-time constants of the kernels.
_SILU = tl.constexpr(0)
_GELU_TANH = tl.constexpr(1)
_GELU_ERF = tl.constexpr(2)
_GELU_IDS = {"tanh": _GELU_TANH.value, "none": _GELU_ERF.value}

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_CUBIC = tl.constexpr(0.044715)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

# Elements per program; 4 warps give each thread 8 contiguous elements (vectorised loads).
_BLOCK_SIZE = 1024
_NUM_WARPS = 4


@triton.jit
def _sigmoid_pair(z):
    """(sigmoid(z), 1 - sigmoid(z)) from e = exp(-|z|) in (0, 1]: no overflow, no cancellation."""
    e = tl.exp(-tl.abs(z))
    big = 1.0 / (1.0 + e)  # sigmoid(|z|)
    small = e * big  # sigmoid(-|z|)
    pos = z >= 0
    return tl.where(pos, big, small), tl.where(pos, small, big)


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr, DERIVATIVE: tl.constexpr):
    """(act(x), act'(x)) in fp32; act'(x) is 0 (not computed) unless DERIVATIVE."""
    if ACTIVATION == _SILU:
        s, one_minus_s = _sigmoid_pair(x)
        act = x * s
        if DERIVATIVE:
            dact = s + x * s * one_minus_s
    elif ACTIVATION == _GELU_TANH:
        x2 = x * x
        # 0.5 * (1 + tanh(u)) == sigmoid(2u). Tensors go on the left of each product: a constexpr on the left
        # would wrap the product in a constexpr (which the interpreter then rejects).
        s, one_minus_s = _sigmoid_pair(x * (1.0 + x2 * _GELU_CUBIC) * (2.0 * _SQRT_2_OVER_PI))
        act = x * s
        if DERIVATIVE:
            du = (x2 * (3.0 * _GELU_CUBIC) + 1.0) * (2.0 * _SQRT_2_OVER_PI)
            dact = s + (x * s * one_minus_s) * du
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT_2))
        act = x * cdf
        if DERIVATIVE:
            dact = cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    if not DERIVATIVE:
        dact = 0.0
    return act, dact


@triton.jit
def _glu_fwd_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    stride_gate,
    stride_up,
    stride_out,
    n_cols,
    n_col_blocks,
    ACTIVATION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """out = act(gate) * up for one BLOCK_SIZE slice of one row (program id = row * n_col_blocks + block)."""
    pid = tl.program_id(0)
    row = tl.cast(pid // n_col_blocks, tl.int64)
    cols = tl.cast(pid % n_col_blocks, tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation(g, ACTIVATION, False)
    tl.store(out_ptr + row * stride_out + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    dy_ptr,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    stride_dy,
    stride_gate,
    stride_up,
    stride_dgate,
    stride_dup,
    n_cols,
    n_col_blocks,
    ACTIVATION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """d_gate = dy * up * act'(gate), d_up = dy * act(gate), recomputing act from the saved gate."""
    pid = tl.program_id(0)
    row = tl.cast(pid // n_col_blocks, tl.int64)
    cols = tl.cast(pid % n_col_blocks, tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    act, dact = _activation(g, ACTIVATION, True)
    tl.store(dgate_ptr + row * stride_dgate + cols, (dy * u * dact).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + row * stride_dup + cols, (dy * act).to(dup_ptr.dtype.element_ty), mask=mask)


def _as_rows(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Same-shape tensors as (rows, n_cols) views for the kernels, and n_cols.

    All contiguous: one flat row of numel elements (full blocks regardless of the last dim's size).
    Otherwise rows of the last dim, each walked through its own row stride.
    """
    n_cols = tensors[0].numel() if all(t.is_contiguous() for t in tensors) else tensors[0].shape[-1]
    return [as_rows(t, n_cols) for t in tensors], n_cols


def _grid(rows: int, n_cols: int) -> tuple[int, int]:
    n_col_blocks = triton.cdiv(n_cols, _BLOCK_SIZE)
    return rows * n_col_blocks, n_col_blocks


def _glu_fwd(gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel() == 0:
        return out
    (g, u), n_cols = _as_rows(gate, up)
    o = out.view(-1, n_cols)
    n_programs, n_col_blocks = _grid(g.shape[0], n_cols)
    launch(
        _glu_fwd_kernel,
        (n_programs,),
        g,
        u,
        o,
        g.stride(0),
        u.stride(0),
        o.stride(0),
        n_cols,
        n_col_blocks,
        ACTIVATION=activation,
        BLOCK_SIZE=_BLOCK_SIZE,
        num_warps=_NUM_WARPS,
    )
    return out


def _glu_bwd(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: int, d_gate_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_gate, d_up)``; ``d_gate_out`` (e.g. ``dy`` itself: each element is read before it is written)
    receives d_gate instead of a new tensor."""
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if d_gate_out is None else d_gate_out
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if gate.numel() == 0:
        return dgate, dup
    (d, g, u), n_cols = _as_rows(dy, gate, up)
    dg, du = dgate.view(-1, n_cols), dup.view(-1, n_cols)
    n_programs, n_col_blocks = _grid(g.shape[0], n_cols)
    launch(
        _glu_bwd_kernel,
        (n_programs,),
        d,
        g,
        u,
        dg,
        du,
        d.stride(0),
        g.stride(0),
        u.stride(0),
        dg.stride(0),
        du.stride(0),
        n_cols,
        n_col_blocks,
        ACTIVATION=activation,
        BLOCK_SIZE=_BLOCK_SIZE,
        num_warps=_NUM_WARPS,
    )
    return dgate, dup


def _refuse_create_graph(op: str) -> None:
    """Raise if a backward runs under create_graph=True (autograd then runs it with grad mode on).

    The kernel's backward builds no graph, so a higher-order gradient would silently treat d_gate and d_up as
    constants; refusing is better than a wrong answer.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: the Triton backward cannot be differentiated again (create_graph=True); "
            "use the torch backend (use_backend('torch')) for higher-order gradients"
        )


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up; saves gate and up, recomputes silu in the backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return _glu_fwd(gate, up, _SILU.value)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _refuse_create_graph("swiglu")
        gate, up = ctx.saved_tensors
        return _glu_bwd(dy, gate, up, _SILU.value)


class GeGLUFunction(torch.autograd.Function):
    """gelu(gate) * up (tanh approximation or exact erf); saves gate and up, recomputes gelu in the backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
        ctx.activation = _GELU_IDS[approximate]
        ctx.save_for_backward(gate, up)
        return _glu_fwd(gate, up, ctx.activation)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        _refuse_create_graph("geglu")
        gate, up = ctx.saved_tensors
        dgate, dup = _glu_bwd(dy, gate, up, ctx.activation)
        return dgate, dup, None


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops: the Triton path as torch.compile sees it (see litliger/kernels/_custom_ops.py)
# ---------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("litliger::glu", mutates_args=())
def _glu_op(gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
    """``act(gate) * up`` with activation id ``activation`` (silu 0, gelu-tanh 1, gelu-erf 2)."""
    return _glu_fwd(gate, up, activation)


@_glu_op.register_fake
def _(gate, up, activation):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("litliger::glu_bwd", mutates_args=())
def _glu_bwd_op(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_gate, d_up)``."""
    return _glu_bwd(dy, gate, up, activation)


@_glu_bwd_op.register_fake
def _(dy, gate, up, activation):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _glu_setup(ctx, inputs, output) -> None:
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _glu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _glu_bwd_op(dy, gate, up, ctx.activation)
    return dgate, dup, None


_glu_op.register_autograd(_glu_backward, setup_context=_glu_setup)


def _swiglu_compiled(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _glu_op(gate, up, _SILU.value)


def _geglu_compiled(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    return _glu_op(gate, up, _GELU_IDS[approximate])


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
    return dispatch((gate, up), triton=SwiGLUFunction.apply, compiled=_swiglu_compiled, twin=swiglu_torch)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate) * up`` elementwise, with the tanh approximation or exact erf (``approximate="none"``)."""
    _check("geglu", gate, up)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"geglu: approximate={approximate!r}; choose one of {GELU_APPROXIMATIONS}")
    return dispatch((gate, up, approximate), triton=GeGLUFunction.apply, compiled=_geglu_compiled, twin=geglu_torch)
