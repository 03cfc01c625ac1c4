"""How a GPT is parallelised, owned by the model (as torchtitan's ``parallelize``): FSDP2 shards every block,
then the root. The engine calls ``parallelize`` with its mesh; it knows nothing of the model's inside.

``unwrap`` gives the user's module inside Fabric's wrapper without importing Lightning: if Lightning is not
loaded, nothing can be wrapped by it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def parallelize(
    model: nn.Module, mesh: object, param_dtype: torch.dtype | None = None, *, cpu_offload: bool = False
) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over ``mesh``: each transformer block, then the root (the
    embeddings, final norm and head). ``param_dtype`` (e.g. bf16 for bf16-mixed) is what the shards are
    gathered to for compute; gradients are reduced in fp32. ``cpu_offload``: FSDP2's ``CPUOffloadPolicy``
    (sharded parameters, their gradients and so the optimizer state live in pinned CPU memory; the optimizer
    steps on the CPU). Activation checkpointing is set on the blocks before this (``prepare_blocks``)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict = {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    for block in getattr(getattr(model, "transformer", None), "h", []):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's (and DDP's) wrappers: parameter names without a ``module.`` prefix."""
    wrappers = sys.modules.get("lightning.fabric.wrappers")
    if wrappers is not None and isinstance(model, wrappers._FabricModule):
        return model.module
    return model
