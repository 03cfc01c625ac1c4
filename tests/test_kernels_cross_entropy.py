"""cross_entropy: the Triton kernels (interpreter on CPU, or CUDA) against the float64 twin; the twin against
torch.nn.functional.cross_entropy and the z-loss formula."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from litliger.kernels import cross_entropy, cross_entropy_torch, use_backend

# The package re-exports the op under the module's name, so the module is looked up explicitly.
ce_module = importlib.import_module("litliger.kernels.cross_entropy")
CrossEntropyFunction = ce_module.CrossEntropyFunction

ATOL, RTOL = 1e-5, 1e-4
IGNORE = -100


@pytest.fixture(autouse=True)
def small_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Vocabulary blocks of 32 columns, so every vocabulary here (V >= 77) is walked in several blocks."""
    monkeypatch.setattr(ce_module, "MAX_BLOCK", 32)


def make_case(shape: tuple[int, ...], vocab: int, device: torch.device, seed: int = 0, n_ignored: int = 3):
    """Pre-activations ``a`` (logits = tanh(a) * 30, up to +-30) and targets with ``n_ignored`` ignored rows."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, vocab, generator=gen)
    t = torch.randint(0, vocab, shape, generator=gen)
    flat = t.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:n_ignored]] = IGNORE
    return a.to(device), t.to(device)


def run_both(a, t, reduction, label_smoothing=0.0, z_loss=0.0, to_logits=lambda a: torch.tanh(a) * 30):
    """Loss and grad w.r.t. ``a`` for the Triton op in fp32 and the twin in fp64 (same random upstream grad).

    The logits come from ``torch.tanh`` (which saves its output for its own backward): the op must not write
    into them, or tanh's backward (and the grad of ``a``) would be wrong.
    """
    out = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        leaf = a.detach().to(dtype).requires_grad_()
        with use_backend(backend):
            loss = cross_entropy(to_logits(leaf), t, IGNORE, reduction, label_smoothing, z_loss)
        up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 1.5
        (loss * up.to(loss.device, loss.dtype)).sum().backward()
        out[backend] = (loss, leaf.grad)
    return out["triton"], out["torch"]


def assert_matches(got, want):
    (loss, grad), (loss64, grad64) = got, want
    assert loss.dtype == torch.float32 and loss.shape == loss64.shape
    torch.testing.assert_close(loss.double(), loss64, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(grad.double(), grad64, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing,z", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 0.01)])
def test_triton_matches_twin(device, reduction, smoothing, z):
    a, t = make_case((3, 5), 77, device)  # 3-D logits, V = 77: three blocks of 32, the last one partial
    assert_matches(*run_both(a, t, reduction, smoothing, z))


@pytest.mark.parametrize(
    "shape,vocab,n_ignored",
    [((1,), 300, 0), ((6,), 2, 1), ((4,), 1, 0), ((2, 3, 2), 45, 2)],
    ids=["single-row-V300", "V2", "V1", "4-D"],
)
def test_triton_awkward_shapes(device, shape, vocab, n_ignored):
    a, t = make_case(shape, vocab, device, n_ignored=n_ignored)
    assert_matches(*run_both(a, t, "mean", 0.1, 1e-3))


def test_strided_logits_are_read_in_place(device):
    """A (B, T-1, V) slice of (B, T, V) logits (the usual shift for next-token loss) and a transposed view."""
    a, t = make_case((2, 6), 50, device)
    t = t[:, 1:]  # (2, 5)
    assert_matches(*run_both(a, t, "none", 0.1, 1e-3, to_logits=lambda a: (torch.tanh(a) * 30)[:, :-1]))
    at = a.reshape(12, 50).T.contiguous()  # (V, N): its transpose has a strided vocabulary dim
    t2 = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(3)).to(device)
    assert_matches(*run_both(at, t2, "sum", 0.0, 0.0, to_logits=lambda a: (a * 10).T))


def test_all_rows_ignored(device):
    a, t = make_case((5,), 90, device, n_ignored=5)
    for reduction in ("mean", "sum", "none"):
        (loss, grad), (loss64, grad64) = run_both(a, t, reduction, 0.1, 1e-3)
        assert torch.all(loss == 0) and torch.all(grad == 0)
        assert torch.all(loss64 == 0)


def test_retain_graph_second_backward_is_correct(device):
    a, t = make_case((9,), 100, device)
    for reduction in ("mean", "none"):
        leaf = a.clone().requires_grad_()
        with use_backend("triton"):
            loss = cross_entropy(torch.tanh(leaf) * 30, t, IGNORE, reduction, 0.1, 1e-3).sum()
        loss.backward(retain_graph=True)
        first = leaf.grad.clone()
        loss.backward()
        torch.testing.assert_close(leaf.grad, 2 * first, atol=1e-6, rtol=1e-6)
        assert first.abs().max() > 1e-3


def test_no_grad_forward_and_int32_targets(device):
    a, t = make_case((7,), 80, device)
    with torch.no_grad(), use_backend("triton"):
        loss = cross_entropy(torch.tanh(a) * 30, t.to(torch.int32), IGNORE, "sum", 0.1)
    loss64 = cross_entropy_torch(torch.tanh(a.double()) * 30, t, IGNORE, "sum", 0.1)
    torch.testing.assert_close(loss.double(), loss64, atol=ATOL, rtol=RTOL)


def test_out_of_range_targets_give_nan_rows_without_crashing(device):
    """On CUDA the range check would cost a host sync, so the kernel itself must cope: NaN loss for the row,
    zero gradient, the target never used as an address. The CPU validation is bypassed here."""
    vocab = 64
    a, t = make_case((6,), vocab, device, n_ignored=1)
    t[1], t[4] = vocab + 1000, -7
    logits = (torch.tanh(a) * 30).requires_grad_()
    with use_backend("triton"):
        rows = CrossEntropyFunction.apply(logits, t, IGNORE, "none", 0.0, 0.0)
        mean = CrossEntropyFunction.apply(logits, t, IGNORE, "mean", 0.0, 0.0)
    assert torch.isnan(rows[[1, 4]]).all() and torch.isfinite(rows[[0, 2, 3, 5]]).all()
    assert torch.isnan(mean)
    ok = torch.tensor([0, 2, 3, 5])
    want = cross_entropy_torch(logits.detach().double()[ok], t[ok], IGNORE, "none")
    torch.testing.assert_close(rows[ok].double(), want, atol=ATOL, rtol=RTOL)
    (grad,) = torch.autograd.grad(rows, logits, torch.ones_like(rows))  # upstream 1 on the NaN rows too
    assert torch.isfinite(grad).all() and torch.all(grad[[1, 4]] == 0) and grad[[0, 2, 3, 5]].abs().max() > 0.1


def test_bad_inputs_raise():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"out of range, e\.g\. value \[10, -3\] at flat positions \[1, 3\]"):
        cross_entropy(logits, torch.tensor([0, 10, IGNORE, -3]))
    with pytest.raises(ValueError, match="integer tensor.*torch.float32"):
        cross_entropy(logits, torch.zeros(4))
    with pytest.raises(ValueError, match=r"targets has shape \(4, 1\) but the input has \(4,\) rows"):
        cross_entropy(logits, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction='avg'"):
        cross_entropy(logits, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing=1.5"):
        cross_entropy(logits, torch.zeros(4, dtype=torch.long), label_smoothing=1.5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_twin_matches_torch_functional(reduction):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 37, dtype=torch.float64, generator=gen) * 4
    t = torch.randint(0, 37, (3, 4), generator=gen)
    t[0, 1] = t[2, 3] = IGNORE
    for e in (0.0, 0.15):
        got = cross_entropy_torch(x, t, IGNORE, reduction, label_smoothing=e)
        ref = F.cross_entropy(x.permute(0, 2, 1), t, ignore_index=IGNORE, reduction=reduction, label_smoothing=e)
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    # z-loss adds z * logsumexp^2 on the non-ignored rows
    z = 0.01
    extra = cross_entropy_torch(x, t, IGNORE, "none", z_loss=z) - cross_entropy_torch(x, t, IGNORE, "none")
    want = torch.where(t != IGNORE, z * torch.logsumexp(x, -1) ** 2, 0.0)
    torch.testing.assert_close(extra, want, atol=1e-12, rtol=1e-12)
    assert cross_entropy_torch(x, torch.full_like(t, IGNORE), IGNORE, "mean") == 0  # not NaN like PyTorch


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_on_gpu_matches_fp32_twin(reduction):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 32000, generator=gen) * 5).cuda()
    t = torch.randint(0, 32000, (64,), generator=gen).cuda()
    t[::7] = IGNORE
    xb = x.bfloat16().requires_grad_()
    xf = xb.detach().float().requires_grad_()
    with use_backend("triton"):
        loss = cross_entropy(xb, t, IGNORE, reduction, 0.1, 1e-4)
    ref = cross_entropy_torch(xf, t, IGNORE, reduction, 0.1, 1e-4)
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-3)
    loss.sum().backward()
    ref.sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xb.grad.float(), xf.grad, atol=2e-3 / 64 if reduction == "mean" else 2e-3, rtol=2e-2)
