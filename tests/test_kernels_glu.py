"""swiglu / geglu: Triton kernels (interpreter on CPU, or CUDA) against the float64 twins; twins against formulas."""

import math

import pytest
import torch

from litliger.kernels import geglu, geglu_torch, swiglu, swiglu_torch, use_backend

ATOL, RTOL = 1e-5, 1e-4

# (name, op, twin): geglu in both of its modes
OPS = [
    ("swiglu", swiglu, swiglu_torch),
    ("geglu_tanh", lambda g, u: geglu(g, u, "tanh"), lambda g, u: geglu_torch(g, u, "tanh")),
    ("geglu_erf", lambda g, u: geglu(g, u, approximate="none"), lambda g, u: geglu_torch(g, u, approximate="none")),
]
OP_IDS = [name for name, _, _ in OPS]

# Large |gate| where exp-based sigmoid/tanh overflow if written naively, and the region where the derivative
# of gelu has its bump; every test input gets these in its first elements.
EXTREMES = torch.tensor([30.0, -30.0, 88.0, -88.0, 1e4, -1e4, 4.0, -4.0, 0.0, -0.7])


def gate_values(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    g = 3 * torch.randn(shape, generator=gen)
    n = min(g.numel(), EXTREMES.numel())
    g.view(-1)[:n] = EXTREMES[:n]
    return g


def test_twins_match_hand_formulas():
    x = torch.linspace(-12, 12, 97, dtype=torch.float64)
    u = torch.randn(97, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    silu = x / (1 + torch.exp(-x))
    gelu_tanh = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    gelu_erf = torch.tensor([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(swiglu_torch(x, u), silu * u, atol=1e-12, rtol=0)
    torch.testing.assert_close(geglu_torch(x, u, "tanh"), gelu_tanh * u, atol=1e-12, rtol=0)
    torch.testing.assert_close(geglu_torch(x, u, "none"), gelu_erf * u, atol=1e-12, rtol=0)
    assert (gelu_tanh - gelu_erf).abs().max() > 1e-5  # the two geglu modes really differ


def check_against_twin(op, twin, leaves, build, gen):
    """``op(*build(*leaves))`` in fp32 on the Triton backend vs ``twin`` in fp64: output and every leaf grad."""
    results = []
    dy = None
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        ls = [leaf.detach().to(dtype, copy=True).requires_grad_() for leaf in leaves]
        fn = op if backend == "triton" else twin
        with use_backend(backend):
            y = fn(*build(*ls))
        if dy is None:
            dy = torch.randn(y.shape, generator=gen)
        y.backward(dy.to(dtype))
        results.append([y.detach()] + [leaf.grad for leaf in ls])
    for got, want in zip(*results, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shape", [(1,), (7,), (1000,), (3, 5, 7), (2, 1100)], ids=str)
@pytest.mark.parametrize(("name", "op", "twin"), OPS, ids=OP_IDS)
def test_kernel_matches_float64_twin(name, op, twin, shape):
    gen = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    leaves = [gate_values(shape, gen), torch.randn(shape, generator=gen)]
    check_against_twin(op, twin, leaves, lambda g, u: (g, u), gen)


@pytest.mark.parametrize(("name", "op", "twin"), OPS, ids=OP_IDS)
def test_inputs_from_ops_that_save_their_output(name, op, twin):
    """gate = exp(a) and up = tanh(b), both of which save their output (our input) for their own backward."""
    gen = torch.Generator().manual_seed(1)
    leaves = [torch.randn(4, 9, generator=gen), torch.randn(4, 9, generator=gen)]
    check_against_twin(op, twin, leaves, lambda a, b: (a.exp() - 2.0, torch.tanh(b)), gen)


@pytest.mark.parametrize(("name", "op", "twin"), OPS, ids=OP_IDS)
def test_chunks_of_a_fused_projection(name, op, twin):
    """gate, up = linear(x, W).chunk(2): row-strided views read in place; grads checked back to x and W."""
    gen = torch.Generator().manual_seed(2)
    leaves = [torch.randn(2, 3, 8, generator=gen), torch.randn(2 * 1030, 8, generator=gen) / 8**0.5]
    x = leaves[0].clone()
    gate, up = torch.nn.functional.linear(x, leaves[1]).chunk(2, dim=-1)
    assert not gate.is_contiguous() and gate.stride(-1) == 1  # the layout this test is about
    check_against_twin(op, twin, leaves, lambda x, w: torch.nn.functional.linear(x, w).chunk(2, dim=-1), gen)


@pytest.mark.parametrize(("name", "op", "twin"), OPS, ids=OP_IDS)
def test_transposed_and_broadcast_inputs(name, op, twin):
    """A transposed gate (no row view exists: copied) and an up expanded from one row (row stride 0)."""
    gen = torch.Generator().manual_seed(3)
    leaves = [torch.randn(13, 5, generator=gen), torch.randn(13, generator=gen)]
    check_against_twin(op, twin, leaves, lambda g, u: (g.t(), u.expand(5, 13)), gen)


@pytest.mark.parametrize(("name", "op", "twin"), OPS, ids=OP_IDS)
def test_retain_graph_second_backward_accumulates(name, op, twin):
    gen = torch.Generator().manual_seed(4)
    gate = gate_values((3, 7), gen).requires_grad_()
    up = torch.randn(3, 7, generator=gen).requires_grad_()
    with use_backend("triton"):
        y = op(gate, up)
    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy, retain_graph=True)
    first = gate.grad.clone(), up.grad.clone()
    y.backward(dy)
    torch.testing.assert_close(gate.grad, 2 * first[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(up.grad, 2 * first[1], atol=ATOL, rtol=RTOL)
    assert first[0].abs().max() > 0 and first[1].abs().max() > 0


@pytest.mark.parametrize(("name", "op", "twin"), OPS, ids=OP_IDS)
def test_create_graph_raises_a_clear_error(name, op, twin):
    """Higher-order gradients through the kernel's backward are refused, not silently wrong."""
    gate = torch.randn(5, requires_grad=True)
    up = torch.randn(5, requires_grad=True)
    with use_backend("triton"):
        y = op(gate, up)
    with pytest.raises(RuntimeError, match=f"{name.split('_')[0]}: the Triton backward cannot be differentiated"):
        torch.autograd.grad(y.sum(), gate, create_graph=True)


def test_empty_input():
    gate = torch.randn(0, 4, requires_grad=True)
    up = torch.randn(0, 4, requires_grad=True)
    with use_backend("triton"):
        y = geglu(gate, up)
    y.sum().backward()
    assert y.shape == (0, 4) and gate.grad.shape == (0, 4)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: swiglu(torch.randn(3, 4), torch.randn(3, 5)), r"gate \(3, 4\) and up \(3, 5\) must have the same"),
        (lambda: geglu(torch.randn(2, 6), torch.randn(6)), r"gate \(2, 6\) and up \(6,\) must have the same shape"),
        (lambda: geglu(torch.randn(4), torch.randn(4), approximate="fast"), r"approximate='fast'.*'tanh', 'none'"),
        (lambda: swiglu(torch.randn(4), torch.randn(4).double()), r"gate \(torch.float32\) and up \(torch.float64\)"),
    ],
    ids=["shape", "broadcast", "approximate", "dtype"],
)
def test_bad_inputs_raise(call, match):
    with use_backend("triton"), pytest.raises(ValueError, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("name", "op", "twin"), OPS, ids=OP_IDS)
def test_gpu_half_precision_against_fp32_twin(device, dtype, name, op, twin):
    gen = torch.Generator().manual_seed(5)
    # Both runs see the same half-precision-representable inputs (+-1e4 is out of fp16's range).
    g0 = gate_values((4, 37, 1100), gen).clamp(-60, 60).to(dtype).float()
    u0 = torch.randn(4, 37, 1100, generator=gen).to(dtype).float()
    dy = torch.randn(4, 37, 1100, generator=gen).to(device)
    results = []
    for backend, dt in (("triton", dtype), ("torch", torch.float32)):
        g = g0.to(device, dt).requires_grad_()
        u = u0.to(device, dt).requires_grad_()
        with use_backend(backend):
            y = (op if backend == "triton" else twin)(g, u)
        y.float().backward(dy)
        results.append((y.float(), g.grad.float(), u.grad.float()))
    tol = {"atol": 3e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 3e-3, "rtol": 2e-3}
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_swiglu_twin_backward_is_the_derivative():
    """The twin keeps only gate and up for backward and differentiates by hand: check it numerically (fp64)."""
    gen = torch.Generator().manual_seed(3)
    gate = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_torch, (gate, up))
    assert type(swiglu_torch(gate, up).grad_fn).__name__ == "_SwiGLUTwinBackward"
