"""The down projection of an MLP with its activation fused in: ``F.linear(act(gate) * up, weight, bias)``.

An MLP's largest activations are (tokens x intermediate) tensors. Autograd through ``proj(swiglu(g, u))``
keeps three of them for backward: ``g`` and ``u`` (for the GLU's gradient) and the product ``p = act(g) * u``
(for the projection's weight gradient). :func:`glu_linear` keeps only ``g`` and ``u`` and recomputes ``p`` in
backward with the same kernel that made it in forward, one elementwise pass next to three matmuls, so a
block holds a third less MLP activation at no measurable cost in speed (tutorials/kernels.md).

``up=None`` is the ungated MLP (GPT-2, GPT-NeoX): ``F.linear(gelu(gate), weight, bias)`` keeps only ``gate``.

Activations: ``"silu"`` (SwiGLU), ``"gelu_tanh"`` (GeGLU with the tanh approximation, gelu_pytorch_tanh) and
``"gelu"`` (exact erf). The GLU product runs on the Triton kernels of :mod:`litliger.kernels.glu` or their
twins, as the backend picks; the ungated gelu and the matmuls are PyTorch. Under autocast the matmuls run in
the autocast dtype as ``F.linear`` would, and the weight's gradient comes back in the weight's dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ._checks import check_float, check_same_device, compute_dtype
from .backend import use_triton
from .glu import _GELU_ERF, _GELU_TANH, _SILU, _check, _glu_bwd, _glu_fwd, geglu, swiglu

ACTIVATIONS = {"silu": _SILU.value, "gelu_tanh": _GELU_TANH.value, "gelu": _GELU_ERF.value}
_GELU_MODES = {_GELU_TANH.value: "tanh", _GELU_ERF.value: "none"}


def _act_torch(x: torch.Tensor, activation: int) -> torch.Tensor:
    return F.silu(x) if activation == _SILU.value else F.gelu(x, approximate=_GELU_MODES[activation])


def _product(gate: torch.Tensor, up: torch.Tensor | None, activation: int, triton: bool) -> torch.Tensor:
    """``act(gate) * up`` (or ``act(gate)``) in gate's dtype, computed as the unfused ops compute it."""
    if up is None:
        return _act_torch(gate, activation)
    if triton:
        return _glu_fwd(gate, up, activation)
    dt = compute_dtype(gate, up)
    return _act_torch(gate.to(dt), activation).mul_(up.to(dt)).to(gate.dtype)  # one buffer, not two


def _input_grads(
    d: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor | None,
    activation: int,
    triton: bool,
    act: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(d_gate, d_up)`` for ``act(gate) * up`` from the product's gradient ``d``, which this overwrites: it is
    the caller's temporary, and reusing it (and the activation's buffer, ``act`` if the caller has it) keeps
    backward at two extra (tokens x intermediate) buffers instead of five."""
    if up is None:  # ungated: d_gate = d * act'(gate), written over d
        return _act_backward(d, gate, activation), None
    if triton:
        reuse = d.dtype == gate.dtype and d.is_contiguous()
        return _glu_bwd(d, gate, up, activation, d_gate_out=d if reuse else None)
    dt = compute_dtype(gate, up)
    g, u, d = gate.to(dt), up.to(dt), d.to(dt)
    a = _act_torch(g, activation) if act is None else act
    d_up = a.mul_(d).to(up.dtype)  # d * act(g)
    d_gate = _act_backward(d.mul_(u), g, activation)  # (d * u) * act'(g)
    return d_gate.to(gate.dtype), d_up


def _act_backward(d: torch.Tensor, x: torch.Tensor, activation: int) -> torch.Tensor:
    """``d * act'(x)`` by aten's fused derivative (one pass), written over ``d``."""
    if activation == _SILU.value:
        return torch.ops.aten.silu_backward.grad_input(d, x, grad_input=d)
    return torch.ops.aten.gelu_backward.grad_input(d, x, approximate=_GELU_MODES[activation], grad_input=d)


class GLULinearFunction(torch.autograd.Function):
    """``F.linear(act(gate) * up, weight, bias)``; saves gate, up and the weight, recomputes the product."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, activation: int, triton: bool, cast: torch.dtype | None):
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        p = _product(gate, up, activation, triton)
        if cast is not None:  # autocast: the matmul in its dtype, as F.linear under autocast
            p, weight = p.to(cast), weight.to(cast)
            bias = bias.to(cast) if bias is not None else None
        with torch.autocast(gate.device.type, enabled=False) if cast is not None else contextlib.nullcontext():
            y = F.linear(p, weight, bias)
        ctx.activation, ctx.triton, ctx.has_bias = activation, triton, bias is not None
        ctx.save_for_backward(gate, up, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        need_w = ctx.needs_input_grad[2]
        need_b = ctx.has_bias and ctx.needs_input_grad[3]
        need_in = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dy2 = dy.reshape(-1, dy.shape[-1])
        d_weight = d_bias = d_gate = d_up = None
        if need_b:
            d_bias = dy2.sum(0).to(ctx.bias_dtype)
        act = None  # the twin's act(gate), kept from the product for d_up (one activation pass fewer)
        if need_w:  # the product lives only for this matmul
            if up is not None and not ctx.triton:
                dt = compute_dtype(gate, up)
                act = _act_torch(gate.to(dt), ctx.activation)
                p = (act * up.to(dt)).to(gate.dtype)
            else:
                p = _product(gate, up, ctx.activation, ctx.triton)
            d_weight = (dy2.t() @ p.reshape(-1, p.shape[-1]).to(dy.dtype)).to(ctx.weight_dtype)
            del p
        if need_in:
            d_p = (dy2 @ weight.to(dy.dtype)).view(*dy.shape[:-1], weight.shape[1])
            d_gate, d_up = _input_grads(d_p, gate, up, ctx.activation, ctx.triton, act)
        return d_gate, d_up, d_weight, d_bias, None, None, None


def glu_linear(
    gate: torch.Tensor,
    up: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """``F.linear(act(gate) * up, weight, bias)`` (``act(gate)`` when ``up`` is None), holding only ``gate``,
    ``up`` and ``weight`` for backward: the product is recomputed there instead of kept (module docstring).

    ``gate`` and ``up`` are (..., I), ``weight`` (out, I), ``bias`` (out,). Without grad, or while
    ``torch.compile`` traces, this is the plain composition (the compiler picks what to keep).
    """
    op = "glu_linear"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation={activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if up is None:
        check_float("gate", gate, op)
    else:
        _check(op, gate, up)
    check_float("weight", weight, op)
    if weight.dim() != 2 or weight.shape[1] != gate.shape[-1]:
        raise ValueError(
            f"{op}: weight has shape {tuple(weight.shape)} but gate has last dimension {gate.shape[-1]}; "
            f"expected weight of shape (out_features, {gate.shape[-1]})"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    check_same_device(op, gate=gate, up=up, weight=weight, bias=bias)
    act = ACTIVATIONS[activation]
    triton = up is not None and use_triton(gate)
    needs_grad = any(t is not None and t.requires_grad for t in (gate, up, weight, bias))
    if not (torch.is_grad_enabled() and needs_grad) or torch.compiler.is_compiling():
        return F.linear(glu_linear_input(gate, up, activation), weight, bias)
    device = gate.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    cast = torch.get_autocast_dtype(device) if autocast else None
    return GLULinearFunction.apply(gate, up, weight, bias, act, triton, cast)


def glu_linear_input(gate: torch.Tensor, up: torch.Tensor | None, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` (``act(gate)`` when ``up`` is None) through the ordinary ops (:func:`swiglu`,
    :func:`geglu`, ``F.gelu``), for a consumer that needs the product itself."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"glu_linear: activation={activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    act = ACTIVATIONS[activation]
    if up is None:
        return _act_torch(gate, act)
    return swiglu(gate, up) if act == _SILU.value else geglu(gate, up, _GELU_MODES[act])
