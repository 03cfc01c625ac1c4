"""RMSNorm and fused residual-add + RMSNorm.

    y = x * rsqrt(mean(x^2) + eps) * (offset + w)        offset = 0 (Llama), 1 (Gemma's (1 + w))
    s = x + residual;  y = rms_norm(s)                   (add_rms_norm)

Backward (w_eff = offset + w, rstd = 1 / sqrt(mean(x^2) + eps), g = dy * w_eff, N = hidden size):

    dx = rstd * (g - x * rstd^2 * sum(g * x) / N)        dw = sum over rows of dy * x * rstd

For add_rms_norm the same dx is taken with respect to s, plus s's own incoming gradient, and is the gradient of
both x and residual. Kernel and twin normalise s as returned (the fp32 sum rounded once to x.dtype, as a model
that adds its residual in bf16 does), so y is exactly rms_norm of the returned s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_float, check_same_device, check_same_shape, check_vector
from ._launch import as_rows, bwd_programs, launch, tile_settings
from .backend import dispatch
from .rms_norm_twin import add_rms_norm_torch, rms_norm_torch

# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Both kernels work on tiles of BLOCK_M rows x BLOCK_N columns. Narrow rows (qk-norm over a 128-wide head, say) pack
# several rows into one tile so a program does a useful amount of work; a row wider than BLOCK_N is walked in column
# blocks (the `else` branches), which costs a second read of the row but keeps registers bounded.
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(X, R, S, rows, cols, mask, x_row_stride, r_row_stride, HAS_RESIDUAL: tl.constexpr):
    """The tile to normalise, as fp32: x, or s = x + residual rounded to s's dtype.

    s is normalised as stored (the add in fp32, then one rounding to x.dtype, as a model that adds its residual
    in bf16 does): y is then exactly rms_norm of the returned s, and the backward, which reads s back,
    differentiates the function that was computed.
    """
    s = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(R + rows[:, None] * r_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = s.to(S.dtype.element_ty).to(tl.float32)
    return s


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    R,
    S,
    Y,
    W,
    RSTD,
    x_row_stride,
    r_row_stride,
    s_row_stride,
    y_row_stride,
    n_rows,
    eps,
    offset,
    N_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    """One tile of rows: s = x (+ r), rstd = 1 / sqrt(mean(s^2) + eps), y = s * rstd * (offset + w).

    Stores y (and s when HAS_RESIDUAL) in their tensors' dtypes and rstd in fp32 for the backward.
    """
    # int64 row indices: rows * row_stride overflows int32 on activations of more than 2^31 elements.
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    if N_COLS <= BLOCK_N:
        # The whole row fits one block: read it once and keep it in registers.
        col_mask = cols < N_COLS
        mask = row_mask[:, None] & col_mask[None, :]
        s = _load_rows(X, R, S, rows, cols, mask, x_row_stride, r_row_stride, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            s_ptrs = S + rows[:, None] * s_row_stride + cols[None, :]
            tl.store(s_ptrs, s.to(S.dtype.element_ty), mask=mask)
        rstd = tl.rsqrt(tl.sum(s * s, axis=1) / N_COLS + eps)
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
        y = s * rstd[:, None] * w[None, :]
        tl.store(Y + rows[:, None] * y_row_stride + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: sum of squares block by block (and s stored); pass 2: re-read, normalise, store y.
        # Pass 2 recomputes s from x and r rather than reading it back, so it never depends on another
        # thread's store being visible.
        sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for off in range(0, N_COLS, BLOCK_N):
            c = off + cols
            mask = row_mask[:, None] & (c < N_COLS)[None, :]
            s = _load_rows(X, R, S, rows, c, mask, x_row_stride, r_row_stride, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(S + rows[:, None] * s_row_stride + c[None, :], s.to(S.dtype.element_ty), mask=mask)
            sum_sq += tl.sum(s * s, axis=1)
        rstd = tl.rsqrt(sum_sq / N_COLS + eps)
        for off in range(0, N_COLS, BLOCK_N):
            c = off + cols
            col_mask = c < N_COLS
            mask = row_mask[:, None] & col_mask[None, :]
            s = _load_rows(X, R, S, rows, c, mask, x_row_stride, r_row_stride, HAS_RESIDUAL)
            w = tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32) + offset
            y = s * rstd[:, None] * w[None, :]
            tl.store(Y + rows[:, None] * y_row_stride + c[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    S,
    W,
    RSTD,
    DS,
    DX,
    DW,
    dy_row_stride,
    s_row_stride,
    ds_row_stride,
    dx_row_stride,
    n_rows,
    n_tiles,
    tiles_per_program,
    offset,
    N_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DS: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    """Backward of y = s * rstd * w_eff (w_eff = offset + w) over a contiguous run of row tiles.

        g   = dy * w_eff
        ds  = rstd * (g - s * rstd^2 * mean(g * s))   (+ the incoming gradient of s when HAS_DS)
        dw  = sum over rows of dy * s * rstd          (this program's rows, fp32, into DW[pid, :])

    S is the normalised input (x for rms_norm, x + residual for add_rms_norm).
    """
    pid = tl.program_id(0)
    tile_start = pid * tiles_per_program
    tile_end = tl.minimum(tile_start + tiles_per_program, n_tiles)
    cols = tl.arange(0, BLOCK_N)
    if N_COLS <= BLOCK_N:
        col_mask = cols < N_COLS
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
        # dw stays in registers across this program's tiles; rows are folded once at the end.
        dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for tile in range(tile_start, tile_end):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            dy = tl.load(DY + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = tl.load(S + rows[:, None] * s_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            g = dy * w[None, :]
            mean_gs = tl.sum(g * s, axis=1) / N_COLS
            ds = rstd[:, None] * (g - s * (rstd * rstd * mean_gs)[:, None])
            if HAS_DS:
                ds_ptrs = DS + rows[:, None] * ds_row_stride + cols[None, :]
                ds += tl.load(ds_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows[:, None] * dx_row_stride + cols[None, :], ds.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw += dy * s * rstd[:, None]
        if COMPUTE_DW:
            tl.store(DW + pid * N_COLS + cols, tl.sum(dw, axis=0), mask=col_mask)
    else:
        for tile in range(tile_start, tile_end):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_mask = rows < n_rows
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            # Pass 1: mean(g * s) over the whole row.
            sum_gs = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for off in range(0, N_COLS, BLOCK_N):
                c = off + cols
                col_mask = c < N_COLS
                mask = row_mask[:, None] & col_mask[None, :]
                dy = tl.load(DY + rows[:, None] * dy_row_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
                s = tl.load(S + rows[:, None] * s_row_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32) + offset
                sum_gs += tl.sum(dy * w[None, :] * s, axis=1)
            scale = rstd * rstd * sum_gs / N_COLS
            # Pass 2: ds block by block; dw accumulates into this program's own row of the fp32 DW buffer
            # (zero-initialised, touched by no other program; load and store use the same layout, so each
            # element is read and written by the same thread).
            for off in range(0, N_COLS, BLOCK_N):
                c = off + cols
                col_mask = c < N_COLS
                mask = row_mask[:, None] & col_mask[None, :]
                dy = tl.load(DY + rows[:, None] * dy_row_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
                s = tl.load(S + rows[:, None] * s_row_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32) + offset
                ds = rstd[:, None] * (dy * w[None, :] - s * scale[:, None])
                if HAS_DS:
                    ds_ptrs = DS + rows[:, None] * ds_row_stride + c[None, :]
                    ds += tl.load(ds_ptrs, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + rows[:, None] * dx_row_stride + c[None, :], ds.to(DX.dtype.element_ty), mask=mask)
                if COMPUTE_DW:
                    dw_ptrs = DW + pid * N_COLS + c
                    dw = tl.load(dw_ptrs, mask=col_mask, other=0.0) + tl.sum(dy * s * rstd[:, None], axis=0)
                    tl.store(dw_ptrs, dw, mask=col_mask)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------

# Widest column block a program holds in registers; wider rows loop over blocks. 8192 keeps the backward's four
# live fp32 blocks (dy, s, w, dw) under the register budget at 16 warps. Tests shrink it to exercise the loop.
_MAX_BLOCK = 8192
# Narrow rows are packed into tiles (of _launch._TILE_ELEMENTS elements) of at most this many rows.
_MAX_ROWS_PER_TILE = 16
# Programs of the backward per SM on CUDA (each loops over its share of the rows and owns one row of the dw
# partial-sum buffer), and in total on the CPU interpreter, where programs run one after another anyway.
_BWD_PROGRAMS_PER_SM = 4
_CPU_BWD_PROGRAMS = 2


def rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward. Returns ``(y, s, rstd)`` with y, s as ``(rows, H)`` in x.dtype (s None without residual)."""
    x2 = as_rows(x)
    r2 = as_rows(residual) if residual is not None else None
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, s, rstd
    block_m, block_n, num_warps = tile_settings(n_cols, _MAX_BLOCK, _MAX_ROWS_PER_TILE)
    launch(
        _rms_norm_fwd_kernel,
        (triton.cdiv(n_rows, block_m),),
        x2,
        x2 if r2 is None else r2,  # unused pointers (HAS_RESIDUAL=False) get any valid tensor
        y if s is None else s,
        y,
        weight.contiguous(),  # (H,): a copy only if strided, and tiny
        rstd,
        x2.stride(0),
        0 if r2 is None else r2.stride(0),
        y.stride(0) if s is None else s.stride(0),
        y.stride(0),
        n_rows,
        eps,
        offset,
        N_COLS=n_cols,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_RESIDUAL=residual is not None,
        num_warps=num_warps,
    )
    return y, s, rstd


def rms_norm_bwd(
    dy: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    ds_in: torch.Tensor | None,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the backward on ``(rows, H)`` matrices. Returns ``(ds, dweight)``: ds in s.dtype (including ``ds_in``
    when given), dweight in weight.dtype or None when not ``compute_dw``."""
    dy = as_rows(dy)
    ds_in = as_rows(ds_in) if ds_in is not None else None
    n_rows, n_cols = s.shape
    dx = torch.empty((n_rows, n_cols), dtype=s.dtype, device=s.device)
    if n_rows == 0:
        return dx, torch.zeros_like(weight) if compute_dw else None
    block_m, block_n, num_warps = tile_settings(n_cols, _MAX_BLOCK, _MAX_ROWS_PER_TILE)
    n_tiles = triton.cdiv(n_rows, block_m)
    programs, tiles_per_program = bwd_programs(s.device, n_tiles, _BWD_PROGRAMS_PER_SM, _CPU_BWD_PROGRAMS)
    # fp32 per-program partial sums of dw; the column-loop path accumulates into it, so it must start at zero.
    alloc = torch.empty if n_cols <= block_n else torch.zeros
    dw_partial = alloc((programs, n_cols), dtype=torch.float32, device=s.device) if compute_dw else None
    launch(
        _rms_norm_bwd_kernel,
        (programs,),
        dy,
        s,
        weight.contiguous(),
        rstd,
        dy if ds_in is None else ds_in,  # unused pointers get any valid tensor
        dx,
        rstd if dw_partial is None else dw_partial,
        dy.stride(0),
        s.stride(0),
        0 if ds_in is None else ds_in.stride(0),
        dx.stride(0),
        n_rows,
        n_tiles,
        tiles_per_program,
        offset,
        N_COLS=n_cols,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_DS=ds_in is not None,
        COMPUTE_DW=compute_dw,
        num_warps=num_warps,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if dw_partial is not None else None
    return dx, dw


# ---------------------------------------------------------------------------------------------------------------------
# Autograd Functions
# ---------------------------------------------------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    """y = rms_norm(x, weight, eps, offset); saves x (as rows), weight and the per-row fp32 rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        x2 = as_rows(x)
        y, _, rstd = rms_norm_fwd(x2, None, weight, eps, offset)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = offset
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None, None]:
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x2, weight, rstd, ctx.offset, None, ctx.needs_input_grad[1])
        return dx.view(dy.shape), dw, None, None


class AddRMSNormFunction(torch.autograd.Function):
    """(y, s) = add_rms_norm(x, residual, weight, eps, offset); saves s (an output, so no extra memory), weight
    and rstd.

    Both outputs are differentiable. The gradient reaching s is its own incoming gradient (from s's other uses)
    plus the RMSNorm backward through y; x and residual both receive exactly that sum.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, s, rstd = rms_norm_fwd(x, residual, weight, eps, offset)
        y, s = y.view(x.shape), s.view(x.shape)
        ctx.save_for_backward(s, weight, rstd)
        ctx.offset = offset
        # An unused output's gradient arrives as None instead of a materialised zeros tensor.
        ctx.set_materialize_grads(False)
        return y, s

    @staticmethod
    def backward(
        ctx, dy: torch.Tensor | None, ds: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        s, weight, rstd = ctx.saved_tensors
        if dy is None:
            # Only s was used downstream: the add passes its gradient straight through; weight got none.
            return ds, ds, None, None, None
        dx, dw = rms_norm_bwd(dy, s.view(-1, s.shape[-1]), weight, rstd, ctx.offset, ds, ctx.needs_input_grad[2])
        dx = dx.view(s.shape)
        return dx, dx, dw, None, None


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops: the Triton path as torch.compile sees it (litliger/kernels/_custom_ops.py says why eager skips them)
# ---------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("litliger::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, s, rstd)``; s is empty without a residual."""
    y, s, rstd = rms_norm_fwd(x, residual, weight, eps, offset)
    return y.view(x.shape), x.new_empty(0) if s is None else s.view(x.shape), rstd


@_rms_norm_op.register_fake
def _(x, residual, weight, eps, offset):
    rows = x.numel() // x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(0 if residual is None else x.shape), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("litliger::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    dy: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    ds: torch.Tensor | None,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)``; dweight is empty unless ``compute_dw``."""
    dx, dw = rms_norm_bwd(dy, as_rows(s), weight, rstd, offset, ds, compute_dw)
    return dx.view(s.shape), weight.new_empty(0) if dw is None else dw


@_rms_norm_bwd_op.register_fake
def _(dy, s, weight, rstd, offset, ds, compute_dw):
    return s.new_empty(s.shape), weight.new_empty(weight.shape if compute_dw else 0)


def _rms_norm_setup(ctx, inputs, output) -> None:
    x, residual, weight, _, offset = inputs
    _, s, rstd = output
    ctx.save_for_backward(x if residual is None else s, weight, rstd)
    ctx.offset, ctx.has_residual = offset, residual is not None


def _rms_norm_backward(ctx, dy, ds, _drstd):
    saved, weight, rstd = ctx.saved_tensors
    ds = ds if ctx.has_residual else None
    if dy is None:  # only s was used: the add passes its gradient through
        return ds, ds, None, None, None
    dx, dw = _rms_norm_bwd_op(dy, saved, weight, rstd, ctx.offset, ds, ctx.needs_input_grad[2])
    dw = dw if ctx.needs_input_grad[2] else None
    return dx, dx if ctx.has_residual else None, dw, None, None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def _check(op: str, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    check_float("x", x, op)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_vector(op, "weight", weight, x.shape[-1], "x")
    if residual is not None:
        check_float("residual", residual, op)
        check_same_shape(op, "x", x, "residual", residual)
    check_same_device(op, x=x, weight=weight, residual=residual)


def _rms_norm_compiled(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    return _rms_norm_op(x, None, weight, eps, offset)[0]


def _add_rms_norm_compiled(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y, s, _ = _rms_norm_op(x, residual, weight, eps, offset)
    return y, s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """RMS-normalise the last dimension of ``x`` and scale by ``offset + weight``."""
    _check("rms_norm", x, weight)
    return dispatch(
        (x, weight, eps, offset), triton=RMSNormFunction.apply, compiled=_rms_norm_compiled, twin=rms_norm_torch
    )


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` and ``rms_norm(s)`` in one pass; returns ``(y, s)``."""
    _check("add_rms_norm", x, weight, residual)
    return dispatch(
        (x, residual, weight, eps, offset),
        triton=AddRMSNormFunction.apply,
        compiled=_add_rms_norm_compiled,
        twin=add_rms_norm_torch,
    )
