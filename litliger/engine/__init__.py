"""The one training engine shared by pretraining and finetuning.

    runtime.py         Fabric, strategies, and building/initialising/loading a model per environment
    loop.py            fit: accumulation, clipping, schedule, logging, saves, signals
    losses.py          the loss-function contract, the next-token loss, validation over all ranks
    training_state.py  training checkpoints (model files + per-rank state) written atomically, resume
    state_codec.py     the per-rank state as JSON + safetensors (never pickle)
    upgrade.py         ``litliger upgrade_checkpoint``: converts an earlier litliger's pickled state, knowingly
    session.py, signals.py, metrics.py, optim.py, args.py   the run lock and signals, metrics.jsonl and
                       loggers, the optimizer and LR schedule, the argument groups

May import: ``util``, ``kernels``, ``nn``, ``model``, ``checkpoint``, ``data``, Lightning. Never the
recipes, inference or eval.
"""

from ..model.parallelize import unwrap
from .args import EvalArgs, OptimizerArgs, PlanArgs, TrainArgs
from .loop import FitSetup, Progress, fit
from .losses import LossFn, next_token_count, next_token_loss, validate
from .metrics import make_loggers
from .optim import build_optimizer, lr_at
from .runtime import check_memory_options, is_fsdp, make_fabric, reshard, setup_model
from .session import training_session
from .signals import RunInterrupted, StopSignals
from .training_state import (
    check_resumable,
    find_resume_checkpoint,
    finished_run,
    has_checkpoints,
    is_complete,
    load_training_state,
    on_rank_zero,
    resolve_resume,
    resolve_resume_on_all_ranks,
    save_training_checkpoint,
)

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
