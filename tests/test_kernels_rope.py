"""rope: the Triton kernel (interpreter on CPU, or CUDA) against the float64 twin; the twin against a hand formula."""

import pytest
import torch

from litliger.kernels import rope, rope_torch, use_backend

ATOL, RTOL = 1e-5, 1e-4


def rope_cache(T: int, r: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A real GPT-NeoX/Llama cache: (T, r) cos and sin whose two halves are equal."""
    inv_freq = 1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def random_cache(T: int, r: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (T, r) cos/sin with unequal halves, stored transposed (non-contiguous, strides (1, T))."""
    cos = torch.randn(r, T, generator=gen).t()
    sin = torch.randn(r, T, generator=gen).t()
    return cos, sin


def rotate_by_hand(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Independent float64 formula: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 on the first r dims, rest copied."""
    r = cos.shape[-1]
    h = r // 2
    x, cos, sin = x.double(), cos.double(), sin.double()
    x1, x2, rest = x[..., :h], x[..., h:r], x[..., r:]
    y1 = x1 * cos[:, :h] - x2 * sin[:, :h]
    y2 = x2 * cos[:, h:] + x1 * sin[:, h:]
    return torch.cat((y1, y2, rest), dim=-1)


def rotate_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """For a real cache (equal halves): (x1 + i x2) * exp(i theta), the textbook rotary embedding."""
    r = cos.shape[-1]
    h = r // 2
    x = x.double()
    z = torch.complex(x[..., :h], x[..., h:r]) * torch.complex(cos[:, :h].double(), sin[:, :h].double())
    return torch.cat((z.real, z.imag, x[..., r:]), dim=-1)


def test_twin_matches_hand_formulas():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 12, generator=gen), torch.randn(2, 2, 5, 12, generator=gen)
    cos, sin = random_cache(5, 6, gen)
    q_out, k_out = rope_torch(q.double(), k.double(), cos.double(), sin.double())
    torch.testing.assert_close(q_out, rotate_by_hand(q, cos, sin), atol=1e-12, rtol=0)
    torch.testing.assert_close(k_out, rotate_by_hand(k, cos, sin), atol=1e-12, rtol=0)
    cos, sin = rope_cache(5, 8)
    q_out, k_out = rope_torch(q.double(), k.double(), cos.double(), sin.double())
    torch.testing.assert_close(q_out, rotate_complex(q, cos, sin), atol=1e-12, rtol=0)
    torch.testing.assert_close(k_out, rotate_complex(k, cos, sin), atol=1e-12, rtol=0)
    assert not torch.allclose(q_out[..., :8], q[..., :8].double(), atol=1e-3)  # it does rotate


def make_qk(layout: str, B: int, nh: int, nkv: int, T: int, hs: int, dtype: torch.dtype, gen: torch.Generator):
    """Leaves (one per run, so fp32 and fp64 runs get the same values) and a builder of q, k from them.

    - "contiguous": q, k are contiguous (B, heads, T, hs) leaves.
    - "transpose": (B, T, heads, hs) leaves transposed to (B, heads, T, hs) (the model's layout).
    - "fused_qkv": x -> linear(x, W) (B, T, (nh + 2 nkv) hs); q and k are slices of it, viewed and transposed;
      gradients are checked back through the linear layer, to x and W.
    """
    if layout == "fused_qkv":
        C = 8
        leaves = [torch.randn(B, T, C, generator=gen), torch.randn((nh + 2 * nkv) * hs, C, generator=gen) / C**0.5]

        def build(x, w):
            qkv = torch.nn.functional.linear(x, w)
            q = qkv[..., : nh * hs].view(B, T, nh, hs).transpose(1, 2)
            k = qkv[..., nh * hs : (nh + nkv) * hs].view(B, T, nkv, hs).transpose(1, 2)
            return q, k

    elif layout == "transpose":
        leaves = [torch.randn(B, T, nh, hs, generator=gen), torch.randn(B, T, nkv, hs, generator=gen)]

        def build(q, k):
            return q.transpose(1, 2), k.transpose(1, 2)

    else:
        leaves = [torch.randn(B, nh, T, hs, generator=gen), torch.randn(B, nkv, T, hs, generator=gen)]

        def build(q, k):
            return q, k

    return [leaf.to(dtype) for leaf in leaves], build


def run_both(leaves, build, fn, cotangents):
    """Run ``fn(*build(*leaves))`` in float32 on the Triton backend and float64 on the twin.

    Returns [(triton, float64)] pairs for each output and each leaf gradient.
    """
    results = []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        ls = [leaf.detach().to(dtype, copy=True).requires_grad_() for leaf in leaves]
        with use_backend(backend):
            outs = fn(*build(*ls))
        loss = sum((o.double() * c).sum() for o, c in zip(outs, cotangents, strict=True))
        loss.backward()
        results.append([o.detach() for o in outs] + [leaf.grad for leaf in ls])
    return list(zip(*results, strict=True))


# (B, n_head, n_kv, T, hs, r): GQA / MHA / MQA, partial and full rotary, awkward hs=12 with r=6, T=1,
# and (last) many heads with a long pass-through tail so both of the kernel's inner loops take several steps.
CASES = [
    (2, 4, 2, 5, 16, 4),
    (1, 3, 3, 1, 12, 6),
    (2, 4, 1, 3, 16, 16),
    (1, 2, 2, 4, 12, 12),
    (1, 40, 5, 2, 144, 8),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-nh{}-nkv{}-T{}-hs{}-r{}".format(*c))
@pytest.mark.parametrize("layout", ["contiguous", "transpose", "fused_qkv"])
def test_kernel_matches_float64_twin(case, layout):
    B, nh, nkv, T, hs, r = case
    gen = torch.Generator().manual_seed(CASES.index(case))
    leaves, build = make_qk(layout, B, nh, nkv, T, hs, torch.float32, gen)
    real = layout == "transpose"  # one layout with the real cache, the others with unequal halves
    cos, sin = rope_cache(T, r) if real else random_cache(T, r, gen)
    cot = [torch.randn(B, nh, T, hs, generator=gen).double(), torch.randn(B, nkv, T, hs, generator=gen).double()]

    def fn(q, k):
        # fp32 cache for the kernel, fp64 for the twin (the twin computes in fp64 only when an input is fp64)
        dt = q.dtype
        return rope(q, k, cos.to(dt), sin.to(dt))

    for got, want in run_both(leaves, build, fn, cot):
        torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)


def test_outputs_are_new_tensors_in_bthd_layout():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, 4, 16, generator=gen).transpose(1, 2)
    k = torch.randn(2, 5, 2, 16, generator=gen).transpose(1, 2)
    q0, k0 = q.clone(), k.clone()
    cos, sin = rope_cache(5, 4)
    with use_backend("triton"):
        q_out, k_out = rope(q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # inputs untouched
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert q_out.data_ptr() != q.data_ptr() and k_out.data_ptr() != k.data_ptr()
    # documented layout: stored as (B, T, heads, hs), returned as the (B, heads, T, hs) view
    assert q_out.transpose(1, 2).is_contiguous() and k_out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(q_out[..., 4:], q[..., 4:], atol=0, rtol=0)  # pass-through dims are exact copies


def test_rope_twice_on_output_of_an_op_that_saves_its_output():
    """rope(rope(exp(a))): the first rope's inputs are saved by exp, the second's come from the first rope."""
    gen = torch.Generator().manual_seed(2)
    B, nh, nkv, T, hs, r = 2, 4, 2, 3, 12, 6
    leaves = [torch.randn(B, T, nh, hs, generator=gen), torch.randn(B, T, nkv, hs, generator=gen)]
    cos1, sin1 = random_cache(T, r, gen)
    cos2, sin2 = rope_cache(T, r)
    cot = [torch.randn(B, nh, T, hs, generator=gen).double(), torch.randn(B, nkv, T, hs, generator=gen).double()]

    def build(a, b):
        return a.exp().transpose(1, 2), torch.tanh(b).transpose(1, 2)

    def fn(q, k):
        dt = q.dtype
        q, k = rope(q, k, cos1.to(dt), sin1.to(dt))
        return rope(q, k, cos2.to(dt), sin2.to(dt))

    for got, want in run_both(leaves, build, fn, cot):
        torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)


def test_inverse_rotation_round_trips():
    """With a real cache, rotating by -theta undoes rotating by theta (kernel forward only)."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 3, 6, 16, generator=gen), torch.randn(1, 1, 6, 16, generator=gen)
    cos, sin = rope_cache(6, 16)
    with use_backend("triton"):
        q1, k1 = rope(q, k, cos, sin)
        q2, k2 = rope(q1, k1, cos, -sin)
    assert (q1 - q).abs().max() > 0.1
    torch.testing.assert_close(q2, q, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(k2, k, atol=ATOL, rtol=RTOL)


def test_retain_graph_second_backward_accumulates():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 3, 12, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 3, 12, generator=gen, requires_grad=True)
    cos, sin = random_cache(3, 6, gen)
    with use_backend("triton"):
        q_out, k_out = rope(q, k, cos, sin)
    loss = (q_out * torch.randn_like(q_out)).sum() + (k_out * torch.randn_like(k_out)).sum()
    loss.backward(retain_graph=True)
    g1 = q.grad.clone(), k.grad.clone()
    loss.backward()
    torch.testing.assert_close(q.grad, 2 * g1[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(k.grad, 2 * g1[1], atol=ATOL, rtol=RTOL)
    assert g1[0].abs().max() > 0


def test_create_graph_raises_a_clear_error():
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    k = torch.randn(1, 1, 3, 8, requires_grad=True)
    cos, sin = rope_cache(3, 8)
    with use_backend("triton"):
        q_out, k_out = rope(q, k, cos, sin)
    with pytest.raises(RuntimeError, match="rope: the Triton backward cannot be differentiated"):
        torch.autograd.grad(q_out.sum() + k_out.sum(), q, create_graph=True)


def test_only_q_used_gives_zero_k_grad():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 3, 8, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 3, 8, generator=gen, requires_grad=True)
    cos, sin = rope_cache(3, 8)
    with use_backend("triton"):
        q_out, _ = rope(q, k, cos, sin)
    q_out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))
    torch.testing.assert_close(q.grad, rotate_by_hand(torch.ones_like(q), cos, -sin).float(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "cos_shape", "match"),
    [
        ((2, 5, 16), (2, 1, 5, 16), (5, 4), r"q \(2, 5, 16\) .* must be 4-D"),
        ((2, 4, 5, 16), (2, 1, 5, 12), (5, 4), r"q \(2, 4, 5, 16\) and k \(2, 1, 5, 12\) must agree"),
        ((2, 4, 5, 16), (2, 1, 5, 16), (5, 5), r"rotary_dims=5 .* even .* head_size=16"),
        ((2, 4, 5, 16), (2, 1, 5, 16), (5, 18), r"rotary_dims=18 .* head_size=16"),
        ((2, 4, 5, 16), (2, 1, 5, 16), (6, 4), r"cover 6 positions but q and k have seq_len 5"),
    ],
)
def test_bad_inputs_raise(q_shape, k_shape, cos_shape, match):
    q, k, cos = torch.randn(q_shape), torch.randn(k_shape), torch.randn(cos_shape)
    with use_backend("triton"), pytest.raises(ValueError, match=match):
        rope(q, k, cos, cos)


def test_cos_requiring_grad_is_refused_by_the_kernel():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos, sin = rope_cache(3, 8)
    with use_backend("triton"), pytest.raises(ValueError, match="cos/sin"):
        rope(q, k, cos.requires_grad_(), sin)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_against_fp32_twin(device, dtype):
    gen = torch.Generator().manual_seed(6)
    B, nh, nkv, T, hs, r = 2, 8, 2, 64, 128, 32
    q0, k0 = torch.randn(B, T, nh, hs, generator=gen), torch.randn(B, T, nkv, hs, generator=gen)
    cos, sin = (t.to(device) for t in rope_cache(T, r))  # fp32 cache with half-precision q/k, as in the model
    dq, dk = torch.randn(B, nh, T, hs, generator=gen).to(device), torch.randn(B, nkv, T, hs, generator=gen).to(device)
    grads = []
    for backend, dt in (("triton", dtype), ("torch", torch.float32)):
        q = q0.to(device, dt).requires_grad_()
        k = k0.to(device, dt).requires_grad_()
        with use_backend(backend):
            q_out, k_out = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        ((q_out.float() * dq).sum() + (k_out.float() * dk).sum()).backward()
        grads.append((q_out.float(), k_out.float(), q.grad.float(), k.grad.float()))
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 2e-3, "rtol": 2e-3}
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, **tol)
