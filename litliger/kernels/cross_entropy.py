"""Cross-entropy over a vocabulary, with ignore_index, label smoothing and z-loss.

Per row with logits x (V,), target t, lse = logsumexp(x), smoothing e and z-loss weight z:

    loss = (1 - e) * (lse - x[t]) + e * (lse - mean(x)) + z * lse^2        (0 for t == ignore_index)

Label smoothing matches ``torch.nn.functional.cross_entropy(label_smoothing=e)``; the z-loss term is
PaLM's auxiliary ``z * log(Z)^2``. ``reduction="mean"`` divides by the number of non-ignored rows and
gives 0 (not NaN, unlike PyTorch) when every row is ignored. Losses are fp32 (fp64 for fp64 input).
A row whose target is outside [0, V) and not ignore_index gets a NaN loss (CPU inputs raise instead).

Gradient (p = softmax(x), the same formula with or without label smoothing and z-loss):

    dloss/dx_j = (1 - e)(p_j - [j == t]) + e(p_j - 1/V) + 2 z lse p_j
               = p_j (1 + 2 z lse) - e/V - (1 - e)[j == t]                (0 for ignored rows)

Triton path. Forward is one online-softmax pass per row (running max m and rescaled sum d over the
vocabulary in blocks, lse = m + log d) that writes the fp32 row loss and lse. The gradient is not formed in
forward: backward re-reads the saved logits with the saved lse and writes ``dloss * dloss/dx`` into a new
buffer. Liger instead overwrites the logits with their gradient during forward, which saves that buffer but
is wrong whenever another op saved the logits for its own backward; given a separate buffer anyway, forming
it in backward costs one read of the logits in forward and a read + write in backward (Liger: two reads +
a write, then a read + write to scale by grad_output) and holds nothing but the logits between the passes.
``dloss`` is the incoming gradient (a scalar for "sum", divided by the device-side count of non-ignored rows
for "mean", one value per row for "none"), so no host sync is needed. The forward kernel can also write the gradient
in the same launch (``HAS_GRAD``): :mod:`litliger.kernels.fused_linear_cross_entropy` uses that in place on
its own logits chunks. A row with an out-of-range target gets a NaN loss and a zero gradient (as the twin),
and its target is never used as an address.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_float, check_loss_args, check_targets, compute_dtype
from ._launch import launch, row_settings
from .backend import dispatch
from .cross_entropy_twin import _reduce, cross_entropy_torch

# Widest vocabulary block one program holds in registers; wider rows are walked in blocks (Liger uses the same
# 32768 with 32 warps). Read at launch time so tests can shrink it to exercise the vocabulary loop.
# The vocabulary size V is a runtime argument (as in Liger), not a constexpr: every vocabulary of 16K-256K runs the
# same compiled kernel (one specialisation per dtype instead of one per model), and a memory-bound loop gains
# nothing from a constant trip count.
MAX_BLOCK = 32768


@triton.jit
def _ce_row_grad(
    x_row,
    g_row,
    t,
    lse,
    scale,
    label_smoothing,
    z_loss,
    live,
    V,
    BLOCK_SIZE: tl.constexpr,
):
    """Write ``scale * (p (1 + 2 z lse) - e/V - (1 - e)[j == t])`` over one row; zeros when not ``live``.

    ``g_row`` may be ``x_row`` (in place): each block is read before it is written, by this program only.
    A dead row (ignored or out-of-range target) never reads its logits: they may be garbage (padding).
    """
    p_coef = 1.0 + 2.0 * z_loss * lse
    for off in range(0, V, BLOCK_SIZE):
        cols = off + tl.arange(0, BLOCK_SIZE)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask & live, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * p_coef - label_smoothing / V
        g = tl.where(cols == t, g - (1.0 - label_smoothing), g)
        g = tl.where(live, g * scale, 0.0)
        tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_fwd_kernel(
    X_ptr,
    stride_x_outer,
    stride_x_row,
    rows_per_outer,
    G_ptr,
    stride_g_row,
    Y_ptr,
    stride_y,
    loss_ptr,
    lse_ptr,
    scale_ptr,
    stride_scale,
    ignore_index,
    label_smoothing,
    z_loss,
    V,
    BLOCK_SIZE: tl.constexpr,
    HAS_GRAD: tl.constexpr,
):
    """One program per row: loss and lse by online softmax; with ``HAS_GRAD`` also ``scale * dloss/dx``.

    Row r of the logits starts at ``(r // rows_per_outer) * stride_x_outer + (r % rows_per_outer) * stride_x_row``
    (a (B, T, V) slice such as ``logits[:, :-1]`` is read in place); columns are unit-stride.
    """
    row = tl.cast(tl.program_id(0), tl.int64)
    x_row = X_ptr + (row // rows_per_outer) * stride_x_outer + (row % rows_per_outer) * stride_x_row
    t = tl.cast(tl.load(Y_ptr + row * stride_y), tl.int64)
    ignored = t == ignore_index
    live = (t >= 0) & (t < V) & (t != ignore_index)

    # Pass 1: running max m and sum d of exp(x - m), rescaled whenever the max grows. m_safe keeps a block of
    # -inf logits (masked vocabulary) from turning d into NaN through exp(-inf - (-inf)).
    m = float("-inf")
    d = 0.0
    sum_x = 0.0
    for off in range(0, V, BLOCK_SIZE):
        cols = off + tl.arange(0, BLOCK_SIZE)
        mask = (cols < V) & live
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
        sum_x += tl.sum(tl.where(mask, x, 0.0), 0)
        m = m_new
    # A dead row (ignored or out-of-range target) read nothing: give it lse 0 rather than log(0).
    lse = tl.where(live, m, 0.0) + tl.log(tl.where(live, d, 1.0))

    x_t = tl.load(x_row + tl.where(live, t, 0), mask=live, other=0.0).to(tl.float32)
    loss = (1.0 - label_smoothing) * (lse - x_t) + label_smoothing * (lse - sum_x / V) + z_loss * lse * lse
    loss = tl.where(live, loss, tl.where(ignored, 0.0, float("nan")))
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if HAS_GRAD:
        scale = tl.cast(tl.load(scale_ptr + row * stride_scale), tl.float32)
        _ce_row_grad(x_row, G_ptr + row * stride_g_row, t, lse, scale, label_smoothing, z_loss, live, V, BLOCK_SIZE)


@triton.jit
def _cross_entropy_bwd_kernel(
    X_ptr,
    stride_x_outer,
    stride_x_row,
    rows_per_outer,
    G_ptr,
    stride_g_row,
    Y_ptr,
    stride_y,
    lse_ptr,
    dloss_ptr,
    stride_dloss,
    ignore_index,
    label_smoothing,
    z_loss,
    V,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row: ``G = dloss * dloss/dx`` from the logits and the lse saved by forward."""
    row = tl.cast(tl.program_id(0), tl.int64)
    x_row = X_ptr + (row // rows_per_outer) * stride_x_outer + (row % rows_per_outer) * stride_x_row
    t = tl.cast(tl.load(Y_ptr + row * stride_y), tl.int64)
    live = (t >= 0) & (t < V) & (t != ignore_index)
    lse = tl.load(lse_ptr + row)
    scale = tl.cast(tl.load(dloss_ptr + row * stride_dloss), tl.float32)
    _ce_row_grad(x_row, G_ptr + row * stride_g_row, t, lse, scale, label_smoothing, z_loss, live, V, BLOCK_SIZE)


def _row_layout(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``(tensor, outer stride, row stride, rows per outer)`` that address row r of ``logits`` (..., V).

    No copy for anything that flattens to rows as a view, nor for a 3-D slice such as ``logits[:, :-1]``.
    """
    vocab = logits.shape[-1]
    if vocab > 1 and logits.stride(-1) != 1:
        # The kernels read unit-stride vocabulary blocks; a strided last dim (a transposed view) is copied.
        logits = logits.contiguous()
    n_rows = logits.numel() // vocab
    try:
        flat = logits.view(n_rows, vocab)
        return logits, 0, flat.stride(0), max(1, n_rows)
    except RuntimeError:
        pass
    if logits.dim() == 3:
        return logits, logits.stride(0), logits.stride(1), logits.shape[1]
    # Deeper non-flattenable layouts are rare enough to copy (explicitly) rather than grow more strides.
    return logits.contiguous(), 0, vocab, max(1, n_rows)


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    grad: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> None:
    """Launch the forward kernel over the rows of ``logits`` (..., V): write ``loss`` and ``lse`` (rows,).

    With ``grad`` (a contiguous (rows, V) buffer, possibly ``logits`` itself) also write ``scale[r] * dloss/dx``
    into it; ``scale`` is a (rows,) tensor, typically an expanded scalar (stride 0).
    """
    n_rows = targets.numel()
    if n_rows == 0:
        return
    vocab = logits.shape[-1]
    x, stride_outer, stride_row, rows_per_outer = _row_layout(logits)
    block, warps = row_settings(vocab, MAX_BLOCK)
    has_grad = grad is not None
    if not has_grad:  # unused pointers: any valid tensor
        grad, scale = lse, lse
    launch(
        _cross_entropy_fwd_kernel,
        (n_rows,),
        x,
        stride_outer,
        stride_row,
        rows_per_outer,
        grad,
        grad.stride(0),
        targets,
        targets.stride(0),
        loss,
        lse,
        scale,
        scale.stride(0),
        ignore_index,
        label_smoothing,
        z_loss,
        vocab,
        BLOCK_SIZE=block,
        HAS_GRAD=has_grad,
        num_warps=warps,
    )


def cross_entropy_rows_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    dloss: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> None:
    """Launch the backward kernel: ``grad`` (rows, V), contiguous, possibly ``logits`` itself, gets
    ``dloss[r] * dloss/dx`` for every row from the saved ``lse``; ``dloss`` is (rows,), stride 0 for a scalar."""
    n_rows = targets.numel()
    if n_rows == 0:
        return
    vocab = logits.shape[-1]
    x, stride_outer, stride_row, rows_per_outer = _row_layout(logits)
    block, warps = row_settings(vocab, MAX_BLOCK)
    launch(
        _cross_entropy_bwd_kernel,
        (n_rows,),
        x,
        stride_outer,
        stride_row,
        rows_per_outer,
        grad,
        grad.stride(0),
        targets,
        targets.stride(0),
        lse,
        dloss,
        dloss.stride(0),
        ignore_index,
        label_smoothing,
        z_loss,
        vocab,
        BLOCK_SIZE=block,
        num_warps=warps,
    )


class CrossEntropyFunction(torch.autograd.Function):
    """Triton cross-entropy: loss rows in forward, the logits gradient in backward from the saved lse."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        z_loss: float,
    ) -> torch.Tensor:
        t = targets.reshape(-1)  # (rows,) integers: a copy here is cheap
        n_rows = t.numel()
        loss = torch.empty(n_rows, dtype=compute_dtype(logits), device=logits.device)
        lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        cross_entropy_rows(logits, t, loss, lse, ignore_index, label_smoothing, z_loss)
        valid = t != ignore_index
        ctx.save_for_backward(logits, t, lse, valid.sum())
        ctx.args = (ignore_index, reduction, label_smoothing, z_loss)
        return _reduce(loss.view(targets.shape), valid, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        logits, t, lse, n_valid = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, z_loss = ctx.args
        n_rows = t.numel()
        if reduction == "none":
            dloss = grad_output.reshape(-1)  # one value per row (often an expanded scalar: stride 0)
        elif reduction == "mean":
            dloss = (grad_output / n_valid.clamp(min=1)).reshape(1).expand(n_rows)  # on device: no sync
        else:
            dloss = grad_output.reshape(1).expand(n_rows)
        grad = torch.empty((n_rows, logits.shape[-1]), dtype=logits.dtype, device=logits.device)
        cross_entropy_rows_grad(logits, t, lse, dloss, grad, ignore_index, label_smoothing, z_loss)
        return grad.view(logits.shape), None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops: the Triton path as torch.compile sees it (see litliger/kernels/_custom_ops.py). The op gives per-row
# losses; the reduction is plain PyTorch around it, so autograd hands the backward op the per-row gradient.
# ---------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("litliger::cross_entropy", mutates_args=())
def _cross_entropy_op(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, lse)`` per row of ``logits`` (..., V) for flat ``targets`` (rows,)."""
    n_rows = targets.numel()
    loss = torch.empty(n_rows, dtype=compute_dtype(logits), device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    cross_entropy_rows(logits, targets, loss, lse, ignore_index, label_smoothing, z_loss)
    return loss, lse


@_cross_entropy_op.register_fake
def _(logits, targets, ignore_index, label_smoothing, z_loss):
    n_rows = targets.numel()
    return logits.new_empty(n_rows, dtype=compute_dtype(logits)), logits.new_empty(n_rows, dtype=torch.float32)


@torch.library.custom_op("litliger::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    dloss: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    """``dloss[r] * dloss/dlogits`` in the shape and dtype of ``logits``."""
    grad = torch.empty((targets.numel(), logits.shape[-1]), dtype=logits.dtype, device=logits.device)
    cross_entropy_rows_grad(logits, targets, lse, dloss, grad, ignore_index, label_smoothing, z_loss)
    return grad.view(logits.shape)


@_cross_entropy_bwd_op.register_fake
def _(logits, targets, lse, dloss, ignore_index, label_smoothing, z_loss):
    return logits.new_empty(logits.shape)


def _cross_entropy_setup(ctx, inputs, output) -> None:
    logits, targets, ignore_index, label_smoothing, z_loss = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.args = (ignore_index, label_smoothing, z_loss)


def _cross_entropy_backward(ctx, dloss, _dlse):
    logits, targets, lse = ctx.saved_tensors
    return _cross_entropy_bwd_op(logits, targets, lse, dloss, *ctx.args), None, None, None, None


_cross_entropy_op.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


def _cross_entropy_compiled(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    loss, _ = _cross_entropy_op(logits, targets.reshape(-1), ignore_index, label_smoothing, z_loss)
    return _reduce(loss.view(targets.shape), targets != ignore_index, reduction)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., V) against integer ``targets`` (...)."""
    op = "cross_entropy"
    check_float("logits", logits, op)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have a non-empty last (vocabulary) dimension, got {tuple(logits.shape)}")
    check_loss_args(op, reduction, label_smoothing, z_loss)
    check_targets(op, targets, logits.shape[:-1], logits.shape[-1], ignore_index)
    if targets.device != logits.device:
        raise ValueError(f"{op}: logits on {logits.device} and targets on {targets.device} must share a device")
    return dispatch(
        (logits, targets, ignore_index, reduction, label_smoothing, z_loss),
        triton=CrossEntropyFunction.apply,
        compiled=_cross_entropy_compiled,
        twin=cross_entropy_torch,
    )
