"""RMSNorm, fused add + RMSNorm and LayerNorm: Triton kernels against their float64 twins, twins against formulas.

On a CPU-only machine the kernels run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

import pytest
import torch

from litliger.kernels import (
    add_rms_norm,
    add_rms_norm_torch,
    layer_norm,
    layer_norm_torch,
    rms_norm,
    rms_norm_torch,
    use_backend,
)

# The package re-exports the ops under their modules' names, so the modules are looked up explicitly.
rms_norm_module = importlib.import_module("litliger.kernels.rms_norm")
layer_norm_module = importlib.import_module("litliger.kernels.layer_norm")

FP32_TOL = {"atol": 1e-5, "rtol": 1e-4}
BF16_TOL = {"atol": 1.6e-2, "rtol": 1.6e-2}


def _forward_backward(
    op: Callable, args: list[torch.Tensor | None], kwargs: dict, grad_outs: list[torch.Tensor] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Run ``op`` on leaf copies of ``args`` and backpropagate sum(out * grad_out) over all outputs.

    Returns the outputs, the grad_outs used (random unless given) and the gradients of the non-None args.
    """
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    out = op(*leaves, **kwargs)
    outs = list(out) if isinstance(out, tuple) else [out]
    if grad_outs is None:
        grad_outs = [torch.randn_like(o) for o in outs]
    loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, grad_outs, strict=True))
    grads = torch.autograd.grad(loss, [leaf for leaf in leaves if leaf is not None])
    return outs, grad_outs, list(grads)


def _check_against_twin(
    op: Callable, twin: Callable, args: list[torch.Tensor | None], tol: dict | None = None, **kwargs
) -> None:
    """Triton ``op`` on ``args`` vs ``twin`` on float64 copies: every output and every input gradient."""
    with use_backend("triton"):
        outs, grad_outs, grads = _forward_backward(op, args, kwargs)
    args64 = [None if a is None else a.double() for a in args]
    ref_outs, _, ref_grads = _forward_backward(twin, args64, kwargs, [g.double() for g in grad_outs])
    for got, ref in zip(outs + grads, ref_outs + ref_grads, strict=True):
        torch.testing.assert_close(got.double(), ref, **(tol or FP32_TOL))


# ---------------------------------------------------------------------------------------------------------------------
# Twins against independent float64 formulas
# ---------------------------------------------------------------------------------------------------------------------


def test_twins_match_formulas() -> None:
    torch.manual_seed(0)
    x, r = torch.randn(2, 3, 10, dtype=torch.float64), torch.randn(2, 3, 10, dtype=torch.float64)
    w, b = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    for offset in (0.0, 1.0):
        rms = torch.sqrt((x * x).sum(-1, keepdim=True) / 10 + 1e-6)
        torch.testing.assert_close(rms_norm_torch(x, w, 1e-6, offset), x / rms * (offset + w))
        s = x + r
        y, s_out = add_rms_norm_torch(x, r, w, 1e-6, offset)
        torch.testing.assert_close(s_out, s)
        torch.testing.assert_close(y, s / torch.sqrt((s * s).mean(-1, keepdim=True) + 1e-6) * (offset + w))
    mean = x.sum(-1, keepdim=True) / 10
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / 10  # biased, as torch.nn.LayerNorm
    torch.testing.assert_close(layer_norm_torch(x, w, b, 1e-5), (x - mean) / torch.sqrt(var + 1e-5) * w + b)
    torch.testing.assert_close(layer_norm_torch(x, w, None, 1e-5), (x - mean) / torch.sqrt(var + 1e-5) * w)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels against the float64 twins
# ---------------------------------------------------------------------------------------------------------------------

# 3-D with a non-power-of-two hidden size, an odd width beyond a power of two, a single row, a single column.
SHAPES = [((3, 5, 96), 0.0, 1e-6), ((7, 257), 1.0, 1e-6), ((1, 7), 1.0, 1e-1), ((4, 1), 0.0, 1e-6)]


@pytest.mark.parametrize("shape, offset, eps", SHAPES)
def test_rms_norm_matches_twin(device: torch.device, shape: tuple[int, ...], offset: float, eps: float) -> None:
    torch.manual_seed(1)
    x, w = torch.randn(shape, device=device), torch.randn(shape[-1], device=device)
    _check_against_twin(rms_norm, rms_norm_torch, [x, w], eps=eps, offset=offset)


@pytest.mark.parametrize("shape, offset, eps", SHAPES)
def test_add_rms_norm_matches_twin(device: torch.device, shape: tuple[int, ...], offset: float, eps: float) -> None:
    torch.manual_seed(2)
    x, r = torch.randn(shape, device=device), torch.randn(shape, device=device)
    w = torch.randn(shape[-1], device=device)
    _check_against_twin(add_rms_norm, add_rms_norm_torch, [x, r, w], eps=eps, offset=offset)


@pytest.mark.parametrize(
    "shape, has_bias, eps",
    [((3, 5, 96), True, 1e-5), ((7, 257), False, 1e-5), ((1, 7), True, 1e-1), ((4, 1), True, 1e-5)],
)
def test_layer_norm_matches_twin(device: torch.device, shape: tuple[int, ...], has_bias: bool, eps: float) -> None:
    torch.manual_seed(3)
    x, w = torch.randn(shape, device=device), torch.randn(shape[-1], device=device)
    b = torch.randn(shape[-1], device=device) if has_bias else None
    _check_against_twin(layer_norm, layer_norm_torch, [x, w, b], eps=eps)


@pytest.mark.parametrize("max_block", [16, None], ids=["column-loop", "one-block"])
def test_multi_tile_and_column_loop(
    device: torch.device, monkeypatch: pytest.MonkeyPatch, max_block: int | None
) -> None:
    """Several rows per tile, a partial last tile, several backward programs with uneven shares and (with a
    16-wide max block) rows of 40 walked in three column blocks, the last one partial."""
    for module in (rms_norm_module, layer_norm_module):
        monkeypatch.setattr(module, "_MAX_ROWS_PER_TILE", 2)
        monkeypatch.setattr(module, "_CPU_BWD_PROGRAMS", 2)
        if max_block is not None:
            monkeypatch.setattr(module, "_MAX_BLOCK", max_block)
    n_cols = 40 if max_block is not None else 10
    block_m, block_n, _ = rms_norm_module.tile_settings(n_cols, rms_norm_module._MAX_BLOCK, 2)
    assert block_m == 2 and (block_n < n_cols) == (max_block is not None)
    torch.manual_seed(4)
    x, r = torch.randn(3, 3, n_cols, device=device), torch.randn(3, 3, n_cols, device=device)
    w, b = torch.randn(n_cols, device=device), torch.randn(n_cols, device=device)
    _check_against_twin(rms_norm, rms_norm_torch, [x, w], offset=1.0)
    _check_against_twin(add_rms_norm, add_rms_norm_torch, [x, r, w], offset=0.0)
    _check_against_twin(layer_norm, layer_norm_torch, [x, w, b])
    _check_against_twin(layer_norm, layer_norm_torch, [x, w, None])


def test_layer_norm_large_mean(device: torch.device) -> None:
    """The variance is taken around the mean: a row mean of 1e3 with unit spread (E[x^2] - mean^2 would lose
    about 2% of the variance to fp32 cancellation) still normalises to fp32 rounding of x - mean."""
    torch.manual_seed(5)
    x, w, b = torch.randn(6, 50, device=device) + 1e3, torch.randn(50, device=device), torch.randn(50, device=device)
    _check_against_twin(layer_norm, layer_norm_torch, [x, w, b], tol={"atol": 1e-3, "rtol": 1e-3})


def test_params_in_another_dtype(device: torch.device) -> None:
    """bf16 activations with fp32 parameters (mixed precision), and fp32 activations with bf16 parameters:
    outputs and dx in the activation dtype, parameter grads in the parameter dtype, values as the twin's on the
    same inputs (fp32 results to fp32 tolerance: parameter grads are fp32 sums of the same fp32 products)."""
    torch.manual_seed(6)
    x = torch.randn(4, 40, device=device, dtype=torch.bfloat16)
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    x32 = torch.randn(4, 40, device=device)
    cases = [
        (rms_norm, rms_norm_torch, [x, w], {"offset": 1.0}),
        (layer_norm, layer_norm_torch, [x, w, b], {}),
        (rms_norm, rms_norm_torch, [x32, w.bfloat16()], {}),
        (layer_norm, layer_norm_torch, [x32, w.bfloat16(), b.bfloat16()], {}),
    ]
    for op, twin, args, kwargs in cases:
        with use_backend("triton"):
            outs, grad_outs, grads = _forward_backward(op, args, kwargs)
        ref_outs, _, ref_grads = _forward_backward(twin, args, kwargs, grad_outs)
        for got, ref, arg in zip(outs + grads, ref_outs + ref_grads, [args[0]] * len(outs) + args, strict=True):
            assert got.dtype == ref.dtype == arg.dtype
            torch.testing.assert_close(got, ref, **(FP32_TOL if got.dtype == torch.float32 else BF16_TOL))


def test_add_rms_norm_bf16_normalises_the_stored_sum(device: torch.device) -> None:
    """In bf16, s = x + residual is rounded to bf16 once (as a model adding its residual in bf16 does; the CPU
    interpreter truncates where the GPU rounds to nearest) and y and dweight are exactly rms_norm of that
    returned s; dx = dresidual = the gradient reaching s."""
    torch.manual_seed(14)
    x, r = torch.randn(4, 40, device=device, dtype=torch.bfloat16), torch.randn(4, 40, device=device)
    w = torch.randn(40, device=device)
    with use_backend("triton"):
        (y, s), (gy, gs), (dx, dr, dw) = _forward_backward(add_rms_norm, [x, r.bfloat16(), w], {"offset": 1.0})
        torch.testing.assert_close(y, rms_norm(s, w, offset=1.0), atol=0, rtol=0)
    assert y.dtype == s.dtype == dx.dtype == dr.dtype == torch.bfloat16 and dw.dtype == torch.float32
    torch.testing.assert_close(s.float(), x.float() + r.bfloat16().float(), **BF16_TOL)
    (ref_y,), _, (ref_ds, ref_dw) = _forward_backward(rms_norm_torch, [s, w], {"offset": 1.0}, [gy])
    torch.testing.assert_close(y, ref_y, **BF16_TOL)
    torch.testing.assert_close(dw, ref_dw, **FP32_TOL)
    torch.testing.assert_close(dx, ref_ds + gs.bfloat16(), **BF16_TOL)
    torch.testing.assert_close(dr, dx, atol=0, rtol=0)


def test_float64_input_keeps_dtype(device: torch.device) -> None:
    """fp64 input runs the kernel in fp32 and returns fp64 outputs and gradients."""
    torch.manual_seed(7)
    x, w = torch.randn(3, 12, device=device, dtype=torch.float64), torch.randn(12, device=device)
    with use_backend("triton"):
        (y,), _, (dx, dw) = _forward_backward(rms_norm, [x, w], {})
    assert y.dtype == dx.dtype == torch.float64 and dw.dtype == torch.float32
    torch.testing.assert_close(y, rms_norm_torch(x, w.double()), **FP32_TOL)


# ---------------------------------------------------------------------------------------------------------------------
# Autograd: inputs from other differentiable ops, outputs used twice or not at all, retain_graph, frozen params
# ---------------------------------------------------------------------------------------------------------------------


def _chain(
    op_rms: Callable,
    op_add: Callable,
    op_ln: Callable,
    a: torch.Tensor,
    c: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    g: list[torch.Tensor],
) -> torch.Tensor:
    """A loss through all three ops whose inputs come from ops that save their outputs (exp, tanh) and in which
    add_rms_norm's s feeds both the loss and a second norm."""
    x = a.exp()  # exp saves its output: the norm must not write into x
    r = torch.tanh(c)
    y, s = op_add(x, r, w, 1e-6, 1.0)
    z = op_ln(s, w, b, 1e-5)
    v = op_rms(x, w, 1e-6, 0.0)
    return (y * g[0]).sum() + (s * g[1]).sum() + (z * g[2]).sum() + (v * g[3]).sum() + s.pow(2).sum()


def test_inputs_from_differentiable_ops_and_s_used_twice(device: torch.device) -> None:
    torch.manual_seed(8)
    a, c = torch.randn(2, 3, 33, device=device) * 0.5, torch.randn(2, 3, 33, device=device)
    w, b = torch.randn(33, device=device), torch.randn(33, device=device)
    g = [torch.randn(2, 3, 33, device=device) for _ in range(4)]
    leaves = [t.clone().requires_grad_() for t in (a, c, w, b)]
    with use_backend("triton"):
        loss = _chain(rms_norm, add_rms_norm, layer_norm, *leaves, g)
    grads = torch.autograd.grad(loss, leaves)
    leaves64 = [t.double().requires_grad_() for t in (a, c, w, b)]
    ref_loss = _chain(rms_norm_torch, add_rms_norm_torch, layer_norm_torch, *leaves64, [t.double() for t in g])
    ref_grads = torch.autograd.grad(ref_loss, leaves64)
    torch.testing.assert_close(loss.double(), ref_loss, **FP32_TOL)
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), ref, **FP32_TOL)


def test_retain_graph_second_backward(device: torch.device) -> None:
    """A second backward over the retained graph adds exactly the same gradients again."""
    torch.manual_seed(9)
    a, c = torch.randn(3, 20, device=device) * 0.5, torch.randn(3, 20, device=device)
    w, b = torch.randn(20, device=device), torch.randn(20, device=device)
    g = [torch.randn(3, 20, device=device) for _ in range(4)]
    leaves = [t.clone().requires_grad_() for t in (a, c, w, b)]
    with use_backend("triton"):
        loss = _chain(rms_norm, add_rms_norm, layer_norm, *leaves, g)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    loss.backward()
    leaves64 = [t.double().requires_grad_() for t in (a, c, w, b)]
    ref_grads = torch.autograd.grad(
        _chain(rms_norm_torch, add_rms_norm_torch, layer_norm_torch, *leaves64, [t.double() for t in g]), leaves64
    )
    for leaf, once, ref in zip(leaves, first, ref_grads, strict=True):
        torch.testing.assert_close(once.double(), ref, **FP32_TOL)
        torch.testing.assert_close(leaf.grad, 2 * once, **FP32_TOL)


@pytest.mark.parametrize("used", ["y", "s"])
def test_add_rms_norm_one_output_unused(device: torch.device, used: str) -> None:
    """Only y used: dx = dresidual = the RMSNorm backward alone. Only s used: the add passes its gradient
    through to x and residual, and weight gets no gradient."""
    torch.manual_seed(10)
    x, r, w = torch.randn(5, 24, device=device), torch.randn(5, 24, device=device), torch.randn(24, device=device)
    g = torch.randn(5, 24, device=device)
    results = []
    for backend, dt in (("triton", torch.float32), ("torch", torch.float64)):
        leaves = [t.to(dt, copy=True).requires_grad_() for t in (x, r, w)]
        with use_backend(backend):
            y, s = add_rms_norm(*leaves, offset=1.0)
        ((y if used == "y" else s) * g.to(dt)).sum().backward()
        results.append([t.grad for t in leaves])
    (dx, dr, dw), (ref_dx, ref_dr, ref_dw) = results
    torch.testing.assert_close(dx.double(), ref_dx, **FP32_TOL)
    torch.testing.assert_close(dr.double(), ref_dr, **FP32_TOL)
    if used == "y":
        torch.testing.assert_close(dw.double(), ref_dw, **FP32_TOL)
    else:
        torch.testing.assert_close(dx, g)
        assert dw is None and ref_dw is None


def test_frozen_parameters(device: torch.device) -> None:
    """Parameters that do not require grad get none (the kernel skips their reduction); dx and the parameters
    that do require grad are unaffected."""
    torch.manual_seed(11)
    x, g = torch.randn(6, 18, device=device), torch.randn(6, 18, device=device)
    w, b = torch.randn(18, device=device), torch.randn(18, device=device)
    xl, bl = x.clone().requires_grad_(), b.clone().requires_grad_()
    with use_backend("triton"):
        ((layer_norm(xl, w, bl) + rms_norm(xl, w)) * g).sum().backward()
    x64, b64 = x.double().requires_grad_(), b.double().requires_grad_()
    ((layer_norm_torch(x64, w.double(), b64) + rms_norm_torch(x64, w.double())) * g.double()).sum().backward()
    torch.testing.assert_close(xl.grad.double(), x64.grad, **FP32_TOL)
    torch.testing.assert_close(bl.grad.double(), b64.grad, **FP32_TOL)


# ---------------------------------------------------------------------------------------------------------------------
# Layouts: strided rows, broadcast gradients, permuted batches, empty inputs
# ---------------------------------------------------------------------------------------------------------------------


def test_non_contiguous_inputs_and_broadcast_grads(device: torch.device) -> None:
    torch.manual_seed(12)
    w, b = torch.randn(24, device=device), torch.randn(24, device=device)
    wide = torch.randn(4, 5, 40, device=device)
    sliced = wide[..., 3:27]  # rows 40 apart: passed to the kernel as a row stride, not copied
    permuted = torch.randn(5, 4, 24, device=device).transpose(0, 1)  # leading dims do not collapse to one stride
    for x in (sliced, permuted):
        _check_against_twin(rms_norm, rms_norm_torch, [x, w], offset=1.0)
        _check_against_twin(add_rms_norm, add_rms_norm_torch, [x, permuted, w])
        _check_against_twin(layer_norm, layer_norm_torch, [x, w, b])
    # y.sum() sends back an expanded gradient with all-zero strides.
    xl = sliced.clone().requires_grad_()
    with use_backend("triton"):
        rms_norm(xl, w).sum().backward()
    x64 = sliced.double().requires_grad_()
    rms_norm_torch(x64, w.double()).sum().backward()
    torch.testing.assert_close(xl.grad.double(), x64.grad, **FP32_TOL)


def test_empty_batch(device: torch.device) -> None:
    x, w = torch.randn(0, 3, 8, device=device, requires_grad=True), torch.randn(8, device=device, requires_grad=True)
    with use_backend("triton"):
        y, s = add_rms_norm(x, x, w)
        (y.sum() + s.sum() + layer_norm(x, w, None).sum()).backward()
    assert y.shape == s.shape == (0, 3, 8) and x.grad.shape == (0, 3, 8)
    assert torch.equal(w.grad, torch.zeros(8, device=device))


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: rms_norm(torch.randn(2, 4), torch.randn(5)), "weight has shape (5,) but x has last dimension 4"),
        (lambda: rms_norm(torch.randn(2, 4), torch.randn(1, 4)), "weight has shape (1, 4) but x has last dimension 4"),
        (lambda: rms_norm(torch.ones(2, 4, dtype=torch.int64), torch.randn(4)), "x has dtype torch.int64"),
        (lambda: rms_norm(torch.randn(2, 0), torch.randn(0)), "non-empty last dimension, got shape (2, 0)"),
        (
            lambda: add_rms_norm(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4)),
            "x (2, 4) and residual (3, 4) must have the same shape",
        ),
        (lambda: add_rms_norm(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3)), "weight has shape (3,)"),
        (
            lambda: add_rms_norm(torch.randn(2, 4), torch.ones(2, 4, dtype=torch.int32), torch.randn(4)),
            "residual has dtype torch.int32",
        ),
        (lambda: layer_norm(torch.randn(2, 4), torch.randn(4), torch.randn(3)), "bias has shape (3,) but x has last"),
        (lambda: layer_norm(torch.randn(2, 4), torch.randn(6), None), "weight has shape (6,) but x has last dimension"),
        (lambda: layer_norm(torch.ones(2, 4, dtype=torch.uint8), torch.randn(4), None), "x has dtype torch.uint8"),
    ],
)
def test_bad_inputs_raise(call: Callable, message: str) -> None:
    with use_backend("triton"), pytest.raises(ValueError, match=re.escape(message)):
        call()


# ---------------------------------------------------------------------------------------------------------------------
# GPU: bf16 kernels against the fp32 twin at model-like sizes (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------------------------


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 512, 4096), (4096, 128), (256, 12288), (64, 20000)])
def test_bf16_against_fp32_twin_gpu(shape: tuple[int, ...]) -> None:
    """Wide model rows, qk-norm-like narrow rows packed into tiles, and rows wider than the default max block
    (column loop). bf16 activations, fp32 params; errors relative to the fp32 twin at bf16 level."""
    torch.manual_seed(13)
    n = shape[-1]
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(n, device="cuda") * 0.1, torch.randn(n, device="cuda")
    cases = [
        (rms_norm, rms_norm_torch, [x, w], {"offset": 1.0}),
        (add_rms_norm, add_rms_norm_torch, [x, r, w], {}),
        (layer_norm, layer_norm_torch, [x, w, b], {}),
    ]
    for op, twin, args, kwargs in cases:
        with use_backend("triton"):
            outs, grad_outs, grads = _forward_backward(op, args, kwargs)
        args32 = [a.float() for a in args]
        ref_outs, _, ref_grads = _forward_backward(twin, args32, kwargs, [g.float() for g in grad_outs])
        for got, ref in zip(outs + grads, ref_outs + ref_grads, strict=True):
            assert _rel_err(got, ref) < 1e-2, (op.__name__, shape, _rel_err(got, ref))


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_twin_backward_is_the_derivative(offset):
    """The twin keeps x and rstd for backward and differentiates by hand: check it numerically (fp64)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm_torch(x, w, 1e-6, offset), (x, w))
    assert torch.autograd.gradcheck(lambda x, w: add_rms_norm_torch(x, x.flip(-1), w, 1e-6, offset)[0], (x, w))
