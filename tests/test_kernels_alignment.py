"""fused_linear_preference (DPO, IPO, SimPO, ORPO) and fused_linear_distillation (JSD, forward / reverse KL): both
backends on fp32 inputs against naive float64 references written here from the modules' formulas (the full logits
materialised, torch.log_softmax), the value, the gradients and (preference) the stats; the bad-input checks.

Shapes are tiny and odd (the Triton interpreter runs the kernels on CPU): chunks straddle sequences, vocabulary
blocks are shrunk to 16 columns so that every row is walked in several blocks.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from litliger.kernels import fused_linear_distillation, fused_linear_preference, use_backend

# The package re-exports the ops under their modules' names, so the modules are looked up explicitly.
ce_module = importlib.import_module("litliger.kernels.cross_entropy")
kd_module = importlib.import_module("litliger.kernels.distillation_rows")

IGNORE = -100
RTOL = 1e-5  # fp32 op against the float64 reference, relative to the reference's largest entry
BACKENDS = ("torch", "triton")
UPSTREAM = 1.7  # d(output)/d(loss): the backward must scale by the incoming gradient


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row kernels walk 16 vocabulary columns per block, so the online softmax crosses blocks (V = 29, 37)."""
    monkeypatch.setattr(ce_module, "MAX_BLOCK", 16)
    monkeypatch.setattr(kd_module, "MAX_BLOCK", 16)


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """``got`` (fp32) within RTOL of ``want`` (fp64): per entry, relative to itself and to the largest entry."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    atol = RTOL * float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------------- preference

B, T, C, V = 3, 5, 8, 29  # 2B = 6 sequences of 5 tokens: 30 rows, chunks of 4 straddle the sequences
PREF_BETA = 0.3
PREF_CASES = [
    ("dpo", {}),
    ("dpo", {"label_smoothing": 0.2}),
    ("dpo", {"loss_type": "ipo"}),
    ("simpo", {"gamma": 0.5}),
    ("orpo", {}),
]


def pref_case(device: torch.device, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """fp32 (x, weight, bias), targets (2B, T) and fp32 ref_logps (2B,)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * B, T, C, generator=gen)
    w = torch.randn(V, C, generator=gen) * 0.5
    b = torch.randn(V, generator=gen) * 0.3
    t = torch.randint(0, V, (2 * B, T), generator=gen)
    t[:, 0] = IGNORE  # a one-token prompt everywhere
    t[0, :3] = IGNORE  # a longer prompt: a sequence whose first three positions are masked
    t[5, :2] = IGNORE
    t[2, 3:] = IGNORE  # padded tails, on a chosen and on a rejected sequence
    t[4, 4:] = IGNORE
    ref = torch.randn(2 * B, generator=gen) * 3 - 12
    return [v.to(device) for v in (x, w, b)], t.to(device), ref.to(device)


def naive_preference(x, w, b, t, loss, beta, ref, opts):
    """The module docstring's formulas on materialised logits, in the inputs' dtype (float64 here)."""
    logp = torch.log_softmax(x @ w.T + b, dim=-1)  # (2B, T, V)
    live = t != IGNORE
    tok = logp.gather(-1, torch.where(live, t, 0).unsqueeze(-1)).squeeze(-1) * live
    s, n = tok.sum(-1), live.sum(-1)
    m = s / n
    c, r, mc, mr = s[:B], s[B:], m[:B], m[B:]
    if loss == "dpo":
        ratio = (c - r) - (ref[:B] - ref[B:])
        if opts.get("loss_type") == "ipo":
            value = ((ratio - 1 / (2 * beta)) ** 2).mean()
        else:
            eps = opts.get("label_smoothing", 0.0)
            value = (-(1 - eps) * F.logsigmoid(beta * ratio) - eps * F.logsigmoid(-beta * ratio)).mean()
        rc, rr = beta * (c - ref[:B]), beta * (r - ref[B:])
    elif loss == "simpo":
        value = (-F.logsigmoid(beta * (mc - mr) - opts["gamma"])).mean()
        rc, rr = beta * mc, beta * mr
    else:
        nll = -tok[:B].sum() / n[:B].sum()
        log_odds = (mc - mr) - (torch.log(1 - torch.exp(mc)) - torch.log(1 - torch.exp(mr)))
        value = nll + beta * (-F.logsigmoid(log_odds)).mean()
        rc, rr = beta * mc, beta * mr
    stats = {
        "logps_chosen": c,
        "logps_rejected": r,
        "mean_logps_chosen": mc,
        "mean_logps_rejected": mr,
        "rewards_chosen": rc,
        "rewards_rejected": rr,
        "rewards_margin": rc - rr,
        "rewards_accuracy": (rc > rr).double() + 0.5 * (rc == rr).double(),
    }
    return value, {k: v.detach() for k, v in stats.items()}


# chunk_size 4: the two-pass token walk (a pair is 2T = 10 rows); 10: the one-pass walk, a pair per chunk;
# None: the one-pass walk, every pair in one chunk
WALKS = {"two-pass": 4, "pair-chunks": 10, "one-chunk": None}


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("loss", "opts"), PREF_CASES, ids=["dpo", "dpo-smoothing", "ipo", "simpo", "orpo"])
def test_preference_matches_naive_float64(device, backend, loss, opts, walk):
    leaves, t, ref = pref_case(device)
    ref_logps = ref if loss == "dpo" else None

    x64, w64, b64 = (v.double().requires_grad_() for v in leaves)
    ref64 = None if ref_logps is None else ref_logps.double()
    want, want_stats = naive_preference(x64, w64, b64, t, loss, PREF_BETA, ref64, opts)
    want_grads = torch.autograd.grad(want * UPSTREAM, (x64, w64, b64))

    x, w, b = (v.clone().requires_grad_() for v in leaves)
    with use_backend(backend):
        got, stats = fused_linear_preference(
            x, w, t, b, loss=loss, beta=PREF_BETA, ref_logps=ref_logps, chunk_size=WALKS[walk], **opts
        )
    (got * UPSTREAM).backward()

    assert got.shape == () and got.dtype == torch.float32
    assert_close(got.detach(), want.detach(), "loss")
    for name, g, g64 in zip(("x", "weight", "bias"), (x.grad, w.grad, b.grad), want_grads, strict=True):
        assert_close(g, g64, f"grad {name}")
    assert stats.keys() == want_stats.keys()
    for name, value in stats.items():
        assert value.shape == (B,) and not value.requires_grad, name
        if name == "rewards_accuracy":
            assert torch.equal(value.double(), want_stats[name]), (value, want_stats[name])
        else:
            assert_close(value, want_stats[name], name)
    assert 0 < float(stats["rewards_accuracy"].sum()) < B  # both outcomes occur, so the comparison means something


def test_preference_bias_free_and_frozen_weight(device):
    """No bias, frozen head (the LoRA case): x's gradient only, the same as the naive one."""
    (x0, w0, _), t, _ = pref_case(device, seed=1)
    x64 = x0.double().requires_grad_()
    want, _ = naive_preference(x64, w0.double(), 0.0, t, "simpo", PREF_BETA, None, {"gamma": 0.5})
    (want_gx,) = torch.autograd.grad(want, x64)
    x = x0.clone().requires_grad_()
    with use_backend("triton"):
        got, _ = fused_linear_preference(x, w0, t, loss="simpo", beta=PREF_BETA, gamma=0.5, chunk_size=7)
    got.backward()
    assert_close(got.detach(), want.detach(), "loss")
    assert_close(x.grad, want_gx, "grad x")


# --------------------------------------------------------------------------------------------------- distillation

N_SHAPE, CS, CT, KV = (2, 4), 8, 12, 37  # tokens (2, 4) = 8 rows in chunks of 3; student 8 wide, teacher 12
# (loss, beta, temperature, hard_weight, biases)
KD_CASES = [
    ("jsd", 0.3, 1.7, 0.0, False),
    ("jsd", 0.5, 0.6, 0.5, True),
    ("forward_kl", 0.5, 2.0, 0.0, False),
    ("forward_kl", 0.5, 1.0, 0.7, False),
    ("reverse_kl", 0.5, 1.7, 0.5, False),
    ("reverse_kl", 0.5, 0.8, 0.0, False),
]


def kd_case(device: torch.device, vocab: int = KV, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """fp32 tensors: student (xs, ws, bs), teacher (xt, wt, bt); targets over the first KV classes."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "xs": torch.randn(*N_SHAPE, CS, generator=gen),
        "ws": torch.randn(vocab, CS, generator=gen) * 0.5,
        "bs": torch.randn(vocab, generator=gen) * 0.3,
        "xt": torch.randn(*N_SHAPE, CT, generator=gen),
        "wt": torch.randn(vocab, CT, generator=gen) * 0.5,
        "bt": torch.randn(vocab, generator=gen) * 0.3,
    }
    t = torch.randint(0, KV, N_SHAPE, generator=gen)
    t[0, 1] = IGNORE
    t[1, 3] = IGNORE
    return {k: v.to(device) for k, v in tensors.items()}, t.to(device)


def naive_distillation(xs, ws, bs, xt, wt, bt, t, loss, beta, temperature, hard_weight):
    zs = xs @ ws.T + (0.0 if bs is None else bs)
    zt = xt @ wt.T + (0.0 if bt is None else bt)
    lps, lpt = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)
    ps, pt = lps.exp(), lpt.exp()
    if loss == "jsd":
        lm = torch.log(beta * pt + (1 - beta) * ps)
        row = beta * (pt * (lpt - lm)).sum(-1) + (1 - beta) * (ps * (lps - lm)).sum(-1)
    elif loss == "forward_kl":
        row = (pt * (lpt - lps)).sum(-1)
    else:
        row = (ps * (lps - lpt)).sum(-1)
    live = t != IGNORE
    if hard_weight:
        hard = -torch.log_softmax(zs, -1).gather(-1, torch.where(live, t, 0).unsqueeze(-1)).squeeze(-1)
        row = row + hard_weight * hard
    return (row * live).sum() / live.sum()


def run_distillation(backend, tensors, t, biases, **kw):
    """The op on fresh leaves (teacher ones too, requiring grad): (loss, leaves)."""
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    with use_backend(backend):
        out = fused_linear_distillation(
            leaves["xs"], leaves["ws"], leaves["xt"], leaves["wt"], t, chunk_size=3,
            student_bias=leaves["bs"] if biases else None, teacher_bias=leaves["bt"] if biases else None, **kw,
        )  # fmt: skip
    (out * UPSTREAM).backward()
    return out, leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("loss", "beta", "temperature", "hard_weight", "biases"), KD_CASES)
def test_distillation_matches_naive_float64(device, backend, loss, beta, temperature, hard_weight, biases):
    tensors, t = kd_case(device)
    s64 = [tensors[k].double().requires_grad_() for k in ("xs", "ws", "bs")]
    teacher64 = [tensors[k].double() for k in ("xt", "wt", "bt")]
    if not biases:
        s64[2] = teacher64[2] = None
    want = naive_distillation(*s64[:3], *teacher64, t, loss, beta, temperature, hard_weight)
    wanted = [v for v in s64 if v is not None]
    want_grads = torch.autograd.grad(want * UPSTREAM, wanted)

    kw = dict(loss=loss, beta=beta, temperature=temperature, hard_weight=hard_weight)
    got, leaves = run_distillation(backend, tensors, t, biases, **kw)

    assert got.shape == () and got.dtype == torch.float32
    assert_close(got.detach(), want.detach(), "loss")
    for name, g64 in zip(("xs", "ws", "bs"), want_grads, strict=False):
        assert_close(leaves[name].grad, g64, f"grad {name}")
    if not biases:
        assert leaves["bs"].grad is None
    for name in ("xt", "wt", "bt"):  # the teacher is only read
        assert leaves[name].grad is None, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_distillation_vocab_padding(device, backend):
    """Heads padded to 40 rows, vocab_size=37: the loss of the sliced heads; zero gradient on the padding rows."""
    tensors, t = kd_case(device, vocab=40)
    with torch.no_grad():  # padding rows that would change both distributions if they entered them
        tensors["ws"][KV:] = 3.0
        tensors["wt"][KV:] = -3.0
        tensors["bs"][KV:] = 5.0
        tensors["bt"][KV:] = 5.0
    kw = dict(loss="jsd", beta=0.5, temperature=1.3, hard_weight=0.4)
    padded, leaves = run_distillation(backend, tensors, t, True, vocab_size=KV, **kw)
    sliced_tensors = {k: (v[:KV].clone() if k in ("ws", "bs", "wt", "bt") else v) for k, v in tensors.items()}
    sliced, sliced_leaves = run_distillation(backend, sliced_tensors, t, True, **kw)

    torch.testing.assert_close(padded, sliced, atol=0, rtol=0)
    for name in ("ws", "bs"):
        g = leaves[name].grad
        assert torch.all(g[KV:] == 0), name
        torch.testing.assert_close(g[:KV], sliced_leaves[name].grad, atol=0, rtol=0)
    torch.testing.assert_close(leaves["xs"].grad, sliced_leaves["xs"].grad, atol=0, rtol=0)
    assert all(leaves[name].grad is None for name in ("xt", "wt", "bt"))

    s64 = [sliced_tensors[k].double().requires_grad_() for k in ("xs", "ws", "bs")]
    want = naive_distillation(*s64, *(sliced_tensors[k].double() for k in ("xt", "wt", "bt")), t, "jsd", 0.5, 1.3, 0.4)
    want_grads = torch.autograd.grad(want * UPSTREAM, s64)
    assert_close(padded.detach(), want.detach(), "loss")
    for name, g64 in zip(("xs", "ws", "bs"), want_grads, strict=True):
        assert_close(leaves[name].grad[: g64.shape[0]], g64, f"grad {name}")  # the heads' first KV rows


# ------------------------------------------------------------------------------------------------------ bad input


def _pref_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, w = torch.randn(4, 3, 8), torch.randn(20, 8)
    t = torch.randint(0, 20, (4, 3))
    return x, w, t, torch.zeros(4)


PREF_BAD = [
    ("beta", dict(loss="simpo", beta=0.0), r"beta=0\.0 must be > 0"),
    ("dpo-no-ref", dict(loss="dpo"), "loss='dpo' needs ref_logps"),
    ("ref-with-simpo", dict(loss="simpo", ref=True), "loss='simpo' is reference-free"),
    ("odd-batch", dict(loss="orpo", odd=True), r"x has shape \(3, 3, 8\); expected \(2B, T, C\)"),
    ("unknown-option", dict(loss="dpo", ref=True, gamma=0.5), r"loss='dpo' takes no option gamma"),
    ("ipo-smoothing", dict(loss="dpo", ref=True, loss_type="ipo", label_smoothing=0.1), "IPO takes none"),
]


@pytest.mark.parametrize(("kw", "match"), [c[1:] for c in PREF_BAD], ids=[c[0] for c in PREF_BAD])
def test_preference_bad_input(kw, match):
    x, w, t, ref = _pref_inputs()
    kw = dict(kw)
    if kw.pop("odd", False):
        x, t = x[:3], t[:3]
    if kw.pop("ref", False):
        kw["ref_logps"] = ref[: x.shape[0]]
    with pytest.raises(ValueError, match=match):
        fused_linear_preference(x, w, t, **kw)


KD_BAD = [
    ("vocab-mismatch", dict(wt_rows=21), r"student's head has 20 rows and the teacher's 21.*pass vocab_size"),
    ("jsd-beta-0", dict(beta=0.0), r"beta=0\.0 must be in \(0, 1\)"),
    ("jsd-beta-1", dict(beta=1.0), r"beta=1\.0 must be in \(0, 1\)"),
    ("temperature-0", dict(temperature=0.0), r"temperature=0\.0 must be > 0"),
    ("negative-hard-weight", dict(hard_weight=-0.1), r"hard_weight=-0\.1 must be >= 0"),
    ("token-mismatch", dict(xt_shape=(2, 4, 6)), r"x_teacher \(2, 4, 6\) must have the same tokens"),
]


@pytest.mark.parametrize(("kw", "match"), [c[1:] for c in KD_BAD], ids=[c[0] for c in KD_BAD])
def test_distillation_bad_input(kw, match):
    kw = dict(kw)
    xs, ws = torch.randn(2, 3, 8), torch.randn(20, 8)
    xt, wt = torch.randn(*kw.pop("xt_shape", (2, 3, 6))), torch.randn(kw.pop("wt_rows", 20), 6)
    t = torch.randint(0, 20, (2, 3))
    with pytest.raises(ValueError, match=match):
        fused_linear_distillation(xs, ws, xt, wt, t, **kw)


def test_jsd_naive_reference_is_the_symmetric_jsd():
    """The reference itself: at beta 0.5 the generalised JSD is the textbook JSD (mixture M = (P_s + P_t) / 2)."""
    p = torch.softmax(torch.randn(1, 7, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(1, 7, dtype=torch.float64), -1)
    m = (p + q) / 2
    jsd = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    eye = torch.eye(7, dtype=torch.float64)
    got = naive_distillation(
        p.log(), eye, None, q.log(), eye, None, torch.zeros(1, dtype=torch.long), "jsd", 0.5, 1.0, 0
    )
    torch.testing.assert_close(got, jsd)
    assert math.isfinite(float(got)) and float(got) > 0
