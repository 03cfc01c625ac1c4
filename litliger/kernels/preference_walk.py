"""The one-pass walk of the fused preference losses: chunks of whole pairs.

A preference loss is a sum over pairs, so a chunk that holds whole pairs (the chosen and the rejected rows of pairs
p0..p1) knows everything its gradient needs. Per chunk:

    logits  = [x_chosen; x_rejected] @ W.T + b          (2 P T, V), our own buffer (two matmuls into it)
    ce, lse = CE rows kernel (no gradient yet)          logp_i = -sum_t ce[i, t]
    part    = P / B * F(logp chunk, ...)                the chunk's share of the mean over pairs, and its gradient
    g       = dpart / dlogp                              w.r.t. the 2P log-probs in closed form (preference_grad)
    dlogits = CE backward kernel with row scale -g[seq(r)] (+ 1 / N_chosen on ORPO's chosen rows), in place
    grad_x[rows] = dlogits @ W      grad_W += dlogits.T @ x_rows (fp32)      grad_b += dlogits.sum(0)

Three matmuls per row, as the naive loss, and the gradients are formed in forward (backward scales them). The
chunk holds at least one pair's logits (2 T x V): :func:`pairs_per_chunk` decides how many, and
``fused_linear_preference`` falls back to the token-chunked two-pass walk (``reduction="none"`` cross-entropy)
when even one pair is over ``PAIR_CHUNK_MAX_BYTES``.
"""

from __future__ import annotations

import torch

from ._checks import compute_dtype
from .cross_entropy import cross_entropy_rows, cross_entropy_rows_grad
from .cross_entropy_twin import cross_entropy_rows_grad_torch, cross_entropy_rows_torch
from .fused_linear_cross_entropy import CHUNK_LOGITS_BYTES, _accumulate_mm, _or_empty
from .preference_formulas import chunk_loss_fn

# One pass needs one whole pair's logits: above this the two-pass token walk is used instead (bounded chunks, one
# more matmul per row). 1 GiB is a pair of 2 x 2048 tokens at vocab 128K in bf16.
PAIR_CHUNK_MAX_BYTES = 2**30
# Pairs are grouped into a chunk up to this many logits bytes (at least one pair).
PAIR_CHUNK_BYTES = 8 * CHUNK_LOGITS_BYTES


def pairs_per_chunk(pairs: int, seq_len: int, vocab: int, element_size: int, chunk_size: int | None) -> int:
    """Pairs per chunk of the one-pass walk, 0 when it is not used: ``chunk_size`` rows (when given) or
    ``PAIR_CHUNK_BYTES`` of logits, at least one pair; 0 when a pair holds more rows than ``chunk_size`` or more
    bytes than ``PAIR_CHUNK_MAX_BYTES``."""
    rows = 2 * seq_len
    if chunk_size is not None:
        return min(pairs, chunk_size // rows)
    pair_bytes = rows * vocab * max(element_size, 4)  # the twin works on fp32 copies of half-precision logits
    if pair_bytes > PAIR_CHUNK_MAX_BYTES:
        return 0
    return max(1, min(pairs, PAIR_CHUNK_BYTES // pair_bytes))


def pair_walk(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    per_chunk: int,
    chunk_loss,  # noqa: ANN001 ((logps, counts, ref) -> (mean over the chunk's P pairs, its gradient (2P,)))
    ref_logps: torch.Tensor | None,
    nll_chosen: bool,
    need: tuple[bool, bool, bool],
    triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Walk x (2B, T, C) in chunks of ``per_chunk`` pairs; ``(loss, logps (2B,), grad_x, grad_W, grad_b)``.

    ``nll_chosen`` (ORPO) adds the chosen rows' cross-entropy, averaged over all chosen target tokens."""
    n_seq, seq_len, size = x.shape
    n_pairs, vocab = n_seq // 2, weight.shape[0]
    need_h, need_w, need_b = need
    with_grad = need_h or need_w or need_b
    acc = compute_dtype(weight)
    rows_fn, grad_fn = (cross_entropy_rows, cross_entropy_rows_grad) if triton else (
        cross_entropy_rows_torch, cross_entropy_rows_grad_torch
    )  # fmt: skip
    valid = targets != ignore_index
    counts = valid.sum(-1)
    n_chosen = counts[:n_pairs].sum().clamp(min=1).to(acc)
    total = torch.zeros((), dtype=acc, device=x.device)
    logps = torch.empty(n_seq, dtype=acc, device=x.device)
    grad_h = torch.empty_like(x) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=x.device) if need_b else None
    b = None if bias is None else bias.to(x.dtype)
    for p0 in range(0, n_pairs, per_chunk):
        p1 = min(n_pairs, p0 + per_chunk)
        n = p1 - p0
        sides = (slice(p0, p1), slice(n_pairs + p0, n_pairs + p1))
        inputs = [x[s].reshape(-1, size) for s in sides]  # (n T, C) each: views of the contiguous hidden state
        logits = torch.empty(2 * n * seq_len, vocab, dtype=x.dtype, device=x.device)
        halves = (logits[: n * seq_len], logits[n * seq_len :])
        for rows, out in zip(inputs, halves, strict=True):
            torch.mm(rows, weight.T, out=out) if b is None else torch.addmm(b, rows, weight.T, out=out)
        t = torch.cat([targets[s].reshape(-1) for s in sides])
        ce = torch.empty(t.shape[0], dtype=acc, device=x.device)
        lse = torch.empty(t.shape[0], dtype=torch.float32 if triton else acc, device=x.device)
        rows_fn(logits, t, ce, lse, ignore_index, 0.0, 0.0)
        chunk_logps = -ce.view(2 * n, seq_len).sum(-1)  # (2n,): chosen of the chunk's pairs, then rejected
        ref = None if ref_logps is None else torch.cat([ref_logps[s] for s in sides]).to(acc)
        chunk_counts = torch.cat([counts[s] for s in sides])
        value, g = chunk_loss(chunk_logps, chunk_counts, ref)  # the chunk's mean and its gradient (closed form)
        total += value * (n / n_pairs)
        if nll_chosen:
            total += ce[: n * seq_len].sum() / n_chosen
        for s, (lo, hi) in zip(sides, ((0, n), (n, 2 * n)), strict=True):
            logps[s] = chunk_logps[lo:hi]
        if with_grad:
            scale = (-g * (n / n_pairs)).repeat_interleave(seq_len)  # d loss / d ce_r = -d loss / d logp_seq(r)
            if nll_chosen:
                scale[: n * seq_len] += 1.0 / n_chosen
            grad_fn(logits, t, lse, scale.to(lse.dtype), logits, ignore_index, 0.0, 0.0)  # in place
            for s, rows, dz in zip(sides, inputs, halves, strict=True):
                if need_h:
                    torch.mm(dz, weight, out=grad_h[s].view(-1, size))
                if need_w:
                    _accumulate_mm(grad_w, dz.T, rows)
            if need_b:
                grad_b += logits.sum(0, dtype=acc)
        del logits
    return total, logps, grad_h, grad_w, grad_b


class FusedLinearPreferenceFunction(torch.autograd.Function):
    """The one-pass walk as an autograd Function: ``(loss, logps)``, logps not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, targets, bias, ref_logps, ignore_index, per_chunk, chunk_loss, nll_chosen, grad_enabled,
                triton):  # fmt: skip
        need = tuple(grad_enabled and ctx.needs_input_grad[i] for i in (0, 1, 3))
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        loss, logps, gh, gw, gb = pair_walk(
            x, weight, targets, bias, ignore_index, per_chunk, chunk_loss, ref_logps, nll_chosen, need, triton
        )
        ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(logps)
        return loss, logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, _grad_logps: torch.Tensor):
        gh, gw, gb = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        dh = None if gh is None else (gh * grad_loss).to(gh.dtype)
        dw = None if gw is None else (gw * grad_loss).to(w_dtype)
        db = None if gb is None else (gb * grad_loss).to(b_dtype)
        return dh, dw, None, db, *([None] * 7)


# --- the custom op: what torch.compile sees (litliger/kernels/_custom_ops.py) -------------------------------------


@torch.library.custom_op("litliger::fused_linear_preference", mutates_args=())
def _preference_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    loss: str,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    gamma: float,
    ignore_index: int,
    per_chunk: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, logps, grad_x, grad_W, grad_b)`` of the one-pass walk (gradients empty where not needed)."""
    fn, nll = chunk_loss_fn(loss, beta, loss_type, label_smoothing, gamma)
    total, logps, gh, gw, gb = pair_walk(
        x, weight, targets, bias, ignore_index, per_chunk, fn, ref_logps, nll, (need_hidden, need_weight, need_bias),
        triton,
    )  # fmt: skip
    return total, logps, _or_empty(gh, x), _or_empty(gw, total), _or_empty(gb, total)


@_preference_op.register_fake
def _(x, weight, targets, bias, ref, loss, beta, loss_type, smoothing, gamma, ignore_index, per_chunk, nh, nw, nb, tr):
    acc = compute_dtype(weight)
    return (
        x.new_empty((), dtype=acc),
        x.new_empty(x.shape[0], dtype=acc),
        x.new_empty(x.shape if nh else 0),
        x.new_empty(weight.shape if nw else 0, dtype=acc),
        x.new_empty(weight.shape[0] if nb else 0, dtype=acc),
    )


def _setup(ctx, inputs, output) -> None:
    ctx.dtypes = (inputs[1].dtype, None if inputs[3] is None else inputs[3].dtype)
    ctx.save_for_backward(*output[2:])


def _backward(ctx, grad_loss, *_):
    gh, gw, gb = ctx.saved_tensors
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
    w_dtype, b_dtype = ctx.dtypes
    dh = (gh * grad_loss).to(gh.dtype) if need[0] else None
    dw = (gw * grad_loss).to(w_dtype) if need[1] else None
    db = (gb * grad_loss).to(b_dtype) if need[2] else None
    return (dh, dw, None, db, *([None] * 12))


_preference_op.register_autograd(_backward, setup_context=_setup)
