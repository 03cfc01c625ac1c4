"""Fused LM head + preference losses (DPO, IPO, SimPO, ORPO) without the (tokens x vocab) logits.

A preference loss is a function of each sequence's answer log-probability, and a token's log-probability is minus
its cross-entropy: ``log p(t_r) = x_r[t_r] - lse_r = -ce_r``. Two walks compute it, both on the cross-entropy row
kernels (Triton, or their PyTorch twins):

- one pass over chunks of whole pairs (``preference_walk.py``): each chunk's logits, its pairs' log-probs, their
  share of the loss and its gradient (autograd on 2P numbers), then the logits' gradient in place and the
  matmuls: three matmuls per row, as the naive loss, gradients formed in forward. Used whenever one pair's logits
  (2 T x V) fit ``PAIR_CHUNK_MAX_BYTES`` (or ``chunk_size`` rows hold a pair); a chunk takes as many pairs as fit
  ``PAIR_CHUNK_BYTES``.
- two passes over chunks of ``chunk_size`` tokens, when a pair is larger: the fused linear cross-entropy with
  ``reduction="none"``, then the loss of the (2B,) log-probs; autograd carries dloss/dlogp back into its
  backward, which recomputes each chunk's logits (one more matmul per row, memory bounded by the chunk alone).

Layout (Liger's): ``x`` (2B, T, C) with the B chosen sequences first and the B rejected after, ``targets``
(2B, T) with -100 on the prompt and padding. The formulas (``preference_from_logps``):

- ``dpo``: z = beta * ((c - r) - (ref_c - ref_r)) on summed log-probs;
  ``loss_type="sigmoid"``: -(1 - eps) logsigmoid(z) - eps logsigmoid(-z) (eps = ``label_smoothing``, the
  conservative DPO of Mitchell 2023; 0 is Rafailov et al. 2023's DPO), ``loss_type="ipo"``:
  (z / beta - 1 / (2 beta))^2 (Azar et al. 2023, on the summed log-ratios). rewards = beta (logp - ref_logp).
- ``simpo``: -logsigmoid(beta (mean_c - mean_r) - gamma) (Meng et al. 2024; no reference). rewards = beta mean.
- ``orpo``: NLL of the chosen responses (mean over their target tokens) + beta * mean over pairs of
  -logsigmoid(log odds(mean_c) - log odds(mean_r)), log odds(p) = log p - log(1 - p) (Hong et al. 2024; no
  reference; ``beta`` is TRL's and Liger's name for the paper's lambda). rewards = beta mean.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from ._checks import check_float, check_same_device
from .backend import dispatch
from .fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_torch
from .preference_formulas import chunk_loss_fn, preference_from_logps
from .preference_walk import FusedLinearPreferenceFunction, _preference_op, pairs_per_chunk

PREFERENCE_LOSSES = ("dpo", "simpo", "orpo")
DPO_LOSS_TYPES = ("sigmoid", "ipo")
_OPTIONS = {"dpo": {"loss_type", "label_smoothing"}, "simpo": {"gamma"}, "orpo": set()}
_OP = "fused_linear_preference"


def _check(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    loss: str,
    beta: float,
    ref_logps: torch.Tensor | None,
    options: dict,
) -> dict:
    check_float("x", x, _OP)
    if loss not in PREFERENCE_LOSSES:
        raise ValueError(f"{_OP}: loss={loss!r} is not a preference loss; choose one of {', '.join(PREFERENCE_LOSSES)}")
    unknown = set(options) - _OPTIONS[loss]
    if unknown:
        allowed = ", ".join(sorted(_OPTIONS[loss])) or "none"
        raise ValueError(f"{_OP}: loss={loss!r} takes no option {', '.join(sorted(unknown))} (its options: {allowed})")
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"{_OP}: beta={beta!r} must be > 0 (the strength of the preference term)")
    if x.dim() != 3 or x.shape[0] % 2 or x.shape[0] == 0:
        raise ValueError(
            f"{_OP}: x has shape {tuple(x.shape)}; expected (2B, T, C): the B chosen sequences, then the B rejected"
        )
    if not isinstance(targets, torch.Tensor) or targets.shape != x.shape[:2]:
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"{_OP}: targets has shape {got}; expected (2B, T) = {tuple(x.shape[:2])}")
    n = x.shape[0]
    if loss == "dpo":
        if ref_logps is None:
            raise ValueError(
                f"{_OP}: loss='dpo' needs ref_logps, the reference model's summed response log-probs (2B,); "
                "use loss='simpo' or 'orpo' for a reference-free loss"
            )
        if not isinstance(ref_logps, torch.Tensor) or ref_logps.shape != (n,):
            got = tuple(ref_logps.shape) if isinstance(ref_logps, torch.Tensor) else type(ref_logps).__name__
            raise ValueError(f"{_OP}: ref_logps has shape {got}; expected ({n},), one per sequence of x")
        loss_type = options.get("loss_type", "sigmoid")
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"{_OP}: loss_type={loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
        smoothing = options.get("label_smoothing", 0.0)
        if not 0.0 <= smoothing < 0.5:
            raise ValueError(f"{_OP}: label_smoothing={smoothing} must be in [0, 0.5) (the share of flipped labels)")
        if smoothing and loss_type == "ipo":
            raise ValueError(f"{_OP}: label_smoothing is conservative DPO's (loss_type='sigmoid'); IPO takes none")
    elif ref_logps is not None:
        raise ValueError(f"{_OP}: loss={loss!r} is reference-free; ref_logps is for loss='dpo' only")
    if loss == "simpo" and not math.isfinite(options.get("gamma", 1.0)):
        raise ValueError(f"{_OP}: gamma={options['gamma']} must be a finite margin")
    return options


def _one_pass(*args, triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, weight, targets, bias, ref, loss, beta, loss_type, smoothing, gamma, ignore_index, per_chunk = args
    fn, nll = chunk_loss_fn(loss, beta, loss_type, smoothing, gamma)
    return FusedLinearPreferenceFunction.apply(
        x, weight, targets, bias, ref, ignore_index, per_chunk, fn, nll, torch.is_grad_enabled(), triton
    )  # fmt: skip


def _one_pass_compiled(*args, triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    grad = torch.is_grad_enabled()
    need = [grad and t is not None and t.requires_grad for t in (args[0], args[1], args[3])]
    out = _preference_op(*args, *need, triton)
    return out[0], out[1]


def _preference(
    twin_only: bool,
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    loss: str,
    beta: float,
    ref_logps: torch.Tensor | None,
    ignore_index: int,
    chunk_size: int | None,
    options: dict,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)  # matmuls in the autocast dtype, the loss in fp32
        x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _preference(twin_only, x, weight, targets, bias, loss, beta, ref_logps, ignore_index, chunk_size,
                               options)  # fmt: skip
    options = _check(x, weight, targets, loss, beta, ref_logps, options)
    check_same_device(_OP, x=x, weight=weight, targets=targets, bias=bias, ref_logps=ref_logps)
    n_seq, seq_len = targets.shape
    per_chunk = pairs_per_chunk(n_seq // 2, seq_len, weight.shape[0], x.element_size(), chunk_size)
    if per_chunk == 0:
        ce_fn = fused_linear_cross_entropy_torch if twin_only else fused_linear_cross_entropy
        return _two_pass(ce_fn, x, weight, targets, bias, loss, beta, ref_logps, ignore_index, chunk_size, options)
    opts = {"loss_type": "sigmoid", "label_smoothing": 0.0, "gamma": 1.0, **options}
    ref = None if ref_logps is None else ref_logps.detach()
    settings = (opts["loss_type"], float(opts["label_smoothing"]), float(opts["gamma"]), ignore_index, per_chunk)
    args = (x, weight, targets, bias, ref, loss, float(beta), *settings)
    twin = partial(_one_pass, triton=False)
    compiled_twin = partial(_one_pass_compiled, triton=False)
    if twin_only:
        value, logps = (compiled_twin if torch.compiler.is_compiling() else twin)(*args)
    else:
        value, logps = dispatch(
            args, triton=partial(_one_pass, triton=True), compiled=partial(_one_pass_compiled, triton=True),
            twin=twin, compiled_twin=compiled_twin,
        )  # fmt: skip
    counts = (targets != ignore_index).sum(-1)
    _, stats = preference_from_logps(logps, counts, loss=loss, beta=beta, ref_logps=ref_logps, **options)
    return value, stats


def _two_pass(
    ce_fn,  # noqa: ANN001 (fused_linear_cross_entropy or its twin)
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    loss: str,
    beta: float,
    ref_logps: torch.Tensor | None,
    ignore_index: int,
    chunk_size: int | None,
    options: dict,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The token-chunked walk: ``reduction="none"`` cross-entropy, then the loss of the (2B,) log-probs."""
    ce = ce_fn(x, weight, targets, bias, ignore_index, "none", 0.0, 0.0, chunk_size)  # (2B, T), 0 where ignored
    valid = targets != ignore_index
    counts = valid.sum(-1)
    logps = -ce.sum(-1)  # (2B,) fp32 (fp64 for fp64 inputs)
    nll = None
    if loss == "orpo":
        half = x.shape[0] // 2
        nll = ce[:half].sum() / counts[:half].sum().clamp(min=1).to(ce.dtype)
    return preference_from_logps(logps, counts, loss=loss, beta=beta, ref_logps=ref_logps, nll=nll, **options)


def fused_linear_preference(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    loss: str = "dpo",
    beta: float = 0.1,
    ref_logps: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    **loss_options: float | str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Preference loss of ``x @ weight.T + bias`` (see the module docstring): ``(loss, stats)``.

    x (2B, T, C): B chosen sequences, then B rejected; targets (2B, T) (``ignore_index`` on prompt and padding);
    ref_logps (2B,): the reference model's summed response log-probs (``loss="dpo"`` only). Options:
    ``loss_type`` ("sigmoid", "ipo") and ``label_smoothing`` for DPO, ``gamma`` for SimPO.

    ``loss`` is the mean over the B pairs (ORPO adds the chosen responses' token-mean NLL); ``stats`` holds
    detached (B,) tensors: ``logps_chosen``/``logps_rejected`` (summed), ``mean_logps_*``, ``rewards_chosen``,
    ``rewards_rejected``, ``rewards_margin`` and ``rewards_accuracy`` (1.0 where the chosen reward is higher, 0.5
    on a tie: a policy still equal to its reference scores chance, 0.5).
    The chunk walk runs on the backend's path (Triton or the twin), as ``fused_linear_cross_entropy`` does.
    """
    return _preference(False, x, weight, targets, bias, loss, beta, ref_logps, ignore_index, chunk_size, loss_options)


def fused_linear_preference_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    loss: str = "dpo",
    beta: float = 0.1,
    ref_logps: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    **loss_options: float | str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain-PyTorch twin of :func:`fused_linear_preference`: the same walks with the cross-entropy rows in
    PyTorch."""
    return _preference(True, x, weight, targets, bias, loss, beta, ref_logps, ignore_index, chunk_size, loss_options)
