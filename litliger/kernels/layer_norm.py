"""LayerNorm: y = (x - mean(x)) * rsqrt(var(x) + eps) * w + b  (biased variance, as torch.nn.LayerNorm).

Backward (xhat = (x - mean) * rstd, g = dy * w, means over the hidden size):

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))     dw = sum over rows of dy * xhat     db = sum over rows of dy
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._checks import check_float, check_same_device, check_vector, compute_dtype
from ._launch import as_rows, bwd_programs, launch, tile_settings
from .backend import dispatch


def layer_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`layer_norm`: fp32 math (fp64 for fp64 input), output in ``x.dtype``."""
    dt = compute_dtype(x, weight, bias)
    b = None if bias is None else bias.to(dt)
    return F.layer_norm(x.to(dt), (x.shape[-1],), weight.to(dt), b, eps).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels (tiles of BLOCK_M rows x BLOCK_N columns, as in rms_norm.py: narrow rows are packed several to a
# tile, rows wider than BLOCK_N are walked in column blocks by the `else` branches)
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_fwd_kernel(
    X,
    Y,
    W,
    B,
    MEAN,
    RSTD,
    x_row_stride,
    y_row_stride,
    n_rows,
    eps,
    N_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """One tile of rows: mean, rstd = 1 / sqrt(mean((x - mean)^2) + eps), y = (x - mean) * rstd * w + b.

    The variance is taken around the mean (two passes over the data), not as E[x^2] - mean^2, which cancels
    catastrophically for rows with a large mean. mean and rstd are stored in fp32 for the backward.
    """
    # int64 row indices: rows * row_stride overflows int32 on activations of more than 2^31 elements.
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    if N_COLS <= BLOCK_N:
        # The whole row fits one block: read it once and keep it in registers.
        col_mask = cols < N_COLS
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N_COLS
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N_COLS + eps)
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * y_row_stride + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: mean; pass 2: variance around it; pass 3: normalise and store (re-reads hit L2 mostly).
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for off in range(0, N_COLS, BLOCK_N):
            c = off + cols
            mask = row_mask[:, None] & (c < N_COLS)[None, :]
            x = tl.load(X + rows[:, None] * x_row_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(x, axis=1)
        mean = acc / N_COLS
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for off in range(0, N_COLS, BLOCK_N):
            c = off + cols
            mask = row_mask[:, None] & (c < N_COLS)[None, :]
            x = tl.load(X + rows[:, None] * x_row_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean[:, None], 0.0)
            acc += tl.sum(xc * xc, axis=1)
        rstd = tl.rsqrt(acc / N_COLS + eps)
        for off in range(0, N_COLS, BLOCK_N):
            c = off + cols
            col_mask = c < N_COLS
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(X + rows[:, None] * x_row_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None] * w[None, :]
            if HAS_BIAS:
                y += tl.load(B + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + rows[:, None] * y_row_stride + c[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,
    X,
    W,
    MEAN,
    RSTD,
    DX,
    DW,
    DB,
    dy_row_stride,
    x_row_stride,
    dx_row_stride,
    n_rows,
    n_tiles,
    tiles_per_program,
    N_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
):
    """Backward of y = xhat * w + b, xhat = (x - mean) * rstd, over a contiguous run of row tiles.

    g  = dy * w
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dw = sum over rows of dy * xhat,   db = sum over rows of dy   (fp32, this program's rows, into DW/DB[pid, :])
    """
    pid = tl.program_id(0)
    tile_start = pid * tiles_per_program
    tile_end = tl.minimum(tile_start + tiles_per_program, n_tiles)
    cols = tl.arange(0, BLOCK_N)
    if N_COLS <= BLOCK_N:
        col_mask = cols < N_COLS
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        # dw, db stay in registers across this program's tiles; rows are folded once at the end.
        dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for tile in range(tile_start, tile_end):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            dy = tl.load(DY + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            g = dy * w[None, :]
            mean_g = tl.sum(g, axis=1) / N_COLS
            mean_gx = tl.sum(g * xhat, axis=1) / N_COLS
            dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
            tl.store(DX + rows[:, None] * dx_row_stride + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw += dy * xhat
            if COMPUTE_DB:
                db += dy
        if COMPUTE_DW:
            tl.store(DW + pid * N_COLS + cols, tl.sum(dw, axis=0), mask=col_mask)
        if COMPUTE_DB:
            tl.store(DB + pid * N_COLS + cols, tl.sum(db, axis=0), mask=col_mask)
    else:
        for tile in range(tile_start, tile_end):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_mask = rows < n_rows
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            # Pass 1: mean(g) and mean(g * xhat) over the whole row.
            sum_g = tl.zeros((BLOCK_M,), dtype=tl.float32)
            sum_gx = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for off in range(0, N_COLS, BLOCK_N):
                c = off + cols
                col_mask = c < N_COLS
                mask = row_mask[:, None] & col_mask[None, :]
                dy = tl.load(DY + rows[:, None] * dy_row_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + rows[:, None] * x_row_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
                g = dy * w[None, :]
                sum_g += tl.sum(g, axis=1)
                sum_gx += tl.sum(g * xhat, axis=1)
            mean_g = sum_g / N_COLS
            mean_gx = sum_gx / N_COLS
            # Pass 2: dx block by block; dw, db accumulate into this program's own rows of the zero-initialised
            # fp32 buffers (no other program touches them; load and store share one layout, so each element is
            # read and written by the same thread).
            for off in range(0, N_COLS, BLOCK_N):
                c = off + cols
                col_mask = c < N_COLS
                mask = row_mask[:, None] & col_mask[None, :]
                dy = tl.load(DY + rows[:, None] * dy_row_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + rows[:, None] * x_row_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
                dx = rstd[:, None] * (dy * w[None, :] - mean_g[:, None] - xhat * mean_gx[:, None])
                tl.store(DX + rows[:, None] * dx_row_stride + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
                if COMPUTE_DW:
                    dw_ptrs = DW + pid * N_COLS + c
                    tl.store(dw_ptrs, tl.load(dw_ptrs, mask=col_mask, other=0.0) + tl.sum(dy * xhat, 0), mask=col_mask)
                if COMPUTE_DB:
                    db_ptrs = DB + pid * N_COLS + c
                    tl.store(db_ptrs, tl.load(db_ptrs, mask=col_mask, other=0.0) + tl.sum(dy, 0), mask=col_mask)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------

# Widest column block a program holds in registers (wider rows loop over blocks; tests shrink it to exercise the
# loop), rows packed per tile for narrow rows, and backward programs per SM / on the CPU interpreter. See rms_norm.py.
_MAX_BLOCK = 8192
_MAX_ROWS_PER_TILE = 16
_BWD_PROGRAMS_PER_SM = 4
_CPU_BWD_PROGRAMS = 2


def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns ``(x2, y, mean, rstd)``: x as ``(rows, H)``, y in that shape and x.dtype."""
    x2 = as_rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return x2, y, mean, rstd
    block_m, block_n, num_warps = tile_settings(n_cols, _MAX_BLOCK, _MAX_ROWS_PER_TILE)
    weight = weight.contiguous()  # (H,): a copy only if strided, and tiny
    launch(
        _layer_norm_fwd_kernel,
        (triton.cdiv(n_rows, block_m),),
        x2,
        y,
        weight,
        weight if bias is None else bias.contiguous(),  # unused pointer (HAS_BIAS=False) gets any valid tensor
        mean,
        rstd,
        x2.stride(0),
        y.stride(0),
        n_rows,
        eps,
        N_COLS=n_cols,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_BIAS=bias is not None,
        num_warps=num_warps,
    )
    return x2, y, mean, rstd


def layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward on ``(rows, H)`` matrices. Returns ``(dx, dweight, dbias)``: dx in x.dtype, the parameter
    gradients in their parameters' dtypes, None where not asked for."""
    dy = as_rows(dy)
    n_rows, n_cols = x.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        dw = torch.zeros_like(weight) if compute_dw else None
        return dx, dw, torch.zeros_like(bias) if compute_db else None
    block_m, block_n, num_warps = tile_settings(n_cols, _MAX_BLOCK, _MAX_ROWS_PER_TILE)
    n_tiles = triton.cdiv(n_rows, block_m)
    programs, tiles_per_program = bwd_programs(x.device, n_tiles, _BWD_PROGRAMS_PER_SM, _CPU_BWD_PROGRAMS)
    # fp32 per-program partial sums; the column-loop path accumulates into them, so they must start at zero.
    alloc = torch.empty if n_cols <= block_n else torch.zeros
    dw_partial = alloc((programs, n_cols), dtype=torch.float32, device=x.device) if compute_dw else None
    db_partial = alloc((programs, n_cols), dtype=torch.float32, device=x.device) if compute_db else None
    launch(
        _layer_norm_bwd_kernel,
        (programs,),
        dy,
        x,
        weight.contiguous(),
        mean,
        rstd,
        dx,
        rstd if dw_partial is None else dw_partial,  # unused pointers get any valid tensor
        rstd if db_partial is None else db_partial,
        dy.stride(0),
        x.stride(0),
        dx.stride(0),
        n_rows,
        n_tiles,
        tiles_per_program,
        N_COLS=n_cols,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        COMPUTE_DW=compute_dw,
        COMPUTE_DB=compute_db,
        num_warps=num_warps,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if dw_partial is not None else None
    db = db_partial.sum(0).to(bias.dtype) if db_partial is not None else None
    return dx, dw, db


# ---------------------------------------------------------------------------------------------------------------------
# Autograd Function
# ---------------------------------------------------------------------------------------------------------------------


class LayerNormFunction(torch.autograd.Function):
    """y = layer_norm(x, weight, bias, eps); saves x, weight, bias and the per-row fp32 mean and rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        x2, y, mean, rstd = layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x2, weight, bias, mean, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, None]:
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        compute_db = bias is not None and ctx.needs_input_grad[2]
        dx, dw, db = layer_norm_bwd(dy, x2, weight, bias, mean, rstd, ctx.needs_input_grad[1], compute_db)
        return dx.view(dy.shape), dw, db, None


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops: the Triton path as torch.compile sees it (see litliger/kernels/_custom_ops.py)
# ---------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("litliger::layer_norm", mutates_args=())
def _layer_norm_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)``."""
    _, y, mean, rstd = layer_norm_fwd(x, weight, bias, eps)
    return y.view(x.shape), mean, rstd


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("litliger::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)``; a parameter gradient not asked for is empty."""
    dx, dw, db = layer_norm_bwd(dy, as_rows(x), weight, bias, mean, rstd, compute_dw, compute_db)
    return dx.view(x.shape), weight.new_empty(0) if dw is None else dw, weight.new_empty(0) if db is None else db


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, compute_dw, compute_db):
    db = bias.new_empty(bias.shape) if compute_db else weight.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape if compute_dw else 0), db


def _layer_norm_setup(ctx, inputs, output) -> None:
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    compute_dw, compute_db = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
    dx, dw, db = _layer_norm_bwd_op(dy, x, weight, bias, mean, rstd, compute_dw, compute_db)
    return dx, dw if compute_dw else None, db if compute_db else None, None


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def _layer_norm_compiled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _layer_norm_op(x, weight, bias, eps)[0]


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x``; ``bias`` may be None."""
    op = "layer_norm"
    check_float("x", x, op)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_vector(op, "weight", weight, x.shape[-1], "x")
    check_vector(op, "bias", bias, x.shape[-1], "x")
    check_same_device(op, x=x, weight=weight, bias=bias)
    return dispatch(
        (x, weight, bias, eps), triton=LayerNormFunction.apply, compiled=_layer_norm_compiled, twin=layer_norm_torch
    )
