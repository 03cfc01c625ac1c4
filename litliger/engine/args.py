"""Hyperparameter groups of a training run; their field names are the public config keys and flags.

Every group checks its values when it is built, which the CLI does while parsing: a bad value stops the
command before any data is prepared or any folder is written, with one line that names the flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..model.checkpointing import parse_checkpointing
from ..util.checks import check_at_least, check_between, check_choice, check_positive, fail

OPTIMIZER_NAMES = ("AdamW", "Adam", "SGD")
OFFLOAD_CHOICES = ("none", "activations", "params", "optimizer")
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str | int | float, where: str = "--plan.device_memory") -> int:
    """``80GB``, ``79.6GiB``, ``1e9`` -> bytes."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return int(text)
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]?i?B?)\s*", str(text), flags=re.IGNORECASE)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"{text!r} is not an amount of memory, in {where}; write e.g. 80GB or 79.6GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@dataclass(frozen=True)
class TrainArgs:
    """``--train.*``: batch sizes, duration, schedule and checkpointing."""

    global_batch_size: int = 64
    """sequences per optimizer step, summed over devices and gradient accumulation."""
    micro_batch_size: int = 4
    """sequences per forward/backward on one device; global_batch_size must be a multiple of it."""
    max_seq_length: int | None = None
    """tokens per training sequence (null: the model's block_size)."""
    max_steps: int | None = None
    """optimizer steps to train; takes precedence over max_tokens."""
    max_tokens: int | None = None
    """or: train on this many tokens, rounded down to whole optimizer steps."""
    lr_warmup_steps: int = 100
    """steps of linear warmup of the learning rate from 0 to optimizer.lr."""
    min_lr: float = 4e-5
    """the learning rate the cosine decay ends at on the last step."""
    max_norm: float | None = 1.0
    """clip the gradients' global norm to this value (null: no clipping)."""
    save_interval: int | None = 1000
    """steps between checkpoints (null: only the final one)."""
    save_interval_minutes: float | None = None
    """also save when this many minutes passed since the last save (null: step-based saves only)."""
    keep_last: int | None = None
    """keep only the newest K step checkpoints (null: all); final/ is always kept."""
    log_interval: int = 1
    """steps between metric lines (time-based saves are decided at these steps)."""
    activation_checkpointing: str = "none"
    """what blocks keep for backward: none, full (only block inputs), selective (= selective:2: every second
    block full), selective:<k> (every k-th block full) or selective:op (keep matmul and attention outputs)."""
    offload: str = "none"
    """none, activations (saved tensors to pinned CPU memory; CUDA), or params / optimizer (FSDP2's CPU offload:
    parameters, gradients and optimizer state live on the CPU and the optimizer steps there; CUDA, --strategy
    fsdp)."""

    def __post_init__(self) -> None:
        parse_checkpointing(self.activation_checkpointing)  # an unknown mode stops the command here
        check_choice("train.offload", self.offload, OFFLOAD_CHOICES)
        check_positive("train.global_batch_size", self.global_batch_size, "set the sequences per optimizer step")
        check_positive("train.micro_batch_size", self.micro_batch_size, "set a positive number of sequences per device")
        if self.global_batch_size % self.micro_batch_size:
            multiple = f"a multiple of train.micro_batch_size={self.micro_batch_size}"
            fail("train.global_batch_size", self.global_batch_size, multiple, "adjust one of them", None)
        fix = "set tokens per sequence, or null for the model's block_size"
        check_positive("train.max_seq_length", self.max_seq_length, fix, optional=True)
        check_at_least("train.max_steps", self.max_steps, 0, "set the number of optimizer steps", optional=True)
        fix = "set the tokens to train on, or use --train.max_steps"
        check_positive("train.max_tokens", self.max_tokens, fix, optional=True)
        check_at_least("train.lr_warmup_steps", self.lr_warmup_steps, 0, "use 0 for no warmup")
        check_at_least("train.min_lr", self.min_lr, 0, "set the learning rate the schedule ends at")
        fix = "set a positive clipping norm, or null for no clipping"
        check_positive("train.max_norm", self.max_norm, fix, optional=True)
        fix = "set steps between checkpoints, or null for the final one only"
        check_positive("train.save_interval", self.save_interval, fix, optional=True)
        fix = "set minutes between checkpoints, or null for step-based ones only"
        check_positive("train.save_interval_minutes", self.save_interval_minutes, fix, optional=True)
        fix = "set how many step checkpoints to keep, or null to keep all"
        check_positive("train.keep_last", self.keep_last, fix, optional=True)
        check_positive("train.log_interval", self.log_interval, "set steps between metric lines (1: every step)")

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
            return self.max_steps
        if self.max_tokens is not None:
            return self.max_tokens // tokens_per_step
        raise ValueError("how long to train is not set, in --train.max_steps / --train.max_tokens; set one of them")


@dataclass(frozen=True)
class EvalArgs:
    """``--eval.*``: validation during training."""

    interval: int | None = 100
    """steps between validations (null: never during training)."""
    max_iters: int = 50
    """validation batches per evaluation, all devices together: the first max_iters x train.micro_batch_size
    samples of the validation split (of each source of a mixture), shared between the devices, so the same
    weights give the same val_loss on any number of devices."""
    initial_validation: bool = False
    """validate once before the first step."""
    final_validation: bool = True
    """validate after the last step."""

    def __post_init__(self) -> None:
        fix = "set steps between validations, or null for none during training"
        check_positive("eval.interval", self.interval, fix, optional=True)
        check_positive("eval.max_iters", self.max_iters, "set the validation batches per evaluation")


@dataclass(frozen=True)
class OptimizerArgs:
    """``--optimizer.*``: the optimizer (AdamW by default) and its hyperparameters.

    Weight decay applies to 2-D weights (linear layers and embeddings) only; biases and norm weights are not
    decayed (GPT-2 / nanoGPT practice).
    """

    name: str = "AdamW"
    """the optimizer: AdamW, Adam or SGD."""
    lr: float = 4e-4
    """the peak learning rate (reached after train.lr_warmup_steps, then cosine decay to train.min_lr)."""
    weight_decay: float = 0.1
    """weight decay of the 2-D weights (decoupled in AdamW, L2 in Adam and SGD); 0: none."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam(W)'s decay rates of the gradient's running mean and square, each in [0, 1)."""
    eps: float = 1e-8
    """Adam(W)'s term added to the denominator for numerical stability."""
    momentum: float = 0.9
    """SGD's momentum, in [0, 1) (SGD only)."""

    def __post_init__(self) -> None:
        check_choice("optimizer.name", self.name, OPTIMIZER_NAMES)
        check_positive("optimizer.lr", self.lr, "set the peak learning rate, e.g. 4e-4")
        check_at_least("optimizer.weight_decay", self.weight_decay, 0, "use 0 for no weight decay")
        if len(self.betas) != 2:
            fail("optimizer.betas", self.betas, "two numbers", "write e.g. [0.9, 0.95]", None)
        for beta in self.betas:
            check_between("optimizer.betas", beta, 0, 1, "write e.g. [0.9, 0.95]", high_open=True)
        check_positive("optimizer.eps", self.eps, "set a small positive number, e.g. 1e-8")
        check_between("optimizer.momentum", self.momentum, 0, 1, "use e.g. 0.9", high_open=True)


@dataclass(frozen=True)
class PlanArgs:
    """``--plan.*``: the memory plan printed at the start of a run (and by ``litliger plan``)."""

    device_memory: str | None = None
    """the memory of one device, e.g. 80GB or 79.6GiB (default: the visible GPU's; none on a CPU)."""
    strict: bool = False
    """refuse to start a run whose plan does not fit device_memory (default: a warning with the numbers)."""

    def __post_init__(self) -> None:
        if self.device_memory is not None and parse_bytes(self.device_memory) <= 0:
            fail("plan.device_memory", self.device_memory, "a positive amount", "write e.g. 80GB", None)
