"""Float64 agreement of the fused alignment losses: value and gradients of fused_linear_preference (every loss and
option, both walks) and fused_linear_distillation (every loss, temperature and hard term) in fp32, against naive
float64 formulas written out here (materialised logits, log_softmax), on small odd shapes with masked rows.

    python -m benchmarks.alignment_accuracy                    # the PyTorch twins (the CPU path)
    TRITON_INTERPRET=1 python -m benchmarks.alignment_accuracy --backend triton   # the Triton kernels on the CPU

Prints, per case, the largest error of the loss and of each gradient relative to the reference's largest entry.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from litliger.kernels import fused_linear_distillation, fused_linear_preference, use_backend

IGNORE = -100


def naive_preference(x, w, b, t, loss, beta, ref, opts):
    logp = torch.log_softmax(x @ w.T + b, dim=-1)
    live = t != IGNORE
    tok = logp.gather(-1, torch.where(live, t, 0).unsqueeze(-1)).squeeze(-1) * live
    s, n = tok.sum(-1), live.sum(-1)
    half = x.shape[0] // 2
    c, r, mc, mr = s[:half], s[half:], (s / n)[:half], (s / n)[half:]
    if loss == "dpo":
        ratio = (c - r) - (ref[:half] - ref[half:])
        if opts.get("loss_type") == "ipo":
            return ((ratio - 1 / (2 * beta)) ** 2).mean()
        eps = opts.get("label_smoothing", 0.0)
        return (-(1 - eps) * F.logsigmoid(beta * ratio) - eps * F.logsigmoid(-beta * ratio)).mean()
    if loss == "simpo":
        return (-F.logsigmoid(beta * (mc - mr) - opts["gamma"])).mean()
    odds = (mc - mr) - (torch.log(1 - torch.exp(mc)) - torch.log(1 - torch.exp(mr)))
    return -tok[:half].sum() / n[:half].sum() + beta * (-F.logsigmoid(odds)).mean()


def naive_distillation(xs, ws, xt, wt, t, loss, beta, temperature, hard):
    zs = xs @ ws.T
    lps, lpt = torch.log_softmax(zs / temperature, -1), torch.log_softmax(xt @ wt.T / temperature, -1)
    if loss == "jsd":
        lm = torch.logsumexp(torch.stack([lpt + math.log(beta), lps + math.log(1 - beta)]), 0)
        row = beta * (lpt.exp() * (lpt - lm)).sum(-1) + (1 - beta) * (lps.exp() * (lps - lm)).sum(-1)
    elif loss == "forward_kl":
        row = (lpt.exp() * (lpt - lps)).sum(-1)
    else:
        row = (lps.exp() * (lps - lpt)).sum(-1)
    live = t != IGNORE
    if hard:
        row = row + hard * F.cross_entropy(zs, torch.where(live, t, 0), reduction="none")
    return (row * live).sum() / live.sum()


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-300))


def preference_rows(backend: str) -> list[tuple[str, list[float]]]:
    gen = torch.Generator().manual_seed(0)
    B, T, C, V = 3, 5, 8, 29
    x, w, b = (
        torch.randn(2 * B, T, C, generator=gen),
        torch.randn(V, C, generator=gen) * 0.5,
        torch.randn(V, generator=gen) * 0.3,
    )
    t = torch.randint(0, V, (2 * B, T), generator=gen)
    t[:, 0], t[0, :3], t[2, 3:], t[4, 4:] = IGNORE, IGNORE, IGNORE, IGNORE  # prompts of 1-3 tokens, padded tails
    ref = torch.randn(2 * B, generator=gen) * 3 - 12
    cases = [("dpo", {}), ("dpo", {"label_smoothing": 0.2}), ("dpo", {"loss_type": "ipo"}),
             ("simpo", {"gamma": 0.5}), ("orpo", {})]  # fmt: skip
    rows = []
    for loss, opts in cases:
        r = ref if loss == "dpo" else None
        leaves64 = [v.double().requires_grad_() for v in (x, w, b)]
        want = naive_preference(*leaves64, t, loss, 0.3, None if r is None else r.double(), opts)
        grads64 = torch.autograd.grad(want, leaves64)
        for walk, chunk in (("one-pass", None), ("two-pass", 4)):
            leaves = [v.clone().requires_grad_() for v in (x, w, b)]
            with use_backend(backend):
                got, _ = fused_linear_preference(*leaves[:2], t, leaves[2], loss=loss, beta=0.3, ref_logps=r,
                                                 chunk_size=chunk, **opts)  # fmt: skip
            grads = torch.autograd.grad(got, leaves)
            name = f"{loss} {','.join(f'{k}={v}' for k, v in opts.items()) or '-'} ({walk})"
            rows.append(
                (
                    name,
                    [rel(got.detach(), want.detach()), *(rel(g, g64) for g, g64 in zip(grads, grads64, strict=True))],
                )
            )
    return rows


def distillation_rows(backend: str) -> list[tuple[str, list[float]]]:
    gen = torch.Generator().manual_seed(1)
    N, Cs, Ct, V = 7, 8, 12, 37
    xs, ws = torch.randn(N, Cs, generator=gen), torch.randn(V, Cs, generator=gen)
    xt, wt = torch.randn(N, Ct, generator=gen), torch.randn(V, Ct, generator=gen)
    t = torch.randint(0, V, (N,), generator=gen)
    t[2] = IGNORE
    rows = []
    for loss, beta, temperature, hard in (("jsd", 0.5, 1.0, 0.0), ("jsd", 0.3, 2.0, 0.5), ("forward_kl", 0.5, 1.0, 0.0),
                                          ("forward_kl", 0.5, 1.7, 0.5), ("reverse_kl", 0.5, 1.0, 0.0),
                                          ("reverse_kl", 0.5, 0.7, 0.5)):  # fmt: skip
        leaves64 = [v.double().requires_grad_() for v in (xs, ws)]
        want = naive_distillation(*leaves64, xt.double(), wt.double(), t, loss, beta, temperature, hard)
        grads64 = torch.autograd.grad(want, leaves64)
        leaves = [v.clone().requires_grad_() for v in (xs, ws)]
        with use_backend(backend):
            got = fused_linear_distillation(*leaves, xt, wt, t, loss=loss, beta=beta, temperature=temperature,
                                            hard_weight=hard, chunk_size=3)  # fmt: skip
        grads = torch.autograd.grad(got, leaves)
        name = f"{loss} beta={beta} T={temperature} hard={hard}"
        rows.append(
            (name, [rel(got.detach(), want.detach()), *(rel(g, g64) for g, g64 in zip(grads, grads64, strict=True))])
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.alignment_accuracy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--backend", choices=("torch", "triton"), default="torch")
    args = parser.parse_args()
    print(f"backend={args.backend}; max |fp32 - float64| / max |float64|, value and gradients")
    print(f"{'case':<44} {'loss':>9} {'d x':>9} {'d weight':>9} {'d bias':>9}")
    for name, errs in preference_rows(args.backend) + distillation_rows(args.backend):
        print(f"{name:<44} " + " ".join(f"{e:>9.1e}" for e in errs))


if __name__ == "__main__":
    main()
