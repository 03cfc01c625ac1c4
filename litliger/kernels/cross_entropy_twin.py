"""The plain-PyTorch twin of :func:`~litliger.kernels.cross_entropy.cross_entropy`, and of its row launchers.

``cross_entropy_torch`` is the op's twin (the CPU path, the test oracle and the benchmark baseline);
``cross_entropy_rows_torch`` and ``cross_entropy_rows_grad_torch`` are the twins of the launchers
``cross_entropy_rows`` and ``cross_entropy_rows_grad``, with which the fused linear cross-entropy's CPU path walks
its chunks. The loss and gradient formulas, and how a row with an ignored or out-of-range target is treated, are
in the docstring of :mod:`litliger.kernels.cross_entropy`.
"""

from __future__ import annotations

import torch

from ._checks import compute_dtype, has_data, same_start


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def cross_entropy_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`cross_entropy`."""
    dt = compute_dtype(logits)
    x = logits.reshape(-1, logits.shape[-1]).to(dt)
    t = targets.reshape(-1)
    vocab = x.shape[-1]
    valid = t != ignore_index
    in_range = (t >= 0) & (t < vocab)
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(1, torch.where(in_range, t, 0).long().unsqueeze(1)).squeeze(1)
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss > 0.0:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    loss = torch.where(valid & ~in_range, torch.full_like(loss, float("nan")), loss)
    return _reduce(loss.reshape(targets.shape), valid, reduction)


def cross_entropy_rows_torch(
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
    """PyTorch twin of :func:`cross_entropy_rows` for (rows, V) ``logits``: write ``loss`` and ``lse`` (rows,)
    and, with ``grad`` (possibly ``logits`` itself), ``scale[r] * dloss/dx``. The fused linear cross-entropy's
    CPU path walks its chunks with this, so both paths share one algorithm.

    With ``grad`` the exponentials are computed once, in place: e = exp(x - max) gives both the lse
    (max + log sum e) and the softmax (e / sum e), where logsumexp followed by exp(x - lse) would take two
    passes of exp over the chunk.
    """
    x = logits.to(loss.dtype)  # the compute dtype; a no-op (no copy) for fp32 / fp64 logits
    t = targets.reshape(-1)
    valid = t != ignore_index
    in_range = (t >= 0) & (t < x.shape[-1])
    safe_t = torch.where(in_range, t, 0).long().unsqueeze(1)
    picked = x.gather(1, safe_t).squeeze(1)  # read before x may be overwritten by the gradient
    mean = x.mean(dim=-1) if label_smoothing > 0.0 else None
    if grad is None:
        m = torch.logsumexp(x, dim=-1)  # (rows,)
    else:
        top = x.amax(dim=-1, keepdim=True)
        work = _work_buffer(x, grad)
        torch.sub(x, top, out=work)
        work.exp_()
        total = work.sum(dim=-1)
        m = top.squeeze(1) + total.log()
    row = m - picked
    if label_smoothing > 0.0:
        row = (1.0 - label_smoothing) * row + label_smoothing * (m - mean)
    if z_loss > 0.0:
        row = row + z_loss * m.square()
    row = torch.where(valid, row, torch.zeros_like(row))
    loss.copy_(torch.where(valid & ~in_range, torch.full_like(row, float("nan")), row))
    lse.copy_(m)
    if grad is not None:  # work holds exp(x - max): the softmax times total, which the row factor divides out
        _softmax_to_grad(work, safe_t, valid & in_range, m, scale, label_smoothing, z_loss, grad, total)


def cross_entropy_rows_grad_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    dloss: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> None:
    """PyTorch twin of :func:`cross_entropy_rows_grad`: ``grad`` gets ``dloss[r] * dloss/dx`` from the saved lse."""
    t = targets.reshape(-1)
    in_range = (t >= 0) & (t < logits.shape[-1])
    safe_t = torch.where(in_range, t, 0).long().unsqueeze(1)
    x = logits.to(lse.dtype)
    _ce_grad_torch(x, safe_t, (t != ignore_index) & in_range, lse, dloss, label_smoothing, z_loss, grad)


def _work_buffer(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Where the gradient is formed: ``grad`` itself when it has the compute dtype, else ``x`` (a compute-dtype
    copy of half-precision logits, or the logits themselves when ``grad`` is them)."""
    return x if same_start(x, grad) or x.dtype != grad.dtype else grad


def _ce_grad_torch(
    x: torch.Tensor,
    safe_t: torch.Tensor,
    live: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    label_smoothing: float,
    z_loss: float,
    grad: torch.Tensor,
) -> None:
    """``grad = scale * (p (1 + 2 z lse) - e/V - (1 - e)[j == t])`` row by row from the saved lse, zero where not
    ``live``; in place (``x`` may be ``grad`` itself)."""
    work = _work_buffer(x, grad)
    torch.sub(x, lse.to(x.dtype).unsqueeze(1), out=work)
    work.exp_()
    _softmax_to_grad(work, safe_t, live, lse, scale, label_smoothing, z_loss, grad)


def _softmax_to_grad(
    work: torch.Tensor,
    safe_t: torch.Tensor,
    live: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    label_smoothing: float,
    z_loss: float,
    grad: torch.Tensor,
    total: torch.Tensor | None = None,
) -> None:
    """Turn the softmax in ``work`` (times ``total`` per row, when given) into the scaled loss gradient, in
    place, and leave it in ``grad``: one multiply by a per-row factor (scale, the z-loss term and 1/total
    together), the target's subtraction as a scatter, and no (rows, V) temporary, where autograd's log_softmax
    backward allocates several."""
    s = scale.to(work.dtype).reshape(-1)
    factor = s if total is None else s / total
    if z_loss > 0.0:
        factor = factor * (1.0 + 2.0 * z_loss * lse).to(work.dtype)
    work.mul_(factor.unsqueeze(1))
    if label_smoothing > 0.0:
        work.sub_((s * (label_smoothing / work.shape[-1])).unsqueeze(1))
    work.scatter_add_(1, safe_t, (-(1.0 - label_smoothing) * s).unsqueeze(1))
    # Dead rows (ignored targets) are zeroed: their logits may be garbage (padding). Skipped when every row is
    # live, which a CPU tensor tells for free (on a GPU it would cost a host sync).
    if work.device.type != "cpu" or torch.compiler.is_compiling() or not has_data(live) or not bool(live.all()):
        work.masked_fill_(~live.unsqueeze(1), 0.0)
    if work is not grad:
        grad.copy_(work)
