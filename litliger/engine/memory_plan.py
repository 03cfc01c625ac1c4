"""The memory planner: what one training step holds per device, traced on fake tensors before any GPU is rented.

``plan_memory`` builds the model on the meta device (the recipe's own ``build``: LoRA adapters and frozen
parameters included), gives it fake parameters of the training dtype (``FakeTensorMode``: shapes, no data,
no memory), creates the optimizer state with one fake step, and then traces one whole training step, forward
(with the chosen activation checkpointing), backward and optimizer step, under ``LiveBytes``: the peak of live
tensor bytes is measured on the model's real code path (the PyTorch twins of the kernels), not taken from a
formula. The same counter on real tensors measures a real step, which is how the plan is validated
(``tests/test_memory_plan.py``: within 15%).

Per device, for the strategy and world size:

- DDP (and one device): parameters, gradients and optimizer state are replicated; DDP adds its gradient
  buckets (a copy of the trainable gradients) when there are several devices.
- FSDP2: parameters, gradients and optimizer state are divided by the world size; two blocks' parameters are
  gathered at a time (the one computing and the one prefetched); during backward, the gradients of the blocks
  already done are held as shards (``_sharded_gradients``).

Activations are those of one micro-batch on every device, whatever the strategy. ``max_micro_batch_size``
traces micro-batches of 1 and 2 and solves, phase by phase of the step, for the largest that fits
(``largest_batch``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..kernels.backend import use_backend
from ..kernels.fused_linear_cross_entropy import default_chunk_size
from ..model.checkpointing import apply_activation_checkpointing, parse_checkpointing
from .args import OptimizerArgs
from .live_bytes import LiveBytes, storage_bytes
from .optim import build_optimizer

CHECKPOINTING_MODES = ("none", "selective", "full")
MAX_SEARCHED_BATCH = 1 << 20  # the largest micro-batch the planner reports
# Micro-batches up to this many tokens are checked by tracing; above it the phase-by-phase estimate stands (there
# it is exact or low: the one part that grows faster from 1 to 2 than later, the loss's chunk, is capped by then).
REFINE_TOKENS = 1 << 16
_DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.float32, "bf16-true": torch.bfloat16}


@dataclass
class StepTrace:
    """One traced training step on one device, before any sharding (bytes)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int  # held at the end of forward: what backward needs, and the loss's gradients made in forward
    phases: dict[str, int]  # the peak of each phase: "forward i", "head" (final norm + loss), "backward i", "step"
    block_parameters: int  # one transformer block's parameters in the compute dtype
    block_gradients: int = 0  # one transformer block's trainable gradients
    n_layer: int = 1

    @property
    def peak(self) -> int:
        return max(self.phases.values())


@dataclass
class Plan:
    """A memory plan; ``per_device`` in bytes, see the module docstring."""

    per_device: dict[str, int]
    fits: bool | None
    device_memory: int | None
    max_micro_batch_size: dict[str, int | None] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _fake_model(build: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """``build()`` on the meta device, then fake parameters and buffers (created in the active FakeTensorMode)."""
    with torch.device("meta"):
        model = build()
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                dt = dtype if p.is_floating_point() else p.dtype
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=dt), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    return model


def trace_step(
    build: Callable[[], nn.Module],
    *,
    micro_batch_size: int,
    seq_len: int,
    vocab_size: int,
    precision: str = "32-true",
    checkpointing: str = "none",
    optimizer: OptimizerArgs | None = None,
) -> StepTrace:
    """Trace one training step of ``build()``'s model on fake tensors (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if precision not in _DTYPES:
        raise ValueError(f"precision={precision!r} cannot be planned; use 32-true, bf16-mixed or bf16-true")
    mixed = precision == "bf16-mixed"
    with FakeTensorMode(), use_backend("torch"):
        model = _fake_model(build, _DTYPES[precision])
        model.max_seq_length = seq_len
        apply_activation_checkpointing(model, checkpointing)
        model.train()
        opt = build_optimizer(model, optimizer or OptimizerArgs())
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:  # one step creates the optimizer state: the steady state every later step has
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        held = [*model.parameters(), *model.buffers()]
        states = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        params, state = storage_bytes(held), storage_bytes(states)
        idx = torch.zeros(micro_batch_size, seq_len, dtype=torch.long)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mixed else contextlib.nullcontext()
        live = LiveBytes(params + state, [*held, *states])
        hooks = [model.transformer.ln_f.register_forward_pre_hook(lambda *_: live.enter("head"))]
        for i, block in enumerate(model.transformer.h):
            hooks.append(block.register_forward_pre_hook(lambda *_, i=i: live.enter(f"forward {i}")))
            hooks.append(block.register_full_backward_pre_hook(lambda *_, i=i: live.enter(f"backward {i}")))
        with live:
            with autocast:
                loss = model(idx, targets=idx, reduction="sum")
            live.mark("forward")
            loss.backward()
            live.enter("step")
            opt.step()
            opt.zero_grad(set_to_none=True)
        for hook in hooks:
            hook.remove()
        block = model.transformer.h[0]
        compute = torch.bfloat16 if precision != "32-true" else torch.float32
        block_params = sum(p.numel() for p in block.parameters()) * torch.tensor([], dtype=compute).element_size()
        block_grads = sum(p.numel() * p.element_size() for p in block.parameters() if p.requires_grad)
        n_layer = len(model.transformer.h)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    return StepTrace(
        parameters=params,
        gradients=grads,
        optimizer=state,
        activations=live.marks["forward"] - params - state,
        phases={k: v for k, v in live.phase_peaks.items() if k != "start"},
        block_parameters=block_params,
        block_gradients=block_grads,
        n_layer=n_layer,
    )


def per_device(trace: StepTrace, *, strategy: str, world_size: int) -> tuple[dict[str, int], dict[str, int]]:
    """The traced step on each device of ``strategy`` over ``world_size`` devices (see the module docstring):
    (the parts with ``peak``, the peak of every phase)."""
    if strategy == "fsdp" and world_size > 1:
        share = {k: -(-getattr(trace, k) // world_size) for k in ("parameters", "gradients", "optimizer")}
        fixed = trace.parameters + trace.optimizer - share["parameters"] - share["optimizer"]  # off each device
        gathered = 2 * trace.block_parameters
        kept = 1 - 1 / world_size
        phases = {p: v - fixed - int(_sharded_gradients(trace, p) * kept) + (gathered if p != "step" else 0)
                  for p, v in trace.phases.items()}  # fmt: skip
        extra = {"gathered_blocks": gathered}
    else:
        share = {"parameters": trace.parameters, "gradients": trace.gradients, "optimizer": trace.optimizer}
        buckets = trace.gradients if world_size > 1 else 0
        phases = {p: v + buckets for p, v in trace.phases.items()}
        extra = {"ddp_buckets": buckets}
    return {**share, **extra, "activations": trace.activations, "peak": max(phases.values())}, phases


def _sharded_gradients(trace: StepTrace, phase: str) -> int:
    """The gradients the trace holds whole during ``phase`` that FSDP2 holds as shards: the trace accumulates
    every gradient until the step, FSDP2 reduce-scatters each block's once its backward is done. In "backward i"
    those are the blocks after i and the head's (the fused loss makes the LM head's gradient in forward)."""
    head = trace.gradients - trace.n_layer * trace.block_gradients
    if phase == "step":
        return trace.gradients
    if phase.startswith("backward "):
        return head + (trace.n_layer - 1 - int(phase.split()[1])) * trace.block_gradients
    return head if phase == "head" else 0


def plan_memory(
    build: Callable[[], nn.Module],
    *,
    micro_batch_size: int,
    seq_len: int,
    vocab_size: int,
    n_layer: int,
    precision: str,
    strategy: str,
    world_size: int,
    checkpointing: str,
    optimizer: OptimizerArgs | None = None,
    device_memory: int | None = None,
    search: bool = True,
    kv_cache: int = 0,
) -> Plan:
    """The plan of one configuration; with ``device_memory`` (bytes) and ``search``, also the largest micro-batch
    that fits with each checkpointing mode (none, selective, full)."""
    parse_checkpointing(checkpointing)
    common = dict(seq_len=seq_len, vocab_size=vocab_size, precision=precision, optimizer=optimizer)

    def device(mode: str, batch: int) -> tuple[dict[str, int], dict[str, int]]:
        trace = trace_step(build, micro_batch_size=batch, checkpointing=mode, **common)
        return per_device(trace, strategy=strategy, world_size=world_size)

    parts = device(checkpointing, micro_batch_size)[0]
    parts["loss_chunk"] = loss_chunk_bytes(micro_batch_size * seq_len, vocab_size, precision)
    parts["kv_cache_generation"] = kv_cache
    fits = None if device_memory is None else parts["peak"] <= device_memory
    largest: dict[str, int | None] = {}
    if device_memory is not None and search:
        for mode in CHECKPOINTING_MODES:
            guess = largest_batch(device(mode, 1)[1], device(mode, 2)[1], device_memory)
            if guess * seq_len <= REFINE_TOKENS:  # a trace's time grows with its tokens (the loss's chunk loop)
                guess = refine_batch(guess, lambda m, mode=mode: device(mode, m)[0]["peak"] <= device_memory)
            largest[mode] = guess
    settings = {
        "micro_batch_size": micro_batch_size, "seq_len": seq_len, "precision": precision, "strategy": strategy,
        "world_size": world_size, "activation_checkpointing": checkpointing,
        "checkpointing": parse_checkpointing(checkpointing).describe(n_layer),
    }  # fmt: skip
    return Plan(per_device=parts, fits=fits, device_memory=device_memory, max_micro_batch_size=largest,
                settings=settings)  # fmt: skip


def loss_chunk_bytes(n_tokens: int, vocab_size: int, precision: str) -> int:
    """The logits of one chunk of the fused linear cross-entropy (the Triton path's rule), part of the peak."""
    element = 4 if precision == "32-true" else 2
    return default_chunk_size(n_tokens, 0, vocab_size, element) * vocab_size * element


def largest_batch(one: dict[str, int], two: dict[str, int], memory: int) -> int:
    """The largest micro-batch m whose peak fits ``memory``, from the phase peaks of micro-batches 1 and 2.

    Each phase's peak is a line in m (what the phase holds that does not depend on the batch, plus m times what
    does); the step's peak is the highest of those lines, so it is solved phase by phase instead of from the
    step's peak alone, which a batch-independent phase (the optimizer step, or the gradients at the end of
    backward) can hide at small m.
    """
    m = MAX_SEARCHED_BATCH
    for phase, at_one in one.items():
        slope = two.get(phase, at_one) - at_one
        if at_one > memory:
            return 0
        if slope > 0:
            m = min(m, (memory - at_one) // slope + 1)
    return int(m)


def refine_batch(guess: int, fits: Callable[[int], bool], tries: int = 6) -> int:
    """``guess`` checked by tracing: lowered while it does not fit, raised while one more does (a phase's
    growth need not be exactly linear: the loss's chunk stops growing once it reaches its cap)."""
    m = guess
    if m <= 0 or m >= MAX_SEARCHED_BATCH:
        return m
    for _ in range(tries):
        if not fits(m):
            m -= 1
            if m == 0:
                return 0
        elif fits(m + 1):
            m += 1
        else:
            return m
    return m


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_plan(plan: Plan) -> str:
    """The plan as a few lines for a terminal or a run's header."""
    s, d = plan.settings, plan.per_device
    lines = [
        f"memory plan per device: micro batch {s['micro_batch_size']} x {s['seq_len']} tokens, {s['precision']}, "
        f"{s['strategy']} x {s['world_size']}; {s['checkpointing']}",
        "  " + ", ".join(f"{k} {gib(v)}" for k, v in d.items() if not k.endswith("peak") and v),
        f"  peak {gib(d['peak'])}"
        + (
            ""
            if plan.device_memory is None
            else f" of {gib(plan.device_memory)}: {'fits' if plan.fits else 'does NOT fit'}"
        ),
    ]
    if plan.max_micro_batch_size:
        sizes = ", ".join(f"{k} {v}" for k, v in plan.max_micro_batch_size.items())
        lines.append(f"  largest micro batch that fits: {sizes}")
    return "\n".join(lines)
