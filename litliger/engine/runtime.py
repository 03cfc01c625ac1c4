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

import os
from collections.abc import Callable

import lightning as L
import torch
from lightning.fabric.strategies import ModelParallelStrategy
from torch import nn

from ..model.checkpointing import apply_activation_checkpointing
from ..model.parallelize import parallelize, unwrap
from ..nn.init import assert_replicas_identical, init_weights

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


def check_launch(devices: int, num_nodes: int, environ: dict[str, str] | None = None) -> None:
    """Refuse process counts that the launcher cannot provide, instead of waiting forever for peers."""
    env = os.environ if environ is None else environ
    for name, value in (("devices", devices), ("num_nodes", num_nodes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1, in --{name}")
    if "WORLD_SIZE" in env and "LOCAL_RANK" in env:  # torchrun (or another torch.distributed launcher)
        world = int(env["WORLD_SIZE"])
        if devices * num_nodes != world:
            raise ValueError(
                f"--devices {devices} x --num_nodes {num_nodes} = {devices * num_nodes} processes, but the launcher "
                f"started {world} (WORLD_SIZE); pass --devices and --num_nodes matching torchrun's "
                "--nproc_per_node and --nnodes"
            )
    elif "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        tasks = int(env["SLURM_NTASKS"])
        if devices * num_nodes != tasks:
            raise ValueError(
                f"--devices {devices} x --num_nodes {num_nodes} = {devices * num_nodes} processes, but SLURM runs "
                f"{tasks} tasks; set --ntasks-per-node to --devices and --nodes to --num_nodes"
            )
    elif num_nodes > 1 and "NODE_RANK" not in env:
        raise ValueError(
            f"--num_nodes {num_nodes} but no multi-node launcher is present (no torchrun WORLD_SIZE, SLURM or "
            "NODE_RANK/MASTER_ADDR): the run would wait for the other nodes forever; launch every node with "
            "torchrun or srun, or use --num_nodes 1"
        )


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
    check_launch(devices, num_nodes)
    accelerator = resolve_accelerator(accelerator)
    precision = precision or default_precision(accelerator)
    if precision == "16-true":
        # fp16 weights and optimizer state: AdamW's eps (1e-8) is 0 in fp16, so any parameter with a zero
        # gradient (an unused embedding row) becomes 0/0 = NaN after one step
        raise ValueError(
            "precision=16-true cannot train: AdamW's eps and small updates underflow in fp16 and weights turn NaN, "
            "in --precision; use bf16-mixed, bf16-true or 32-true"
        )
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
    join_elastic_group(accelerator)
    return fabric


def join_elastic_group(accelerator: str, environ: dict[str, str] | None = None) -> bool:
    """Under torchrun, create the process group on a store namespace of this restart attempt; returns
    whether it did.

    torchrun's static rendezvous keeps one store for all restarts, and the process group publishes each
    rank's gloo/nccl address in it under fixed keys. After ``--max-restarts`` restarts a group, a rank can
    read the address of the process that died and fail with "connection refused". A prefix per attempt
    (``TORCHELASTIC_RESTART_COUNT``) gives every attempt fresh keys, on the static and the c10d rendezvous
    alike. Fabric then finds the group initialised and uses it.
    """
    import torch.distributed as dist

    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not dist.is_available() or dist.is_initialized():
        return False
    from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=default_pg_timeout)
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    scoped = dist.PrefixStore(f"litliger/attempt-{attempt}", store)
    backend = "nccl" if accelerator in ("cuda", "gpu") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
    dist.init_process_group(
        backend, store=scoped, rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), timeout=default_pg_timeout
    )
    return True


def is_fsdp(fabric: L.Fabric) -> bool:
    return isinstance(fabric.strategy, ModelParallelStrategy)


def setup_model(
    fabric: L.Fabric,
    build: Callable[[], nn.Module],
    *,
    seed: int,
    resuming: bool,
    load: Callable[[nn.Module], None] | None = None,
    compile: bool = False,
    checkpointing: str = "none",
    offload: str = "none",
    frozen: bool = False,
) -> nn.Module:
    """Build, shard (FSDP), materialise, initialise and load a model; returns it set up by Fabric.

    ``build`` runs under the meta device (it also decides which parameters are frozen). ``load(model)``
    fills the materialised, initialised model from files (shard-aware). ``resuming``: every parameter
    comes from ``load``, so only buffers are initialised. ``compile``: ``torch.compile`` the model in place
    (``Module.compile``: parameter names, and so checkpoints, unchanged); litliger's fused ops are custom ops
    that it traces through (litliger/kernels/_custom_ops.py). ``checkpointing``: the activation checkpointing
    mode (model/checkpointing.py), set on the blocks before sharding; ``offload`` "params"/"optimizer": FSDP2's
    CPU offload (``check_memory_options`` has refused it where it cannot work). ``frozen``: a model that never
    trains (a distillation teacher): sharded under FSDP as a trained one, but not wrapped for DDP (which refuses
    a module without a trainable parameter) and so left on its device as it is; run it under ``fabric.autocast``.
    """
    with torch.device("meta"):
        model = build()
    apply_activation_checkpointing(model, checkpointing)
    if is_fsdp(fabric):
        bf16_mixed = fabric.litliger_precision == "bf16-mixed"
        mesh = fabric.strategy.device_mesh["data_parallel"]
        parallelize(model, mesh, torch.bfloat16 if bf16_mixed else None, cpu_offload=offload in ("params", "optimizer"))
    elif fabric.litliger_precision in ("bf16-true", "16-true"):
        model.to(torch.bfloat16 if fabric.litliger_precision == "bf16-true" else torch.float16)
    model.to_empty(device=fabric.device)
    init_weights(model, seed=seed, resuming=resuming)
    if load is not None:
        load(model)
    elif resuming:
        raise ValueError("resuming needs a checkpoint to load the weights from")
    if not is_fsdp(fabric):
        assert_replicas_identical(model)
    if compile:
        model.compile()
    if frozen and not is_fsdp(fabric):
        return model
    return fabric.setup_module(model)


def check_memory_options(fabric: L.Fabric, offload: str, checkpointing: str, compile: bool) -> None:
    """Refuse, before any work, ``--train.offload`` where there is nothing to offload to or no mechanism to do it,
    and ``--compile`` with activation checkpointing."""
    if compile and checkpointing != "none":
        # inductor (torch 2.14) fails on the checkpointed blocks' backward ("Node _unsafe_masked_index_put_accumulate
        # was invalid, but is output"); eager checkpointing and compile without it both work
        raise ValueError(
            f"--compile cannot be combined with train.activation_checkpointing={checkpointing!r}: torch's inductor "
            "fails to compile checkpointed blocks, in --compile; drop one of them"
        )
    if offload == "none":
        return
    if fabric.device.type != "cuda":
        raise ValueError(
            f"train.offload={offload!r} moves GPU memory to the CPU, but this run trains on {fabric.device.type}: "
            "there is nothing to offload to, in --train.offload; leave it at none"
        )
    if offload in ("params", "optimizer") and not is_fsdp(fabric):
        raise ValueError(
            f"train.offload={offload!r} is FSDP2's CPU offload, in --train.offload; use --strategy fsdp with it, or "
            "--train.offload activations"
        )


def reshard(model: nn.Module) -> None:
    """Return FSDP2 parameters to their sharded form after a forward without backward (validation,
    sampling): the root module stays unsharded after forward, which would hide its parameters' shards
    from the optimizer and the checkpoint code."""
    from torch.distributed.fsdp import FSDPModule

    for module in unwrap(model).modules():
        if isinstance(module, FSDPModule):
            module.reshard()
