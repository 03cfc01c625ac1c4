"""Hyperparameter groups of a training run; their field names are the public config keys and flags."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainArgs:
    """``--train.*``: batch sizes, duration, schedule and checkpointing."""

    global_batch_size: int = 64  # sequences per optimizer step, summed over devices and accumulation
    micro_batch_size: int = 4  # sequences per forward/backward on one device
    max_seq_length: int | None = None  # tokens per sequence; default the model's block_size
    max_steps: int | None = None  # optimizer steps; takes precedence over max_tokens
    max_tokens: int | None = None  # or: train on this many tokens (rounded down to whole steps)
    lr_warmup_steps: int = 100  # linear warmup from 0 to optimizer.lr
    min_lr: float = 4e-5  # cosine decay ends here at the last step
    max_norm: float | None = 1.0  # gradient clipping (None: off)
    save_interval: int | None = 1000  # steps between checkpoints (None: only the final one)
    log_interval: int = 1  # steps between metric lines

    def gradient_accumulation_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size} x {world_size} devices; adjust one of them"
            )
        return self.global_batch_size // per_step

    def total_steps(self, tokens_per_step: int) -> int:
        if self.max_steps is not None:
            if self.max_steps < 0:
                raise ValueError(f"train.max_steps={self.max_steps} must be >= 0")
            return self.max_steps
        if self.max_tokens is not None:
            return self.max_tokens // tokens_per_step
        raise ValueError("set train.max_steps or train.max_tokens to say how long to train")


@dataclass(frozen=True)
class EvalArgs:
    """``--eval.*``: validation during training."""

    interval: int | None = 100  # steps between validations (None: never during training)
    max_iters: int = 50  # validation batches per evaluation
    initial_validation: bool = False  # validate once before the first step
    final_validation: bool = True  # validate after the last step


@dataclass(frozen=True)
class OptimizerArgs:
    """``--optimizer.*``: AdamW by default. Weight decay applies to 2-D weights (linear layers and
    embeddings) only; biases and norm weights are not decayed (GPT-2 / nanoGPT practice)."""

    name: str = "AdamW"  # AdamW, Adam or SGD
    lr: float = 4e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.9  # SGD only
