"""Fabric, the strategy, and the one place where a model is built, initialised and loaded per environment.

Every environment follows the same steps, so the init policy is applied identically everywhere:

1. build the model on the meta device (no memory, no PyTorch default init);
2. FSDP only: shard every block and the root with FSDP2 ``fully_shard``;
3. materialise on the target device (each FSDP rank allocates only its shards);
4. ``init_weights``: always; it rebuilds buffers, and writes parameters unless resuming;
5. load weights (resume or an initial checkpoint), shard-aware;
6. DDP/single: check that every rank holds identical weights; then hand the model to Fabric.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.strategies import ModelParallelStrategy
from torch import nn

from ..checkpoint import load_model_weights
from ..init import assert_replicas_identical, init_weights

STRATEGIES = ("auto", "ddp", "fsdp")


def default_precision(accelerator: str) -> str:
    """bf16 mixed precision on GPUs that support it, fp32 elsewhere."""
    if accelerator in ("cuda", "gpu") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def resolve_accelerator(accelerator: str) -> str:
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ValueError(f"accelerator={accelerator!r} but no CUDA GPU is available; use --accelerator cpu")
    return accelerator


def _keep_module(module: nn.Module, _mesh: object) -> nn.Module:
    # Sharding happens in setup_model (before materialisation); Fabric's parallelize hook has nothing to do.
    return module


def make_fabric(
    *,
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str | None = None,
    loggers: list | None = None,
) -> L.Fabric:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; choose one of {', '.join(STRATEGIES)}")
    accelerator = resolve_accelerator(accelerator)
    precision = precision or default_precision(accelerator)
    fabric_precision = precision
    if strategy == "fsdp":
        world = devices * num_nodes
        fabric_strategy = ModelParallelStrategy(_keep_module, data_parallel_size=world, tensor_parallel_size=1)
        if precision == "bf16-mixed":
            # FSDP2 does mixed precision itself (bf16 compute copies of fp32 shards, fp32 gradient reduction)
            fabric_precision = "32-true"
    else:
        fabric_strategy = strategy
    fabric = L.Fabric(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=fabric_strategy,
        precision=fabric_precision,
        loggers=loggers,
    )
    fabric.litliger_precision = precision  # the precision asked for (FSDP applies it in setup_model)
    return fabric


def is_fsdp(fabric: L.Fabric) -> bool:
    return isinstance(fabric.strategy, ModelParallelStrategy)


def _shard(model: nn.Module, fabric: L.Fabric) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = fabric.strategy.device_mesh["data_parallel"]
    mp = None
    if fabric.litliger_precision == "bf16-mixed":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    blocks = getattr(getattr(model, "transformer", None), "h", [])
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def setup_model(
    fabric: L.Fabric,
    build: Callable[[], nn.Module],
    *,
    seed: int,
    resuming: bool,
    load_from: Path | None = None,
) -> nn.Module:
    """Build, shard (FSDP), materialise, initialise and load a model; returns it set up by Fabric.

    ``resuming``: parameters come from ``load_from``, so only buffers are initialised.
    """
    with torch.device("meta"):
        model = build()
    if is_fsdp(fabric):
        _shard(model, fabric)
    elif fabric.litliger_precision in ("bf16-true", "16-true"):
        model.to(torch.bfloat16 if fabric.litliger_precision == "bf16-true" else torch.float16)
    model.to_empty(device=fabric.device)
    init_weights(model, seed=seed, resuming=resuming)
    if load_from is not None:
        load_model_weights(model, load_from)
    elif resuming:
        raise ValueError("resuming needs a checkpoint to load the weights from")
    if not is_fsdp(fabric):
        assert_replicas_identical(model)
    return fabric.setup_module(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's (and DDP's) wrappers: parameter names without a ``module.`` prefix."""
    from lightning.fabric.wrappers import _FabricModule

    return model.module if isinstance(model, _FabricModule) else model


def reshard(model: nn.Module) -> None:
    """Return FSDP2 parameters to their sharded form after a forward without backward (validation,
    sampling): the root module stays unsharded after forward, which would hide its parameters' shards
    from the optimizer and the checkpoint code."""
    from torch.distributed.fsdp import FSDPModule

    for module in unwrap(model).modules():
        if isinstance(module, FSDPModule):
            module.reshard()
