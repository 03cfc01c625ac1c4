"""The row kernel of the fused distillation loss and its PyTorch twin: per row of student and teacher logits, the
divergence (and the hard cross-entropy term) and, in place of the student logits, the scaled gradient. The
formulas are in :mod:`litliger.kernels.distillation`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._launch import launch, row_settings

DISTILLATION_LOSSES = ("jsd", "forward_kl", "reverse_kl")
_KIND = {name: i for i, name in enumerate(DISTILLATION_LOSSES)}
MAX_BLOCK = 8192  # columns per block of the row kernel (it holds a few fp32 blocks of both sides)
TWIN_ROWS = 32  # rows the twin's formulas take at once (each holds ~8 (rows, V) compute-dtype temporaries)


@triton.jit
def _distill_rows_kernel(
    S_ptr,
    stride_s,
    T_ptr,
    stride_t,
    Y_ptr,
    loss_ptr,
    scale_ptr,
    stride_scale,
    inv_temp,
    beta,
    hard_weight,
    ignore_index,
    V,
    KIND: tl.constexpr,
    HARD: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row: the row's loss and, with ``HAS_GRAD``, ``scale * dloss/dz_s`` written over the
    student logits (three passes over the row: softmax statistics, loss and <P_s, g>, gradient)."""
    row = tl.cast(tl.program_id(0), tl.int64)
    s_row = S_ptr + row * stride_s
    t_row = T_ptr + row * stride_t
    y = tl.cast(tl.load(Y_ptr + row), tl.int64)
    live = y != ignore_index
    log_beta = tl.log(tl.maximum(beta, 1e-30))
    log_1mbeta = tl.log(tl.maximum(1.0 - beta, 1e-30))

    # Pass 1: online max / sum of exp for z_s / tau, z_t / tau and (hard term) z_s.
    ms = float("-inf")
    ds = 0.0
    mt = float("-inf")
    dt = 0.0
    mh = float("-inf")
    dh = 0.0
    for off in range(0, V, BLOCK_SIZE):
        cols = off + tl.arange(0, BLOCK_SIZE)
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        xs = s * inv_temp
        xt = t * inv_temp
        new = tl.maximum(ms, tl.max(xs, 0))
        ds = ds * tl.exp(ms - new) + tl.sum(tl.exp(xs - new), 0)
        ms = new
        new = tl.maximum(mt, tl.max(xt, 0))
        dt = dt * tl.exp(mt - new) + tl.sum(tl.exp(xt - new), 0)
        mt = new
        if HARD:
            new = tl.maximum(mh, tl.max(s, 0))
            dh = dh * tl.exp(mh - new) + tl.sum(tl.exp(s - new), 0)
            mh = new
    lse_s = ms + tl.log(ds)
    lse_t = mt + tl.log(dt)
    lse_h = mh + tl.log(tl.maximum(dh, 1e-30))

    # Pass 2: the row's divergence and <P_s, g>.
    total = 0.0
    dot = 0.0
    for off in range(0, V, BLOCK_SIZE):
        cols = off + tl.arange(0, BLOCK_SIZE)
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
        lps = s * inv_temp - lse_s
        lpt = t * inv_temp - lse_t
        ps = tl.exp(lps)
        pt = tl.exp(lpt)
        if KIND == 0:
            a = lpt + log_beta
            b = lps + log_1mbeta
            top = tl.maximum(a, b)
            lm = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
            term = beta * pt * (lpt - lm) + (1.0 - beta) * ps * (lps - lm)
            g = (1.0 - beta) * (lps - lm)
        elif KIND == 1:
            term = pt * (lpt - lps)
            g = lps  # unused: forward KL's gradient is P_s - P_t
        else:
            term = ps * (lps - lpt)
            g = lps - lpt
        total += tl.sum(tl.where(mask, term, 0.0), 0)
        dot += tl.sum(tl.where(mask, ps * g, 0.0), 0)
    if HARD:
        s_y = tl.load(s_row + tl.where(live, y, 0)).to(tl.float32)
        total += hard_weight * (lse_h - s_y)
    tl.store(loss_ptr + row, tl.where(live, total, 0.0))

    if HAS_GRAD:
        scale = tl.cast(tl.load(scale_ptr + row * stride_scale), tl.float32)
        scale = tl.where(live, scale, 0.0)
        for off in range(0, V, BLOCK_SIZE):
            cols = off + tl.arange(0, BLOCK_SIZE)
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            lps = s * inv_temp - lse_s
            lpt = t * inv_temp - lse_t
            ps = tl.exp(lps)
            if KIND == 0:
                a = lpt + log_beta
                b = lps + log_1mbeta
                top = tl.maximum(a, b)
                lm = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
                dz = ps * ((1.0 - beta) * (lps - lm) - dot)
            elif KIND == 1:
                dz = ps - tl.exp(lpt)
            else:
                dz = ps * ((lps - lpt) - dot)
            dz = dz * inv_temp
            if HARD:
                dz += hard_weight * (tl.exp(s - lse_h) - tl.where(cols == y, 1.0, 0.0))
            tl.store(s_row + cols, (dz * scale).to(S_ptr.dtype.element_ty), mask=mask)


def distill_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    loss: torch.Tensor,
    kind: str,
    beta: float,
    temperature: float,
    hard_weight: float,
    ignore_index: int,
    scale: torch.Tensor | None = None,
) -> None:
    """Launch the row kernel over contiguous (rows, V) ``student`` / ``teacher`` logits: write ``loss`` (rows,) and,
    with ``scale`` (rows,), ``scale[r] * dloss/dz_s`` over ``student`` in place."""
    n_rows, vocab = student.shape
    if n_rows == 0:
        return
    block, warps = row_settings(vocab, MAX_BLOCK)
    has_grad = scale is not None
    launch(
        _distill_rows_kernel,
        (n_rows,),
        student,
        student.stride(0),
        teacher,
        teacher.stride(0),
        targets,
        loss,
        scale if has_grad else loss,
        scale.stride(0) if has_grad else 0,
        1.0 / temperature,
        beta,
        hard_weight,
        ignore_index,
        vocab,
        KIND=_KIND[kind],
        HARD=hard_weight > 0,
        HAS_GRAD=has_grad,
        BLOCK_SIZE=block,
        num_warps=warps,
    )


def distill_rows_torch(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    loss: torch.Tensor,
    kind: str,
    beta: float,
    temperature: float,
    hard_weight: float,
    ignore_index: int,
    scale: torch.Tensor | None = None,
) -> None:
    """PyTorch twin of :func:`distill_rows` (the CPU path): the same formulas, in ``loss``'s dtype.

    The formulas need several (rows, V) temporaries, so the rows go through them ``TWIN_ROWS`` at a time: the
    twin's working memory is bounded like the kernel's, whatever the walk's chunk."""
    for start in range(0, student.shape[0], TWIN_ROWS):
        end = start + TWIN_ROWS
        _distill_rows_torch(
            student[start:end], teacher[start:end], targets[start:end], loss[start:end], kind, beta, temperature,
            hard_weight, ignore_index, None if scale is None else scale[start:end],
        )  # fmt: skip


def _distill_rows_torch(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    loss: torch.Tensor,
    kind: str,
    beta: float,
    temperature: float,
    hard_weight: float,
    ignore_index: int,
    scale: torch.Tensor | None,
) -> None:
    dt = loss.dtype
    zs = student.to(dt)
    inv_t = 1.0 / temperature
    lps = torch.log_softmax(zs if temperature == 1.0 else zs * inv_t, dim=-1)
    zt = teacher.to(dt)
    lpt = torch.log_softmax(zt if temperature == 1.0 else zt * inv_t, dim=-1)
    ps = lps.exp()
    live = targets != ignore_index
    if kind == "jsd":
        lm = torch.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta))
        pt = lpt.exp()
        row = beta * (pt * (lpt - lm)).sum(-1) + (1.0 - beta) * (ps * (lps - lm)).sum(-1)
        g = lps.sub_(lm).mul_(1.0 - beta)  # lps is not needed after this
    elif kind == "forward_kl":
        pt = lpt.exp()
        row = (pt * (lpt - lps)).sum(-1)
        g = None
    else:
        g = lps.sub_(lpt)  # log(P_s / P_t), in place
        row = (ps * g).sum(-1)
    if hard_weight > 0:
        safe = torch.where(live, targets, 0).long()
        row = row + hard_weight * F.cross_entropy(zs, safe, reduction="none")
    loss.copy_(torch.where(live, row, torch.zeros_like(row)))
    if scale is None:
        return
    factor = torch.where(live, scale.to(dt), 0.0).unsqueeze(1)  # (rows, 1): the row's scale, 0 on ignored rows
    # forward_kl: (P_s - P_t) / tau; the others: P_s (g - <P_s, g>) / tau
    dz = ps.sub_(pt) if g is None else g.sub_((ps * g).sum(-1, keepdim=True)).mul_(ps)
    dz.mul_(factor * inv_t)
    if hard_weight > 0:
        hard = torch.softmax(zs, dim=-1).scatter_add_(1, safe.unsqueeze(1), torch.full_like(row, -1.0).unsqueeze(1))
        dz.add_(hard.mul_(factor * hard_weight))
    student.copy_(dz)
