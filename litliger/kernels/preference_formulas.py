"""The preference losses' formulas on (2B,) summed answer log-probs, chosen first: the value and stats
(:func:`preference_from_logps`), the closed-form gradient (:func:`preference_grad`), and what the one-pass walk
takes per chunk (:func:`chunk_loss_fn`). The losses are described in :mod:`litliger.kernels.preference`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, accurate at both ends (Maechler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) below -log 2."""
    near = x > -math.log(2.0)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, -1.0))), torch.log1p(-torch.exp(x)))


def preference_from_logps(
    logps: torch.Tensor,
    counts: torch.Tensor,
    *,
    loss: str = "dpo",
    beta: float = 0.1,
    ref_logps: torch.Tensor | None = None,
    nll: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The preference loss of (2B,) summed response log-probs ``logps`` (chosen first) with ``counts`` (2B,)
    target tokens each; ``nll`` (ORPO): the chosen responses' mean NLL. Returns ``(loss, stats)``; see the
    module docstring. ``stats`` are detached (B,) tensors."""
    half = logps.shape[0] // 2
    means = logps / counts.clamp(min=1).to(logps.dtype)
    c, r = logps[:half], logps[half:]
    mc, mr = means[:half], means[half:]
    if loss == "dpo":
        ref_c, ref_r = ref_logps[:half].to(logps.dtype), ref_logps[half:].to(logps.dtype)
        ratio = (c - r) - (ref_c - ref_r)
        if loss_type == "ipo":
            per_pair = (ratio - 1.0 / (2.0 * beta)) ** 2
        else:
            z = beta * ratio
            per_pair = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        reward_c, reward_r = beta * (c - ref_c), beta * (r - ref_r)
        value = per_pair.mean()
    elif loss == "simpo":
        value = (-F.logsigmoid(beta * (mc - mr) - gamma)).mean()
        reward_c, reward_r = beta * mc, beta * mr
    else:  # orpo (nll None: the odds-ratio term alone, as a chunk of the one-pass walk computes it)
        log_odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
        value = beta * (-F.logsigmoid(log_odds)).mean()
        value = value if nll is None else nll + value
        reward_c, reward_r = beta * mc, beta * mr
    stats = {
        "logps_chosen": c,
        "logps_rejected": r,
        "mean_logps_chosen": mc,
        "mean_logps_rejected": mr,
        "rewards_chosen": reward_c,
        "rewards_rejected": reward_r,
        "rewards_margin": reward_c - reward_r,
        "rewards_accuracy": (reward_c > reward_r).to(logps.dtype) + 0.5 * (reward_c == reward_r).to(logps.dtype),
    }
    return value, {k: v.detach() for k, v in stats.items()}


def preference_grad(
    logps: torch.Tensor,
    counts: torch.Tensor,
    *,
    loss: str,
    beta: float,
    ref_logps: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """d (the preference term of :func:`preference_from_logps`, a mean over the P pairs) / d ``logps`` (2P,), in
    closed form (the one-pass walk runs inside a custom op, below autograd):

        dpo sigmoid  df/dz = -(1 - eps) sigmoid(-z) + eps sigmoid(z),  z = beta ratio,  dratio/d(c, r) = (1, -1)
        ipo          df/dratio = 2 (ratio - 1 / (2 beta))
        simpo        df/du = -sigmoid(-u),  u = beta (mean_c - mean_r) - gamma,  dmean/dlogp = 1 / n
        orpo         df/dlo = -beta sigmoid(-lo),  dlo/dmean_c = 1 / (1 - exp(mean_c)) = -1 / expm1(mean_c),
                     dlo/dmean_r = 1 / expm1(mean_r)
    """
    half = logps.shape[0] // 2
    n = counts.clamp(min=1).to(logps.dtype)
    c, r = logps[:half], logps[half:]
    if loss == "dpo":
        ratio = (c - r) - (ref_logps[:half].to(logps.dtype) - ref_logps[half:].to(logps.dtype))
        if loss_type == "ipo":
            d = 2.0 * (ratio - 1.0 / (2.0 * beta))
        else:
            z = beta * ratio
            d = beta * (-(1.0 - label_smoothing) * torch.sigmoid(-z) + label_smoothing * torch.sigmoid(z))
        dc, dr = d, -d
    elif loss == "simpo":
        u = beta * (c / n[:half] - r / n[half:]) - gamma
        d = -beta * torch.sigmoid(-u)
        dc, dr = d / n[:half], -d / n[half:]
    else:
        mc, mr = c / n[:half], r / n[half:]
        lo = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
        d = -beta * torch.sigmoid(-lo)
        dc, dr = d * (-1.0 / torch.expm1(mc)) / n[:half], d * (1.0 / torch.expm1(mr)) / n[half:]
    return torch.cat([dc, dr]) / half


def chunk_loss_fn(
    loss: str, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0, gamma: float = 1.0
) -> tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], bool]:
    """``(fn, nll_chosen)`` for the one-pass walk: ``fn(logps, counts, ref)`` gives the mean over a chunk's pairs
    of the preference term and its gradient w.r.t. ``logps``; ``nll_chosen``: ORPO, whose chosen NLL the walk adds
    row by row."""
    options = {"dpo": {"loss_type": loss_type, "label_smoothing": label_smoothing}, "simpo": {"gamma": gamma}}
    kw = {"loss": loss, "beta": beta, **options.get(loss, {})}

    def fn(logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        value = preference_from_logps(logps, counts, ref_logps=ref, **kw)[0]
        return value, preference_grad(logps, counts, ref_logps=ref, **kw)

    return fn, loss == "orpo"
