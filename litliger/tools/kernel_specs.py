"""The kernel launches the published configs make, as launch plans (litliger.kernels._launch.LaunchPlan).

:func:`config_plans` runs every fused op a training step of a config calls (forward and backward, through
the public ops on the Triton backend) on tensors of that config's sizes, with the launchers' kernel launches
recorded rather than run. On the meta device nothing is allocated, so even Llama-3.1-8B's LM head costs nothing.
What is recorded is what would launch: the block sizes, warps and constexprs come from the launchers themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels import (
    add_rms_norm,
    cross_entropy,
    fused_linear_cross_entropy,
    fused_linear_distillation,
    geglu,
    layer_norm,
    rms_norm,
    rope,
    swiglu,
    use_backend,
)
from ..kernels._launch import LaunchPlan, capture_launches
from ..model.config import Config
from ..model.registry import CONFIGS

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# A training step's tokens: (batch, sequence). Only runtime arguments depend on them.
BATCH, SEQ = 2, 2048


def published_names() -> list[str]:
    """Configs with published weights (the registry's test-only ``debug-*`` configs excluded)."""
    return [name for name in CONFIGS if not name.startswith("debug-")]


def _grad(outputs: tuple[torch.Tensor, ...], inputs: list[torch.Tensor]) -> None:
    """Run the backward of ``outputs`` w.r.t. the inputs that require grad (its launches are recorded)."""
    wanted = [t for t in inputs if t.requires_grad]
    torch.autograd.grad(outputs, wanted, [torch.ones_like(o) for o in outputs])


def _leaf(*shape: int, dtype: torch.dtype, device: torch.device | str, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)


def norm_calls(c: Config, dtype: torch.dtype, device: torch.device | str, rows: int) -> None:
    """The block's norms: norm_1 / ln_f (plain), norm_2 (fused residual add for RMSNorm), qk-norm over heads."""
    H = c.n_embd
    x, r = _leaf(rows, H, dtype=dtype, device=device), _leaf(rows, H, dtype=dtype, device=device)
    w = _leaf(H, dtype=dtype, device=device)
    if c.norm_class == "RMSNorm":
        _grad((rms_norm(x, w, c.norm_eps, c.norm_offset),), [x, w])
        _grad(add_rms_norm(x, r, w, c.norm_eps, c.norm_offset), [x, r, w])
        if c.norm_qk:  # q (B, nh, T, hs) as the attention's transposed view
            q = _leaf(BATCH, rows // BATCH, c.n_head, c.head_size, dtype=dtype, device=device).transpose(1, 2)
            wq = _leaf(c.head_size, dtype=dtype, device=device)
            _grad((rms_norm(q, wq, c.norm_eps, c.norm_offset),), [q, wq])
    else:
        b = _leaf(H, dtype=dtype, device=device)
        _grad((layer_norm(x, w, b, c.norm_eps),), [x, w, b])


def rope_calls(c: Config, dtype: torch.dtype, device: torch.device | str, rows: int) -> None:
    """Rotary on q and k as the attention passes them: transposed views of (B, T, heads, hs); fp32 tables."""
    if not c.rope_n_elem:
        return
    T = rows // BATCH
    q = _leaf(BATCH, T, c.n_head, c.head_size, dtype=dtype, device=device).transpose(1, 2)
    k = _leaf(BATCH, T, c.n_query_groups, c.head_size, dtype=dtype, device=device).transpose(1, 2)
    cos = torch.randn(T, c.rope_n_elem, device=device)
    _grad(rope(q, k, cos, cos), [q, k])


def mlp_calls(c: Config, dtype: torch.dtype, device: torch.device | str, rows: int) -> None:
    """The gated MLPs' activation product (GeluMLP runs F.gelu: no litliger kernel)."""
    if c.mlp_class not in ("SwiGLUMLP", "GeGLUMLP"):
        return
    gate = _leaf(rows, c.intermediate_size, dtype=dtype, device=device)
    up = _leaf(rows, c.intermediate_size, dtype=dtype, device=device)
    y = swiglu(gate, up) if c.mlp_class == "SwiGLUMLP" else geglu(gate, up, c.gelu_approximate)
    _grad((y,), [gate, up])


def flce_calls(c: Config, dtype: torch.dtype, device: torch.device | str, rows: int) -> None:
    """The LM head's loss: fused linear cross-entropy ("mean": gradients in forward; "none": in backward)."""
    h, w = (
        _leaf(rows, c.n_embd, dtype=dtype, device=device),
        _leaf(c.padded_vocab_size, c.n_embd, dtype=dtype, device=device),
    )
    targets = torch.randint(0, c.vocab_size, (rows,), device=device)
    for reduction in ("mean", "none"):
        _grad((fused_linear_cross_entropy(h, w, targets, reduction=reduction),), [h, w])


def distill_calls(c: Config, dtype: torch.dtype, device: torch.device | str, rows: int) -> None:
    """Distillation of the LM head from a teacher of the config's sizes: fused linear JSD (gradients in forward;
    the other losses differ only in the row kernel's KIND constexpr). The teacher is frozen."""
    h, w = (
        _leaf(rows, c.n_embd, dtype=dtype, device=device),
        _leaf(c.padded_vocab_size, c.n_embd, dtype=dtype, device=device),
    )
    ht = _leaf(rows, c.n_embd, dtype=dtype, device=device, grad=False)
    wt = _leaf(c.padded_vocab_size, c.n_embd, dtype=dtype, device=device, grad=False)
    targets = torch.randint(0, c.vocab_size, (rows,), device=device)
    _grad((fused_linear_distillation(h, w, ht, wt, targets, loss="jsd", vocab_size=c.vocab_size),), [h, w])


def ce_calls(c: Config, dtype: torch.dtype, device: torch.device | str, rows: int) -> None:
    """The standalone cross-entropy on (rows, vocab) logits."""
    logits = _leaf(rows, c.padded_vocab_size, dtype=dtype, device=device)
    _grad((cross_entropy(logits, torch.randint(0, c.vocab_size, (rows,), device=device)),), [logits])


CALLS = (norm_calls, rope_calls, mlp_calls, flce_calls, distill_calls, ce_calls)


def config_plans(
    config: Config,
    dtype: torch.dtype,
    device: torch.device | str = "meta",
    rows: int = BATCH * SEQ,
    calls: tuple[Callable[..., None], ...] = CALLS,
) -> list[LaunchPlan]:
    """Every kernel launch of a training step of ``config`` in ``dtype`` (one layer's worth: the layers repeat)."""
    with use_backend("triton"), capture_launches() as plans:
        for call in calls:
            call(config, dtype, device, rows)
    return plans


def published_plans(
    names: list[str] | None = None, dtypes: tuple[torch.dtype, ...] = DTYPES
) -> list[tuple[str, LaunchPlan]]:
    """``(tag, plan)`` for every published config (or ``names``) and dtype; tag is e.g. "Llama-3.2-1B bf16"."""
    tagged = []
    for name in names or published_names():
        config = Config.from_name(name)
        for dtype in dtypes:
            tagged += [(f"{name} {DTYPE_NAMES[dtype]}", p) for p in config_plans(config, dtype)]
    return tagged
