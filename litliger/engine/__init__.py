"""The one training engine shared by pretraining and finetuning.

runtime (Fabric, strategies, model setup per environment) -> loop (fit, validate) -> checkpointing, metrics.
"""

from .args import EvalArgs, OptimizerArgs, TrainArgs
from .checkpointing import (
    check_resumable,
    find_resume_checkpoint,
    has_checkpoints,
    is_complete,
    load_training_state,
    on_rank_zero,
    resolve_resume,
    resolve_resume_on_all_ranks,
    save_training_checkpoint,
)
from .loop import FitSetup, Progress, fit, next_token_count, next_token_loss, validate
from .metrics import make_loggers
from .optim import build_optimizer, lr_at
from .runtime import is_fsdp, make_fabric, reshard, setup_model, unwrap
from .session import training_session
from .signals import RunInterrupted, StopSignals

__all__ = [
    "EvalArgs",
    "FitSetup",
    "OptimizerArgs",
    "Progress",
    "TrainArgs",
    "build_optimizer",
    "check_resumable",
    "find_resume_checkpoint",
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
