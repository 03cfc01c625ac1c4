"""The one weight-initialisation policy: which values every parameter gets, and how they are applied.

What values (the *scheme*, named by ``Config.init_scheme``). Modules never pick a std themselves: their
``reset_parameters()`` names each tensor's *role* and the scheme maps the role to a distribution.

=============  ==========================================  ==============================================
role           "normal" (GPT-2 / Megatron, nanoGPT)         "small_wang" (GPT-NeoX)
=============  ==========================================  ==============================================
embedding      N(0, init_std)                               N(0, sqrt(2 / (5 d)))      small init
pos_embedding  N(0, init_std)                               N(0, sqrt(2 / (5 d)))
linear         N(0, init_std)                               N(0, sqrt(2 / (5 d)))
out_proj       N(0, init_std / sqrt(2 n_layer))             N(0, 2 / (n_layer sqrt(d)))  Wang init
lm_head        N(0, init_std)                               N(0, sqrt(2 / (5 d)))
bias           0                                            0
norm_weight    1 - norm_offset (0 for Gemma's (1 + w))      1 - norm_offset
norm_bias      0                                            0
lora_a         U(-1/sqrt(in), 1/sqrt(in))                   the same (any scheme)
lora_b         0                                            0
=============  ==========================================  ==============================================

``out_proj`` is every projection that writes into the residual stream (attention output, MLP down
projection). Sources: "normal" is GPT-2's scheme as used by Megatron-LM and nanoGPT (std 0.02, residual
projections scaled by 1/sqrt(2 n_layer)); "small_wang" is GPT-NeoX's ``small_init`` (Nguyen & Salazar,
2019, "Transformers without Tears") with ``wang_init`` (Ben Wang's, used for GPT-J / GPT-NeoX) on the
residual projections. ``lora_a`` / ``lora_b`` are a LoRA adapter's down (r x in) and up (out x r)
projections, initialised as PEFT does by default: A = kaiming_uniform(a=sqrt(5)), whose bound
gain * sqrt(3 / fan_in) with gain = sqrt(2 / (1 + a^2)) is 1/sqrt(in) (std 1/sqrt(3 in)), and B = 0, so
that B A = 0 and the adapted model starts as exactly the base model (Hu et al., 2021, "LoRA").

How they are applied (:func:`init_weights`, the engine's one entry point). Every draw comes from a
generator seeded by ``(seed, parameter name, row block)``: the values depend only on the seed and the
parameter's full name and shape, never on the device count, the order of initialisation or which rows a
rank holds. A replicated model (one device, DDP) and a sharded one (FSDP2 DTensors, each rank filling only
its rows) therefore get bitwise-identical weights for one seed, on the same kind of device. Buffers (the
rotary cache) are always rebuilt; parameters only when not resuming.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn


class InitConfig(Protocol):
    """What the policy reads of a model's config (``litliger.model.Config`` has these fields): the policy sits
    with the layers it fills, below the model, so it names the fields it needs instead of importing Config."""

    init_scheme: str
    init_std: float
    n_layer: int
    n_embd: int


ROLES = (
    "embedding",
    "pos_embedding",
    "linear",
    "out_proj",
    "lm_head",
    "bias",
    "norm_weight",
    "norm_bias",
    "lora_a",  # a LoRA adapter's A (r x in) and B (out x r): litliger.nn.Linear.add_lora
    "lora_b",
)
# Random values are drawn in blocks of about this many elements (whole rows); the split depends on the
# tensor's global shape only, so a shard can draw just the blocks that overlap its rows.
_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class InitPolicy:
    """The values of one scheme for one model shape."""

    scheme: str = "normal"
    n_layer: int = 1
    n_embd: int = 768
    base_std: float = 0.02

    @classmethod
    def from_config(cls, config: InitConfig) -> InitPolicy:
        return cls(config.init_scheme, config.n_layer, config.n_embd, config.init_std)

    def std(self, role: str) -> float:
        """Standard deviation of a randomly initialised role."""
        if self.scheme == "normal":
            return self.base_std / math.sqrt(2 * self.n_layer) if role == "out_proj" else self.base_std
        if self.scheme == "small_wang":
            if role == "out_proj":
                return 2.0 / (self.n_layer * math.sqrt(self.n_embd))
            return math.sqrt(2.0 / (5.0 * self.n_embd))
        raise ValueError(f"unknown init scheme {self.scheme!r}; choose 'normal' or 'small_wang'")

    def uniform_bound(self, role: str, fan_in: int | None) -> float | None:
        """The bound b of a role drawn from U(-b, b), or None for a normal one (the same in every scheme)."""
        if role != "lora_a":
            return None
        if fan_in is None or fan_in < 1:
            raise ValueError(f"init role 'lora_a' needs fan_in=in_features >= 1, got {fan_in}")
        return 1.0 / math.sqrt(fan_in)

    def constant(self, role: str, norm_offset: float = 0.0) -> float | None:
        """The fill value of a constant role, or None for a random one."""
        if role in ("bias", "norm_bias", "lora_b"):
            return 0.0
        if role == "norm_weight":
            return 1.0 - norm_offset
        if role not in ROLES:
            raise ValueError(f"unknown init role {role!r}; roles are {ROLES}")
        return None


@dataclass
class _Walk:
    policy: InitPolicy
    seed: int | None  # None: drawn from the global RNG at the first random fill
    write_parameters: bool
    prefix: str = ""
    seen: set[str] = field(default_factory=set)

    def draw_seed(self) -> int:
        if self.seed is None:
            self.seed = int(torch.randint(0, 2**62, ()))
        return self.seed


_walk: ContextVar[_Walk | None] = ContextVar("litliger_init_walk", default=None)


def _current() -> _Walk:
    # A module reset on its own, outside init_weights, gets the default scheme and a seed from the global
    # RNG (so torch.manual_seed still makes it reproducible); the engine always goes through init_weights.
    walk = _walk.get()
    return walk if walk is not None else _Walk(InitPolicy(), None, write_parameters=True)


def _full_name(walk: _Walk, name: str) -> str:
    return f"{walk.prefix}.{name}" if walk.prefix else name


def init_parameter(
    module: nn.Module, name: str, role: str, *, norm_offset: float = 0.0, fan_in: int | None = None
) -> None:
    """Initialise ``module.<name>`` as ``role`` says; called from ``reset_parameters()``.

    ``fan_in`` (the layer's in_features) is needed by the roles whose distribution depends on it (lora_a).
    Skipped (but counted as covered) while resuming: a checkpoint provides the values.
    """
    tensor = getattr(module, name)
    if tensor is None:
        return
    walk = _current()
    full = _full_name(walk, name)
    walk.seen.add(full)
    if not walk.write_parameters:
        return
    local, offsets, global_shape = _local_view(tensor, full)
    with torch.no_grad():
        value = walk.policy.constant(role, norm_offset)
        if value is not None:
            local.fill_(value)
        elif (bound := walk.policy.uniform_bound(role, fan_in)) is not None:
            _fill_uniform(local, offsets, global_shape, bound, walk.draw_seed(), full)
        else:
            _fill_normal(local, offsets, global_shape, walk.policy.std(role), walk.draw_seed(), full)


def init_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set ``module.<name>`` (a buffer) to ``value``; buffers are rebuilt on every initialisation."""
    walk = _current()
    walk.seen.add(_full_name(walk, name))
    with torch.no_grad():
        getattr(module, name).copy_(value)


def _local_view(tensor: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[int, ...], torch.Size]:
    """The locally held part of ``tensor``, its offset in the global tensor, and the global shape."""
    if tensor.is_meta:
        raise RuntimeError(
            f"cannot initialise {name}: it is on the meta device. Materialise the model first "
            "(model.to_empty(device=...)) and then call litliger.init.init_weights"
        )
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        return tensor.to_local(), tuple(offsets), tensor.shape
    return tensor, (0,) * tensor.dim(), tensor.shape


def _seed_for(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _fill_normal(
    local: torch.Tensor, offsets: tuple[int, ...], global_shape: torch.Size, std: float, seed: int, name: str
) -> None:
    """Fill ``local`` (the slice of a ``global_shape`` tensor starting at ``offsets``) with N(0, std) values
    that are the same whichever slice a process holds."""
    _fill_blocks(local, offsets, global_shape, seed, name, lambda v, g: v.normal_(0.0, std, generator=g))


def _fill_uniform(
    local: torch.Tensor, offsets: tuple[int, ...], global_shape: torch.Size, bound: float, seed: int, name: str
) -> None:
    """Like :func:`_fill_normal`, with U(-bound, bound) values."""
    _fill_blocks(local, offsets, global_shape, seed, name, lambda v, g: v.uniform_(-bound, bound, generator=g))


def _fill_blocks(
    local: torch.Tensor,
    offsets: tuple[int, ...],
    global_shape: torch.Size,
    seed: int,
    name: str,
    draw: Callable[[torch.Tensor, torch.Generator], object],
) -> None:
    """Fill ``local`` from whole row blocks of the global tensor, each drawn in fp32 by ``draw(values,
    generator)`` from a generator seeded by (seed, name, block): a shard draws only the blocks its rows
    overlap and keeps its rows, so every slicing of the rows gives the same values."""
    if local.numel() == 0:
        return
    rows = global_shape[0] if global_shape else 1
    rest = tuple(global_shape[1:])
    row_numel = math.prod(rest)
    block_rows = max(1, _BLOCK_ELEMENTS // max(1, row_numel))
    start = offsets[0] if offsets else 0
    stop = start + (local.shape[0] if local.dim() else 1)
    inner = tuple(slice(o, o + n) for o, n in zip(offsets[1:], local.shape[1:], strict=True))
    generator = torch.Generator(device=local.device)
    for block in range(start // block_rows, (stop - 1) // block_rows + 1):
        b0, b1 = block * block_rows, min(rows, (block + 1) * block_rows)
        generator.manual_seed(_seed_for(seed, name, block))
        values = torch.empty((b1 - b0, *rest), device=local.device, dtype=torch.float32)
        draw(values, generator)
        lo, hi = max(start, b0), min(stop, b1)
        part = values[(slice(lo - b0, hi - b0), *inner)]
        if local.dim() == 0:
            local.copy_(part.reshape(()))
        else:
            local[lo - start : hi - start].copy_(part)


def _owns_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def init_weights(model: nn.Module, *, seed: int, resuming: bool = False, config: InitConfig | None = None) -> None:
    """Give ``model`` its complete initial state: the engine's one entry point.

    Walks every module that owns parameters or buffers and calls its ``reset_parameters()`` with the
    policy of ``config`` (default ``model.config``) in force. Buffers are always rebuilt; parameters are
    written only when not ``resuming``. Works on plain tensors and on FSDP2-sharded DTensors (each rank
    fills its own rows). Raises if any parameter or buffer is left uncovered.
    """
    config = config if config is not None else model.config
    walk = _Walk(InitPolicy.from_config(config), seed, write_parameters=not resuming)
    token = _walk.set(walk)
    try:
        for prefix, module in model.named_modules():
            if not _owns_state(module):
                continue
            if not callable(getattr(module, "reset_parameters", None)):
                raise RuntimeError(
                    f"module {prefix or '<root>'} ({type(module).__name__}) owns parameters or buffers but has no "
                    "reset_parameters(); implement one that calls litliger.init.init_parameter / init_buffer"
                )
            walk.prefix = prefix
            module.reset_parameters()
    finally:
        _walk.reset(token)
    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    missing = sorted(expected - walk.seen)
    if missing:
        # Modules such as torch.nn.Linear reset themselves with PyTorch's defaults, not this policy.
        raise RuntimeError(
            f"init_weights left {len(missing)} tensors outside the init policy: {missing[:8]}; their modules' "
            "reset_parameters() must initialise every parameter and buffer through litliger.init"
        )


def checksum(model: nn.Module) -> torch.Tensor:
    """A float64 vector of per-tensor fingerprints of the model's local parameters (bit-sensitive)."""
    sums = []
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            bits = p.detach().reshape(-1)
            as_int = bits.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[bits.element_size()])
            sums.append(torch.stack([as_int.sum(dtype=torch.int64).double(), bits.double().square().sum()]))
    return torch.stack(sums).flatten() if sums else torch.zeros(0, dtype=torch.float64)


def assert_replicas_identical(model: nn.Module) -> None:
    """Fail loudly if data-parallel ranks hold different parameters (cheap: one all-gather of fingerprints)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    local = checksum(model)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = local.to(device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    names = [n for n, _ in sorted(model.named_parameters())]
    for rank, other in enumerate(gathered):
        differs = (other != gathered[0]).reshape(-1, 2).any(dim=1).nonzero().flatten().tolist()
        if differs:
            raise RuntimeError(
                f"rank {rank} and rank 0 initialised different weights, e.g. {[names[i] for i in differs[:5]]}; "
                "data-parallel replicas must start identical"
            )
