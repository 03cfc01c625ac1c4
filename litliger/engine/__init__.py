"""The one training engine shared by pretraining and finetuning.

    runtime.py         Fabric, strategies, and building/initialising/loading a model per environment
    loop.py            fit: accumulation, clipping, schedule, logging, saves, signals
    losses.py          the loss-function contract, the next-token loss, validation over all ranks
    training_state.py  training checkpoints (model files + per-rank state) written atomically, resume
    state_codec.py     the per-rank state as JSON + safetensors (never pickle)
    upgrade.py         ``litliger upgrade_checkpoint``: converts an earlier litliger's pickled state, knowingly
    session.py, signals.py, metrics.py, optim.py, args.py   the run lock and signals, metrics.jsonl and
                       loggers, the optimizer and LR schedule, the argument groups

Names are imported from their module on first use (PEP 562): ``from litliger.engine.signals import ...`` or
``from litliger.engine import fit`` loads only what it names, so a command that never trains (serve, generate,
convert) does not import Lightning through this package.

May import: ``util``, ``kernels``, ``nn``, ``model``, ``checkpoint``, ``data``, Lightning. Never the
recipes, inference or eval.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "EvalArgs": "args",
    "OptimizerArgs": "args",
    "PlanArgs": "args",
    "TrainArgs": "args",
    "FitSetup": "loop",
    "Progress": "loop",
    "fit": "loop",
    "LossFn": "losses",
    "next_token_count": "losses",
    "next_token_loss": "losses",
    "validate": "losses",
    "make_loggers": "metrics",
    "build_optimizer": "optim",
    "lr_at": "optim",
    "check_memory_options": "runtime",
    "is_fsdp": "runtime",
    "make_fabric": "runtime",
    "reshard": "runtime",
    "setup_model": "runtime",
    "training_session": "session",
    "RunInterrupted": "signals",
    "StopSignals": "signals",
    "check_resumable": "training_state",
    "find_resume_checkpoint": "training_state",
    "finished_run": "training_state",
    "has_checkpoints": "training_state",
    "is_complete": "training_state",
    "load_training_state": "training_state",
    "on_rank_zero": "training_state",
    "resolve_resume": "training_state",
    "resolve_resume_on_all_ranks": "training_state",
    "save_training_checkpoint": "training_state",
    "unwrap": "..model.parallelize",
}

__all__ = [
    "EvalArgs",
    "FitSetup",
    "LossFn",
    "OptimizerArgs",
    "Progress",
    "PlanArgs",
    "TrainArgs",
    "build_optimizer",
    "check_memory_options",
    "check_resumable",
    "find_resume_checkpoint",
    "finished_run",
    "fit",
    "has_checkpoints",
    "is_complete",
    "is_fsdp",
    "load_training_state",
    "on_rank_zero",
    "lr_at",
    "make_fabric",
    "make_loggers",
    "next_token_count",
    "next_token_loss",
    "reshard",
    "resolve_resume",
    "resolve_resume_on_all_ranks",
    "RunInterrupted",
    "StopSignals",
    "training_session",
    "save_training_checkpoint",
    "setup_model",
    "unwrap",
    "validate",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'litliger.engine' has no attribute {name!r}")
    module = _WHERE[name]
    value = getattr(importlib.import_module(module if module.startswith("..") else f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
