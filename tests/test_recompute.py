"""What a block holds for backward: glu_linear (the MLP's down projection without its input product) and the
norm outputs rebuilt in backward (litliger/nn/recompute.py). Values against float64 references, gradients
bitwise against the same model without the recompute."""

import itertools
import weakref

import pytest
import torch
import torch.nn.functional as F
from test_model import FAMILIES, tiny_config

import litliger.model.gpt as model_module
from litliger import GPT
from litliger.kernels import geglu, glu_linear, rms_norm, swiglu, use_backend
from litliger.nn import GeGLUMLP, GeluMLP, SwiGLUMLP
from litliger.nn.recompute import recomputed

ACTS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


def composition(gate, up, weight, bias, activation):
    a = ACTS[activation](gate)
    return F.linear(a * up if up is not None else a, weight, bias)


@pytest.mark.parametrize(
    ("backend", "activation", "gated", "bias"),
    list(itertools.product(["torch", "triton"], ACTS, [True, False], [True, False])),
)
def test_glu_linear_matches_float64_composition(backend, activation, gated, bias):
    gen = torch.Generator().manual_seed(0)
    g = 3 * torch.randn(2, 5, 24, generator=gen, dtype=torch.float64)
    u = torch.randn(2, 5, 24, generator=gen, dtype=torch.float64) if gated else None
    w = torch.randn(7, 24, generator=gen, dtype=torch.float64) / 5
    b = torch.randn(7, generator=gen, dtype=torch.float64) if bias else None
    dy = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    results = []
    for dtype in (torch.float64, torch.float32):
        leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (g, u, w, b)]
        if dtype == torch.float64:
            y = composition(*leaves, activation)
        else:
            with use_backend(backend):
                y = glu_linear(*leaves, activation)
            assert type(y.grad_fn).__name__ == "GLULinearFunctionBackward"
        y.backward(dy.to(dtype))
        results.append([y] + [t.grad for t in leaves if t is not None])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


def test_glu_linear_holds_gate_up_and_weight_only():
    """Autograd through proj(swiglu(g, u)) keeps g, u and the product; glu_linear keeps g, u and the weight."""
    gen = torch.Generator().manual_seed(1)
    g, u = (torch.randn(4, 64, 96, generator=gen, requires_grad=True) for _ in range(2))
    w = torch.randn(32, 96, generator=gen, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = glu_linear(g, u, w, None, "silu")
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert storages == {t.untyped_storage().data_ptr() for t in (g, u, w)}
    y.sum().backward()  # and backward still works from those alone
    assert g.grad is not None and u.grad is not None and w.grad is not None


MLPS = {
    "swiglu": (lambda: SwiGLUMLP(32, 80, bias=True), lambda m, x: m.proj(swiglu(m.fc_1(x), m.fc_2(x)))),
    "geglu": (lambda: GeGLUMLP(32, 80, bias=False), lambda m, x: m.proj(geglu(m.fc_1(x), m.fc_2(x), "tanh"))),
    "gelu": (lambda: GeluMLP(32, 80, bias=True), lambda m, x: m.proj(F.gelu(m.fc(x)))),
}


@pytest.mark.parametrize("kind", MLPS)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_mlp_bitwise_equals_the_unfused_composition(kind, autocast):
    """Each MLP through glu_linear gives bitwise the values and gradients of its plain composition, e.g.
    proj(swiglu(fc_1(x), fc_2(x))), also under autocast (the matmul in bf16, the gradients in fp32)."""
    build, plain = MLPS[kind]
    mlp = build()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / 5)
    x = torch.randn(3, 8, 32, generator=gen)
    grads = []
    for fused in (True, False):
        mlp.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = mlp(x) if fused else plain(mlp, x)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        y.float().square().sum().backward()
        grads.append([y] + [p.grad for p in mlp.parameters()])
    assert type(grads[0][0].grad_fn).__name__ == "GLULinearFunctionBackward"
    assert all(g.dtype == torch.float32 for g in grads[0][1:])
    for got, want in zip(*grads, strict=True):
        assert torch.equal(got, want)


def test_glu_linear_bad_input():
    g, u = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"activation='relu'; choose one of silu, gelu_tanh, gelu"):
        glu_linear(g, u, torch.randn(4, 8), None, "relu")
    with pytest.raises(ValueError, match=r"weight has shape \(4, 6\) but gate has last dimension 8"):
        glu_linear(g, u, torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"bias has shape \(3,\); expected \(4,\)"):
        glu_linear(g, u, torch.randn(4, 8), torch.randn(3))


def test_recomputed_rebuilds_each_saved_view_once_and_bitwise():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 16, generator=gen, requires_grad=True)
    nw = torch.randn(16, generator=gen, requires_grad=True)
    w1, w2 = (torch.randn(8, 16, generator=gen, requires_grad=True) for _ in range(2))
    grads, calls = [], []

    def again():
        calls.append(1)
        return rms_norm(x, nw)

    for recompute in (False, True):
        h = rms_norm(x, nw)
        h_ref = weakref.ref(h)
        if recompute:
            with recomputed(h, again):
                y = F.linear(h, w1).sum() + F.linear(h[2:], w2).square().sum()  # h and a view of h
        else:
            y = F.linear(h, w1).sum() + F.linear(h[2:], w2).square().sum()
        del h
        assert (h_ref() is None) == recompute  # nothing in the graph holds the norm's output
        grads.append(torch.autograd.grad(y, (x, nw, w1, w2)))
    assert len(calls) == 1  # one rebuild shared by both consumers
    for got, want in zip(*grads, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_gradients_bitwise_equal_without_the_norm_recompute(family, monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(family)
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (2, 12))
    targets = torch.randint(0, config.vocab_size, (2, 12))
    real, calls = model_module.recomputed, []

    def counting(t, fn):
        return real(t, lambda: calls.append(1) or fn())

    def holding(t, fn):  # the model as it was: autograd keeps the norm outputs
        return torch.autograd.graph.saved_tensors_hooks(lambda s: s, lambda s: s)

    grads = []
    for variant in (counting, holding):
        monkeypatch.setattr(model_module, "recomputed", variant)
        model.zero_grad(set_to_none=True)
        model(idx, targets=targets).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == 2 * config.n_layer  # every block rebuilt both norm outputs in backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
