"""``litliger plan``: what a pretrain or finetune config holds per device, before the job starts.

It reads the same config file as ``litliger pretrain`` or ``litliger finetune`` (the keys it does not need, such
as data or eval, are accepted and ignored) and traces one training step on fake tensors
(``engine/memory_plan.py``). ``report_memory_plan`` prints the same plan at the start of every run.
"""

from __future__ import annotations

import json as json_module
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoint.io import read_config
from ..engine import OptimizerArgs, PlanArgs
from ..engine.memory_plan import format_plan
from ..model.config import Config
from ..model.gpt import GPT
from ..model.lora import LoRAArgs
from ..util.checks import check_choice, check_positive
from .align import OBJECTIVES, planned_train
from .common import device_memory, does_not_fit, plan_run
from .finetune import FinetuneTrainArgs, build_finetune_model
from .pretrain import resolve_config


def main(
    model_name: str | None = None,
    model_config: Config | None = None,
    model: dict[str, Any] | None = None,
    checkpoint_dir: Path | None = None,
    method: Literal["lora", "full"] | None = None,
    lora: LoRAArgs = LoRAArgs(),
    precision: Literal["bf16-mixed", "bf16-true", "32-true"] | None = None,
    train: FinetuneTrainArgs = FinetuneTrainArgs(),
    optimizer: OptimizerArgs = OptimizerArgs(),
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    plan: PlanArgs = PlanArgs(),
    json: bool = False,
    initial_checkpoint_dir: Path | None = None,
    loss: Literal["sft", "dpo", "simpo", "orpo", "kd"] = "sft",
) -> dict[str, Any]:
    """Plan the memory of a pretrain or finetune config per device (``--config`` takes either file: the keys a
    plan does not need, such as data or eval, are left out of it by ``cli.plan_config``).

    Args:
        model_name: the model of a pretrain config (``litliger models`` lists them).
        model_config: or a full model config.
        model: ``--model.FIELD VALUE`` changes to the ``model_name`` config.
        checkpoint_dir: a finetune config's base checkpoint (its model_config.yaml is read, unless --model_name
            names the model: a plan before the checkpoint is downloaded).
        method: a finetune's method, ``lora`` or ``full``; with ``checkpoint_dir`` and no method: lora.
        lora: ``--lora.*`` of a LoRA finetune.
        precision: the training precision (default bf16-mixed when planning for a GPU, else 32-true).
        train: ``--train.*``: micro_batch_size, max_seq_length, activation_checkpointing are read.
        optimizer: ``--optimizer.*``: the optimizer whose state is planned.
        devices: devices per node.
        num_nodes: machines.
        strategy: ``auto``/``ddp`` (replicated) or ``fsdp`` (sharded).
        plan: ``--plan.device_memory`` (default: the visible GPU's), ``--plan.strict`` (exit 1 when it does not fit).
        json: print one JSON object instead of the table.
        initial_checkpoint_dir: a pretrain config's starting weights (their model_config.yaml is read).
        loss: a finetune's objective: dpo, simpo and orpo batches hold two sequences per pair (the micro batch
            planned and found is then in sequences); kd's teacher is not in the plan.
    """
    for name, value in (("devices", devices), ("num_nodes", num_nodes)):
        check_positive(name, value, f"set the {'devices per node' if name == 'devices' else 'machines'}")
    if initial_checkpoint_dir is not None and not (Path(initial_checkpoint_dir) / "model_config.yaml").is_file():
        raise ValueError(
            f"{initial_checkpoint_dir} holds no model_config.yaml, in --initial_checkpoint_dir; name a litliger "
            "checkpoint folder"
        )
    if checkpoint_dir is not None:  # a finetune config
        method = method or "lora"
    if checkpoint_dir is not None and model_name is None and model_config is None:
        config = read_config(Path(checkpoint_dir))
    else:  # a pretrain config, or a finetune config planned before its checkpoint is there (--model_name)
        config = resolve_config(model_name, model_config, initial_checkpoint_dir, model)
    memory = device_memory(plan, torch.device("cuda", 0) if torch.cuda.is_available() else None)
    precision = precision or ("bf16-mixed" if memory is not None else "32-true")
    seq_len = train.max_seq_length or config.block_size
    world = devices * num_nodes

    def build() -> torch.nn.Module:
        if method is None:
            return GPT(config)
        return build_finetune_model(config, method, lora if method == "lora" else None, tuple(train.trainable))[0]

    check_choice("loss", loss, OBJECTIVES)
    result = plan_run(
        config,
        build,
        planned_train(train, loss),
        optimizer,
        precision=precision,
        seq_len=seq_len,
        strategy="fsdp" if strategy == "fsdp" else "ddp",
        world=world,
        memory=memory,
        search=True,
    )
    result.settings["method"] = method or "pretrain"  # fmt: skip
    if json:
        print(json_module.dumps(result.to_json()))
    else:
        print(format_plan(result))
        if memory is None:
            print("  (give --plan.device_memory, e.g. 80GB, for whether it fits and the largest micro batch)")
    if plan.strict and result.fits is False:
        raise ValueError(does_not_fit(result) + ", in --plan.strict")
    return result.to_json()
