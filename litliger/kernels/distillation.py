"""Fused LM heads + distillation loss: a student learns a teacher's token distributions without either side's
(tokens x vocab) logits ever being held in full.

Per target token, with P_s = softmax(z_s / tau), P_t = softmax(z_t / tau) (z = x @ W.T, tau the temperature):

    jsd          beta KL(P_t || M) + (1 - beta) KL(P_s || M),  M = beta P_t + (1 - beta) P_s   (generalised JSD,
                 Agarwal et al. 2024's GKD; beta 0.5 is the symmetric JSD)
    forward_kl   KL(P_t || P_s)        reverse_kl   KL(P_s || P_t)

plus ``hard_weight`` x the usual cross-entropy of softmax(z_s) (tau 1) on the target; averaged over the tokens
whose target is not ``ignore_index``. No tau^2 factor (as GKD and Liger; scale ``hard_weight`` instead).

The gradient w.r.t. the student logits has one form for all three: with g = dloss/dP_s,
dloss/dz_s = P_s * (g - <P_s, g>) / tau, where g = (1 - beta) log(P_s / M) (jsd), log(P_s / P_t) (reverse_kl), and
for forward_kl the product is simply (P_s - P_t) / tau. The hard term adds softmax(z_s) - onehot(target).

The walk is the fused linear cross-entropy's: per chunk of rows, the student's and the teacher's logits
(teacher under no grad), one row kernel that writes the loss and, in place of the student logits, the scaled
gradient; then grad_x = dz @ W_s and grad_W_s += dz.T @ x (fp32). Gradients are formed in forward; backward
only scales them. The teacher side gets no gradient.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_float, check_same_device, check_targets, check_vector, compute_dtype
from .backend import dispatch
from .distillation_rows import DISTILLATION_LOSSES, distill_rows, distill_rows_torch
from .fused_linear_cross_entropy import _accumulate_mm, _or_empty, default_chunk_size

_OP = "fused_linear_distillation"


def _distill_walk(
    hs: torch.Tensor,
    ws: torch.Tensor,
    bs: torch.Tensor | None,
    ht: torch.Tensor,
    wt: torch.Tensor,
    bt: torch.Tensor | None,
    t: torch.Tensor,
    chunk: int,
    kind: str,
    beta: float,
    temperature: float,
    hard_weight: float,
    ignore_index: int,
    need: tuple[bool, bool, bool],
    triton_path: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Walk the rows in chunks; ``(mean loss, grad_hs, grad_ws, grad_bs)`` (gradients None where not needed)."""
    n, vocab = hs.shape[0], ws.shape[0]
    need_h, need_w, need_b = need
    with_grad = need_h or need_w or need_b
    acc = compute_dtype(ws)
    rows = distill_rows if triton_path else distill_rows_torch
    loss = torch.empty(n, dtype=acc, device=hs.device)
    count = (t != ignore_index).sum().clamp(min=1)
    row_scale = count.to(acc).reciprocal().expand(n) if with_grad else None
    grad_h = torch.empty_like(hs) if need_h else None
    grad_w = torch.zeros(ws.shape, dtype=acc, device=hs.device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=hs.device) if need_b else None
    b_s = None if bs is None else bs.to(hs.dtype)
    b_t = None if bt is None else bt.to(ht.dtype)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        h_c = hs[start:end]
        zs = h_c @ ws.T if b_s is None else torch.addmm(b_s, h_c, ws.T)  # (c, V), our own buffer
        with torch.no_grad():
            zt = ht[start:end] @ wt.T if b_t is None else torch.addmm(b_t, ht[start:end], wt.T)
        scale_c = None if row_scale is None else row_scale[start:end]
        rows(zs, zt, t[start:end], loss[start:end], kind, beta, temperature, hard_weight, ignore_index, scale_c)
        del zt
        if need_h:
            torch.mm(zs, ws, out=grad_h[start:end])
        if need_w:
            _accumulate_mm(grad_w, zs.T, h_c)
        if need_b:
            grad_b += zs.sum(0, dtype=acc)
        del zs
    return loss.sum() / count.to(acc), grad_h, grad_w, grad_b


def _chunk(hs: torch.Tensor, ws: torch.Tensor, chunk_size: int | None, triton_path: bool) -> int:
    # two (chunk, V) buffers live at once (student and teacher logits): the FLCE rule at twice the element size
    return chunk_size or default_chunk_size(hs.shape[0], hs.shape[1], ws.shape[0], 2 * hs.element_size(), triton_path)


class FusedLinearDistillationFunction(torch.autograd.Function):
    """Forward forms the student's gradients (the loss is a mean: its gradient is known there); backward scales."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, t, kind, beta, temperature, hard_weight, ignore_index, chunk_size,
                grad_enabled, triton_path):  # fmt: skip
        need = tuple(grad_enabled and ctx.needs_input_grad[i] for i in (0, 1, 2))
        ctx.shape, ctx.dtypes = hs.shape, (ws.dtype, None if bs is None else bs.dtype)
        h, tt = hs.reshape(-1, hs.shape[-1]), t.reshape(-1)
        loss, gh, gw, gb = _distill_walk(
            h, ws, bs, ht.reshape(-1, ht.shape[-1]), wt, bt, tt, _chunk(h, ws, chunk_size, triton_path), kind, beta,
            temperature, hard_weight, ignore_index, need, triton_path,
        )  # fmt: skip
        ctx.save_for_backward(gh, gw, gb)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        gh, gw, gb = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        dh = None if gh is None else (gh * grad_output).to(gh.dtype).view(ctx.shape)
        dw = None if gw is None else (gw * grad_output).to(w_dtype)
        db = None if gb is None else (gb * grad_output).to(b_dtype)
        return dh, dw, db, *([None] * 12)


@torch.library.custom_op("litliger::fused_linear_distillation", mutates_args=())
def _distill_op(
    hs: torch.Tensor,
    ws: torch.Tensor,
    bs: torch.Tensor | None,
    ht: torch.Tensor,
    wt: torch.Tensor,
    bt: torch.Tensor | None,
    t: torch.Tensor,
    kind: str,
    beta: float,
    temperature: float,
    hard_weight: float,
    ignore_index: int,
    chunk_size: int | None,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    triton_path: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, grad_hs, grad_ws, grad_bs)``, the gradients formed in forward (empty where not needed)."""
    h = hs.reshape(-1, hs.shape[-1])
    loss, gh, gw, gb = _distill_walk(
        h, ws, bs, ht.reshape(-1, ht.shape[-1]), wt, bt, t.reshape(-1), _chunk(h, ws, chunk_size, triton_path), kind,
        beta, temperature, hard_weight, ignore_index, (need_hidden, need_weight, need_bias), triton_path,
    )  # fmt: skip
    return loss, _or_empty(gh, hs).view(hs.shape if need_hidden else -1), _or_empty(gw, loss), _or_empty(gb, loss)


@_distill_op.register_fake
def _(hs, ws, bs, ht, wt, bt, t, kind, beta, temperature, hard_weight, ignore_index, chunk_size, nh, nw, nb, tp):
    acc = compute_dtype(ws)
    loss = hs.new_empty((), dtype=acc)
    return (
        loss,
        hs.new_empty(hs.shape if nh else 0),
        hs.new_empty(ws.shape if nw else 0, dtype=acc),
        hs.new_empty(ws.shape[0] if nb else 0, dtype=acc),
    )


def _distill_setup(ctx, inputs, output) -> None:
    ctx.dtypes = (inputs[1].dtype, None if inputs[2] is None else inputs[2].dtype)
    ctx.save_for_backward(*output[1:])


def _distill_backward(ctx, dloss, *_):
    gh, gw, gb = ctx.saved_tensors
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    w_dtype, b_dtype = ctx.dtypes
    dh = (gh * dloss).to(gh.dtype) if need[0] else None
    dw = (gw * dloss).to(w_dtype) if need[1] else None
    db = (gb * dloss).to(b_dtype) if need[2] else None
    return (dh, dw, db, *([None] * 14))


_distill_op.register_autograd(_distill_backward, setup_context=_distill_setup)


def _compiled(*args, triton_path: bool) -> torch.Tensor:
    grad = torch.is_grad_enabled()
    need = [grad and x is not None and x.requires_grad for x in args[:3]]
    return _distill_op(*args, *need, triton_path)[0]


def _run_triton(*args) -> torch.Tensor:
    return FusedLinearDistillationFunction.apply(*args, torch.is_grad_enabled(), True)


def _run_twin(*args) -> torch.Tensor:
    return FusedLinearDistillationFunction.apply(*args, torch.is_grad_enabled(), False)


def _check(x_student, w_student, x_teacher, w_teacher, targets, loss, beta, temperature, hard_weight, chunk_size,
           student_bias, teacher_bias, ignore_index):  # fmt: skip
    for name, tensor in (("x_student", x_student), ("w_student", w_student), ("x_teacher", x_teacher),
                         ("w_teacher", w_teacher)):  # fmt: skip
        check_float(name, tensor, _OP)
    if loss not in DISTILLATION_LOSSES:
        raise ValueError(f"{_OP}: loss={loss!r}; choose one of {', '.join(DISTILLATION_LOSSES)}")
    if loss == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(
            f"{_OP}: beta={beta} must be in (0, 1) for the generalised JSD (its ends are degenerate); "
            "use loss='forward_kl' or 'reverse_kl' for a plain KL"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{_OP}: temperature={temperature} must be > 0")
    if not (math.isfinite(hard_weight) and hard_weight >= 0):
        raise ValueError(f"{_OP}: hard_weight={hard_weight} must be >= 0 (0: no cross-entropy on the targets)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{_OP}: chunk_size={chunk_size} must be a positive number of rows (or None)")
    for side, x, w in (("student", x_student, w_student), ("teacher", x_teacher, w_teacher)):
        if w.dim() != 2 or x.dim() < 1 or w.shape[1] != x.shape[-1]:
            raise ValueError(
                f"{_OP}: w_{side} has shape {tuple(w.shape)} but x_{side} has last dimension {x.shape[-1]}; "
                f"expected (vocab_size, {x.shape[-1]})"
            )
        if x.dtype != w.dtype:
            raise ValueError(f"{_OP}: x_{side} ({x.dtype}) and w_{side} ({w.dtype}) must have the same dtype")
    if x_student.shape[:-1] != x_teacher.shape[:-1]:
        raise ValueError(
            f"{_OP}: x_student {tuple(x_student.shape)} and x_teacher {tuple(x_teacher.shape)} must have the same "
            "tokens (all dimensions but the last): the teacher reads the student's batch"
        )
    if w_student.shape[0] != w_teacher.shape[0]:
        raise ValueError(
            f"{_OP}: the student's head has {w_student.shape[0]} rows and the teacher's {w_teacher.shape[0]}: "
            "student and teacher must share the tokenizer and vocabulary; pass vocab_size (the real vocabulary) "
            "when only their padding differs"
        )
    check_vector(_OP, "student_bias", student_bias, w_student.shape[0], "w_student")
    check_vector(_OP, "teacher_bias", teacher_bias, w_teacher.shape[0], "w_teacher")
    check_targets(_OP, targets, x_student.shape[:-1], w_student.shape[0], ignore_index)
    check_same_device(_OP, x_student=x_student, w_student=w_student, x_teacher=x_teacher, w_teacher=w_teacher,
                      targets=targets)  # fmt: skip


def fused_linear_distillation(
    x_student: torch.Tensor,
    w_student: torch.Tensor,
    x_teacher: torch.Tensor,
    w_teacher: torch.Tensor,
    targets: torch.Tensor,
    *,
    loss: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Distillation loss of the student head ``x_student @ w_student.T`` against the teacher's (module docstring).

    x_student (..., C_s), w_student (V, C_s), x_teacher (..., C_t), w_teacher (V, C_t), targets (...). The mean
    over target tokens (targets != ignore_index). ``vocab_size``: the real vocabulary when the heads carry padding
    rows (litliger models pad to a multiple): only the first ``vocab_size`` columns enter either distribution, and
    the student's padding rows get a zero gradient. Gradients reach the student side only (x, weight, bias).
    """
    if vocab_size is not None:
        for name, w in (("w_student", w_student), ("w_teacher", w_teacher)):
            if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] < vocab_size:
                raise ValueError(f"{_OP}: {name} has {w.shape[0]} rows, fewer than vocab_size={vocab_size}")
        w_student, w_teacher = w_student[:vocab_size], w_teacher[:vocab_size]
        student_bias = None if student_bias is None else student_bias[:vocab_size]
        teacher_bias = None if teacher_bias is None else teacher_bias[:vocab_size]
    device_type = x_student.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [None if v is None else v.to(dtype) for v in (x_student, w_student, x_teacher, w_teacher)]
        biases = [None if b is None else b.to(dtype) for b in (student_bias, teacher_bias)]
        with torch.autocast(device_type, enabled=False):
            return fused_linear_distillation(
                *cast, targets, loss=loss, beta=beta, temperature=temperature, hard_weight=hard_weight,
                ignore_index=ignore_index, chunk_size=chunk_size, student_bias=biases[0], teacher_bias=biases[1],
            )  # fmt: skip
    _check(x_student, w_student, x_teacher, w_teacher, targets, loss, beta, temperature, hard_weight, chunk_size,
           student_bias, teacher_bias, ignore_index)  # fmt: skip
    x_teacher, w_teacher = x_teacher.detach(), w_teacher.detach()
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    args = (x_student, w_student, student_bias, x_teacher, w_teacher, teacher_bias, targets, loss, float(beta),
            float(temperature), float(hard_weight), ignore_index, chunk_size)  # fmt: skip
    return dispatch(
        args,
        triton=_run_triton,
        compiled=lambda *a: _compiled(*a, triton_path=True),
        twin=_run_twin,
        compiled_twin=lambda *a: _compiled(*a, triton_path=False),
    )


def fused_linear_distillation_torch(
    x_student: torch.Tensor,
    w_student: torch.Tensor,
    x_teacher: torch.Tensor,
    w_teacher: torch.Tensor,
    targets: torch.Tensor,
    **kwargs: float | int | str | torch.Tensor | None,
) -> torch.Tensor:
    """The PyTorch twin of :func:`fused_linear_distillation` (the same walk, the row formulas in PyTorch)."""
    from .backend import use_backend

    with use_backend("torch"):
        return fused_linear_distillation(x_student, w_student, x_teacher, w_teacher, targets, **kwargs)
