"""Fused LM head + cross-entropy: ``cross_entropy(hidden @ weight.T + bias, targets)`` without ever
holding the (tokens x vocab) logits.

The tokens are walked in chunks of ``chunk_size`` rows. For "mean"/"sum" the Triton path computes each
chunk's logits, its loss and the gradient w.r.t. the logits in one kernel pass, and turns that into the
hidden/weight/bias gradients during forward (grad_weight accumulated in fp32); backward only scales them
by the incoming gradient. For "none" the per-row gradient is unknown at forward time, so backward walks
the chunks again. Loss semantics are those of :mod:`litliger.kernels.cross_entropy`.

Triton path, per chunk c of rows (logits_c is this op's own temporary, so writing into it is safe):

    logits_c = h_c @ W.T + b                      (input dtype, torch matmul)
    loss_c, dlogits_c = CE kernel(logits_c)       (one launch; dlogits_c overwrites logits_c in place,
                                                   already scaled by 1/count for "mean")
    grad_h[c] = dlogits_c @ W                     (into one preallocated (N, H) buffer)
    grad_W += dlogits_c.T @ h_c                   (fp32 accumulator)
    grad_b += dlogits_c.sum(0)                    (fp32)

Only the gradients autograd asks for are formed (a frozen LoRA base weight costs no grad_W accumulation).
"mean" divides by count = (targets != ignore_index).sum() over ALL rows, a device tensor known before the
first chunk, so nothing syncs with the host. Backward multiplies the stored gradients by grad_output into
new tensors. For "none" forward keeps only the per-row loss and lse; backward recomputes each chunk's logits
and turns them into grad_output[r] * dloss/dlogits with the CE backward kernel, then does the same matmuls.
"""

from __future__ import annotations

import torch

from ._checks import check_float, check_loss_args, check_same_device, check_targets, check_vector, compute_dtype
from .backend import dispatch
from .cross_entropy import cross_entropy_rows, cross_entropy_rows_grad
from .cross_entropy_twin import _reduce, cross_entropy_rows_grad_torch, cross_entropy_rows_torch

# Fewest rows per chunk on the Triton path. Every chunk costs one pass over the fp32 grad_weight accumulator
# (V x H, read + write, plus the bf16 product for half inputs), so with K rows the grad_weight GEMM does about
# K/6 flop per byte of that traffic: it stays memory-bound (an H100 needs ~300) unless K is ~1K. The CE kernel
# also runs one program per row and needs several waves of SMs.
KERNEL_MIN_CHUNK_ROWS = 1024
# Fewest rows per chunk on the CPU path (PyTorch twins). With gradients formed in forward, fwd + bwd at H 256 and
# 2K tokens (benchmarks/sweep_flce_chunks.py, 1 thread) takes the same time, 0.77-0.88x the naive loss's, for any
# chunk of 128-2048 rows at vocab 8K, 16K and 64K; at vocab 128K 64-128-row chunks were 1.03-1.22x and 256+ rows
# 0.93-0.97x.
TWIN_MIN_CHUNK_ROWS = 256
# The memory one chunk's logits may take (their gradient overwrites them in place), in bytes. Above the minimum
# rows, a chunk never holds more than this whatever the tokens and vocabulary; the naive loss holds at least two
# (N, V) fp32 buffers (logits and their gradient). Speed is flat in the chunk size above the floors, so the
# budget is small: the chunk is live at the peak of a training step (end of forward, all activations held).
CHUNK_LOGITS_BYTES = 8 * 2**20


def default_chunk_size(
    n_tokens: int, hidden_size: int, vocab_size: int, element_size: int = 4, triton: bool = True
) -> int:
    """Rows per chunk, one rule for both paths: as many as fit ``CHUNK_LOGITS_BYTES`` of logits (plus the
    twin's fp32 working copy for half inputs), at least ``KERNEL_MIN_CHUNK_ROWS`` (Triton) or
    ``TWIN_MIN_CHUNK_ROWS`` (PyTorch) so the matmuls stay efficient, at most ``n_tokens``; a power of two.

    ``hidden_size`` does not enter: the hidden input is held whole anyway, and the size of grad_weight (the
    other large buffer) does not depend on the chunk.
    """
    bytes_per_row = vocab_size * (element_size + (4 if element_size < 4 and not triton else 0))
    rows = max(1, CHUNK_LOGITS_BYTES // bytes_per_row)
    rows = 1 << (rows.bit_length() - 1)  # a power of two, rounded down
    return max(1, min(n_tokens, max(KERNEL_MIN_CHUNK_ROWS if triton else TWIN_MIN_CHUNK_ROWS, rows)))


def fused_linear_cross_entropy_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`fused_linear_cross_entropy`: the same chunk walk, with the loss and the
    logits gradient of each chunk computed by PyTorch ops (``cross_entropy_rows_torch``) instead of Triton.

    Gradients are formed during forward, as on the Triton path: three matmuls per chunk, like the naive
    ``cross_entropy(hidden @ weight.T + bias)``, and never a recomputation of the logits.
    """
    return FusedLinearCrossEntropyFunction.apply(
        hidden,
        weight,
        targets,
        bias,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        chunk_size,
        torch.is_grad_enabled(),
        False,
    )


_ROWS_TORCH, _ROWS_GRAD_TORCH = cross_entropy_rows_torch, cross_entropy_rows_grad_torch

# Rows of grad_weight per half-precision product in _accumulate_mm: bounds its temporary to 4096 x H.
_ACC_SLICE_ROWS = 4096


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in fp32 (fp64 for fp64 inputs) whatever the dtype of ``a`` and ``b``."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    # bf16/fp16: each product is accumulated in fp32 inside the matmul and rounded once per chunk; summing the
    # chunks in fp32 keeps that rounding from compounding over chunks (Liger's accum_dtype path). In row slices,
    # so that the half-precision product never needs a (V, H) temporary.
    for s in range(0, acc.shape[0], _ACC_SLICE_ROWS):
        acc[s : s + _ACC_SLICE_ROWS] += a[s : s + _ACC_SLICE_ROWS] @ b


def _flce_walk(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    t: torch.Tensor,
    chunk: int,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    row_scale: torch.Tensor,
    need: tuple[bool, bool, bool],
    lse: torch.Tensor | None = None,
    triton: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """Walk ``h`` (N, H) in chunks of rows; return ``(loss, lse, grad_h, grad_weight, grad_bias)``.

    Forward mode (``lse`` None): the per-row loss and lse ((N,) each) are computed and, when
    any of ``need = (hidden, weight, bias)`` is set, the gradients of ``sum_r row_scale[r] * loss_r``.
    Backward mode (``lse`` given, "none"): the same gradients from the saved lse; loss is None.
    ``row_scale`` is (N,), an expanded scalar (stride 0) for "mean"/"sum". Gradients are None where not needed;
    grad_h is in the input dtype, grad_weight / grad_bias in fp32 (fp64 for fp64 inputs). ``triton`` picks the
    row kernels: Triton's, or their PyTorch twins (the CPU path); the walk itself is the same.
    """
    n, vocab = h.shape[0], weight.shape[0]
    need_h, need_w, need_b = need
    with_grad = need_h or need_w or need_b
    acc = compute_dtype(weight)
    loss = None
    forward = lse is None
    rows, rows_grad = (cross_entropy_rows, cross_entropy_rows_grad) if triton else (_ROWS_TORCH, _ROWS_GRAD_TORCH)
    if forward:
        loss = torch.empty(n, dtype=acc, device=h.device)  # fp32 (fp64 for fp64 inputs, as the twin)
        lse = torch.empty(n, dtype=torch.float32 if triton else acc, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=h.device) if need_b else None
    b = None if bias is None else bias.to(h.dtype)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        h_c, t_c = h[start:end], t[start:end]
        logits = h_c @ weight.T if b is None else torch.addmm(b, h_c, weight.T)  # (c, V), our own buffer
        if forward:
            loss_c, lse_c, scale_c = loss[start:end], lse[start:end], row_scale[start:end]
            grad_out = logits if with_grad else None  # in place: the gradient replaces this chunk's logits
            rows(logits, t_c, loss_c, lse_c, ignore_index, label_smoothing, z_loss, grad_out, scale_c)
            del grad_out
        else:
            scale_c = row_scale[start:end]
            rows_grad(logits, t_c, lse[start:end], scale_c, logits, ignore_index, label_smoothing, z_loss)
        # With gradients, logits now holds this chunk's dloss/dlogits, already scaled; (c, V)
        if need_h:
            torch.mm(logits, weight, out=grad_h[start:end])  # (c, H)
        if need_w:
            _accumulate_mm(grad_w, logits.T, h_c)  # (V, H)
        if need_b:
            grad_b += logits.sum(0, dtype=acc)
        del logits  # free this chunk before the next one is allocated, not after
    return loss, lse, grad_h, grad_w, grad_b


def _scaled(grad: torch.Tensor, grad_output: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``grad * grad_output`` cast to ``dtype``, always into a new tensor (``grad`` may be saved for backward)."""
    if grad_output is None:  # "none": grad is this backward's own, already scaled per row
        return grad.to(dtype)
    return torch.mul(grad, grad_output, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


def _flce_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    chunk: int,
    need: tuple[bool, bool, bool],
    triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(loss reduced, lse, grad_h, grad_w, grad_b)``; gradients (of ``need`` = hidden, weight, bias) are formed
    here for "mean"/"sum" only: for "none" the per-row grad_output is not known yet."""
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H): a view for the usual contiguous hidden state
    t = targets.reshape(-1)  # (N,)
    n = h.shape[0]
    valid = t != ignore_index
    scale_dtype = torch.float32 if triton else compute_dtype(weight)  # the twin keeps fp64 exact
    if reduction == "mean":  # 1 / count on device: no host sync
        row_scale = valid.sum().clamp(min=1).to(scale_dtype).reciprocal().expand(n)
    else:
        row_scale = t.new_ones((), dtype=scale_dtype).expand(n)
    walk_need = (False, False, False) if reduction == "none" else need
    loss, lse, grad_h, grad_w, grad_b = _flce_walk(
        h, weight, bias, t, chunk, ignore_index, label_smoothing, z_loss, row_scale, walk_need, triton=triton
    )
    return _reduce(loss.view(targets.shape), valid, reduction), lse, grad_h, grad_w, grad_b


def _chunk_rows(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int | None, triton: bool) -> int:
    n = hidden.numel() // hidden.shape[-1]
    return chunk_size or default_chunk_size(n, hidden.shape[-1], weight.shape[0], hidden.element_size(), triton)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Fused LM head + cross-entropy (see the module docstring); ``triton`` False runs the PyTorch row twins."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        z_loss: float,
        chunk_size: int | None,
        grad_enabled: bool,
        triton: bool = True,
    ) -> torch.Tensor:
        chunk = _chunk_rows(hidden, weight, chunk_size, triton)
        # needs_input_grad says what the inputs require even under no_grad, where nothing will call backward.
        need = tuple(grad_enabled and ctx.needs_input_grad[i] for i in (0, 1, 3))
        ctx.hidden_shape, ctx.args = hidden.shape, (ignore_index, reduction, label_smoothing, z_loss, chunk, triton)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        loss, lse, grad_h, grad_w, grad_b = _flce_forward(
            hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, chunk, need, triton
        )
        if reduction == "none":
            ctx.save_for_backward(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1), lse)
        else:
            ctx.save_for_backward(grad_h, grad_w, grad_b)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        ignore_index, reduction, label_smoothing, z_loss, chunk, triton = ctx.args
        weight_dtype, bias_dtype = ctx.dtypes
        if reduction == "none":
            h, weight, bias, t, lse = ctx.saved_tensors
            need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
            scale = grad_output.reshape(-1)
            _, _, grad_h, grad_w, grad_b = _flce_walk(
                h, weight, bias, t, chunk, ignore_index, label_smoothing, z_loss, scale, need, lse, triton
            )
            go = None
        else:
            # Scale into new tensors: the saved ones must stay intact for a retain_graph second backward.
            grad_h, grad_w, grad_b = ctx.saved_tensors
            go = grad_output
        dh = None if grad_h is None else _scaled(grad_h, go, grad_h.dtype).view(ctx.hidden_shape)
        dw = None if grad_w is None else _scaled(grad_w, go, weight_dtype)
        db = None if grad_b is None else _scaled(grad_b, go, bias_dtype)
        return dh, dw, None, db, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees, on both paths (``triton`` False: the PyTorch row twins, whose in-place chunk
# walk dynamo cannot trace). See litliger/kernels/_custom_ops.py.
# ---------------------------------------------------------------------------------------------------------------------


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("litliger::fused_linear_cross_entropy", mutates_args=())
def _flce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int | None,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse, grad_h (N, H), grad_w, grad_b)``: gradients formed in forward ("mean"/"sum"; empty where not
    needed), lse (N,) for the "none" backward."""
    chunk = _chunk_rows(hidden, weight, chunk_size, triton)
    need = (need_hidden, need_weight, need_bias)
    loss, lse, gh, gw, gb = _flce_forward(
        hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, chunk, need, triton
    )
    return loss, lse, _or_empty(gh, hidden), _or_empty(gw, loss), _or_empty(gb, loss)


@_flce_op.register_fake
def _(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size, nh, nw, nb, triton):
    acc = compute_dtype(weight)
    n, (vocab, size) = hidden.numel() // hidden.shape[-1], weight.shape
    forms = reduction != "none"
    loss = hidden.new_empty(targets.shape if reduction == "none" else (), dtype=acc)
    lse = hidden.new_empty(n, dtype=torch.float32 if triton else acc)
    grad_h = hidden.new_empty((n, size) if forms and nh else 0)
    grad_w = hidden.new_empty((vocab, size) if forms and nw else 0, dtype=acc)
    grad_b = hidden.new_empty(vocab if forms and nb else 0, dtype=acc)
    return loss, lse, grad_h, grad_w, grad_b


@torch.library.custom_op("litliger::fused_linear_cross_entropy_bwd", mutates_args=())
def _flce_bwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int | None,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reduction="none"``: ``(grad_h, grad_w, grad_b)`` of ``sum_r grad_rows[r] * loss_r`` from the saved lse,
    in the dtypes of hidden, weight and bias (empty where not needed)."""
    chunk = _chunk_rows(hidden, weight, chunk_size, triton)
    h, t, need = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), (need_hidden, need_weight, need_bias)
    _, _, gh, gw, gb = _flce_walk(
        h, weight, bias, t, chunk, ignore_index, label_smoothing, z_loss, grad_rows.reshape(-1), need, lse, triton
    )
    gw = None if gw is None else gw.to(weight.dtype)
    gb = None if gb is None else gb.to(bias.dtype)
    return _or_empty(gh, hidden).view(hidden.shape if need_hidden else -1), _or_empty(gw, weight), _or_empty(gb, weight)


@_flce_bwd_op.register_fake
def _(hidden, weight, targets, bias, lse, grad_rows, ignore_index, label_smoothing, z_loss, chunk_size, nh, nw, nb, t):
    grad_b = bias.new_empty(bias.shape) if nb else weight.new_empty(0)
    return hidden.new_empty(hidden.shape if nh else 0), weight.new_empty(weight.shape if nw else 0), grad_b


def _flce_setup(ctx, inputs, output) -> None:
    hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size = inputs[:9]
    ctx.args = (ignore_index, label_smoothing, z_loss, chunk_size)
    ctx.reduction, ctx.triton, ctx.hidden_shape = reduction, inputs[12], hidden.shape
    ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, targets, bias, output[1])
    else:
        ctx.save_for_backward(*output[2:])


def _flce_backward(ctx, dloss, *_):
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
    if ctx.reduction == "none":
        hidden, weight, targets, bias, lse = ctx.saved_tensors
        dh, dw, db = _flce_bwd_op(hidden, weight, targets, bias, lse, dloss, *ctx.args, *need, ctx.triton)
    else:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        dh = (grad_h * dloss).to(grad_h.dtype).view(ctx.hidden_shape) if need[0] else None
        dw = (grad_w * dloss).to(weight_dtype) if need[1] else None
        db = (grad_b * dloss).to(bias_dtype) if need[2] else None
    grads = [dh if need[0] else None, dw if need[1] else None, None, db if need[2] else None]
    return (*grads, None, None, None, None, None, None, None, None, None)


_flce_op.register_autograd(_flce_backward, setup_context=_flce_setup)


def _compiled_flce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int | None,
    triton: bool,
) -> torch.Tensor:
    grad = torch.is_grad_enabled()
    need = [grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    loss = _flce_op(
        hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size, *need, triton
    )[0]
    return loss


def _flce_compiled(*args) -> torch.Tensor:
    return _compiled_flce(*args, True)


def _flce_compiled_twin(*args) -> torch.Tensor:
    return _compiled_flce(*args, False)


def _flce_triton(*args) -> torch.Tensor:
    """The eager Triton path; the Function is told whether grad mode is on (its forward runs without it)."""
    return FusedLinearCrossEntropyFunction.apply(*args, torch.is_grad_enabled())


def _check(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    ignore_index: int,
    chunk_size: int | None,
) -> None:
    op = "fused_linear_cross_entropy"
    check_float("hidden", hidden, op)
    check_float("weight", weight, op)
    if hidden.dim() == 0:
        raise ValueError(f"{op}: hidden must have a last (hidden-size) dimension, got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{op}: weight has shape {tuple(weight.shape)} but hidden has last dimension {hidden.shape[-1]}; "
            f"expected weight of shape (vocab_size, {hidden.shape[-1]})"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{op}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    check_vector(op, "bias", bias, weight.shape[0], "the vocabulary (weight.shape[0])")
    check_loss_args(op, reduction, label_smoothing, z_loss)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op}: chunk_size={chunk_size} must be a positive number of rows (or None)")
    check_targets(op, targets, hidden.shape[:-1], weight.shape[0], ignore_index)
    check_same_device(op, hidden=hidden, weight=weight, targets=targets, bias=bias)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` without materialising the logits.

    hidden (..., H), weight (V, H), bias (V,) or None, targets (...) integer.

    Under autocast the matmuls run in the autocast dtype (as ``F.linear`` would) while the loss, the
    softmax and the weight-gradient accumulation stay fp32: the inputs are cast once here and the op then
    runs with autocast off, so no matmul inside silently changes dtype.
    """
    device_type = hidden.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return fused_linear_cross_entropy(
                hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size
            )
    _check(hidden, weight, targets, bias, reduction, label_smoothing, z_loss, ignore_index, chunk_size)
    return dispatch(
        (hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size),
        triton=_flce_triton,
        compiled=_flce_compiled,
        twin=fused_linear_cross_entropy_torch,
        compiled_twin=_flce_compiled_twin,
    )
