"""The training loop shared by pretraining and finetuning: ``fit`` and ``validate``."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from tqdm import tqdm

from ..config import Config, flops_per_token
from .args import EvalArgs, TrainArgs
from .checkpointing import save_training_checkpoint, step_dir
from .metrics import MetricsLog, Throughput, peak_flops, peak_memory
from .optim import lr_at, set_lr
from .runtime import reshard, unwrap

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Pretraining loss: a (B, T + 1) token batch predicts tokens 1..T from 0..T-1 (fused loss in the model)."""
    return model(batch[:, :-1], targets=batch[:, 1:])


@dataclass
class Progress:
    """Counters that a checkpoint stores and a resume restores."""

    step: int = 0  # optimizer steps taken
    tokens: int = 0  # tokens trained on, all ranks together

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens}


@dataclass
class FitSetup:
    """What ``fit`` needs beyond the model and optimizer."""

    config: Config
    out_dir: Path
    seq_len: int  # tokens per training sequence (for throughput and MFU)
    max_lr: float
    save_tokenizer: Callable[[Path], None] | None = None
    loss_fn: LossFn = next_token_loss
    tokens_in: Callable[[Batch], int] = lambda b: b.shape[0] * (b.shape[1] - 1)


class _StopRequest:
    """Set by SIGTERM; the loop checkpoints at the end of the current step and returns."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, *_: Any) -> None:
        self.requested = True


@contextmanager
def _sigterm_stops(flag: _StopRequest) -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, flag)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def validate(fabric: L.Fabric, model: nn.Module, loader: Iterable, max_iters: int, loss_fn: LossFn) -> float:
    """Mean loss over up to ``max_iters`` validation batches, averaged across ranks."""
    model.eval()
    total, count = torch.zeros((), device=fabric.device), 0
    for i, batch in enumerate(loader):
        if i >= max_iters:
            break
        total += loss_fn(model, _to_device(batch, fabric.device)).float()
        count += 1
    model.train()
    reshard(model)
    return fabric.all_reduce(total / max(count, 1), reduce_op="mean").item()


def _clip_gradients(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Total gradient norm over all ranks (DTensor shards included), clipped to ``max_norm`` when set.

    A non-finite norm is returned, not raised: the loop reports it with the step and what to do.
    """
    params = [p for p in unwrap(model).parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], error_if_nonfinite=False)
    if hasattr(norm, "full_tensor"):  # FSDP2: the norm of sharded gradients is itself a DTensor
        norm = norm.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def fit(
    fabric: L.Fabric,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    batches: Iterator[Batch],
    loader_state: Callable[[], dict | None],
    val_loader: Iterable | None,
    train: TrainArgs,
    eval: EvalArgs,
    setup: FitSetup,
    progress: Progress,
) -> Path:
    """Train until ``train``'s step budget is reached, a SIGTERM arrives, or the loss turns non-finite.

    Returns the folder of the last checkpoint written (``final`` at the end, ``step-*`` on SIGTERM).
    """
    accum = train.gradient_accumulation_steps(fabric.world_size)
    tokens_per_step = train.global_batch_size * setup.seq_len
    total = train.total_steps(tokens_per_step)
    metrics = MetricsLog(fabric, setup.out_dir)
    throughput = Throughput(
        flops_per_token(setup.config, setup.seq_len),
        peak_flops(fabric.device, getattr(fabric, "litliger_precision", "32-true")),
        fabric.world_size,
    )

    def save(path: Path) -> Path:
        return save_training_checkpoint(
            fabric,
            path,
            model=model,
            optimizer=optimizer,
            config=setup.config,
            state=progress.to_dict(),
            loader_state=loader_state(),
            save_tokenizer=setup.save_tokenizer,
        )

    def run_validation() -> None:
        if val_loader is not None:
            val = validate(fabric, model, val_loader, eval.max_iters, setup.loss_fn)
            metrics.log({"val_loss": val, "tokens": progress.tokens}, progress.step)
            fabric.print(f"step {progress.step}: val_loss {val:.4f}")

    if eval.initial_validation and progress.step == 0:
        run_validation()
    stop = _StopRequest()
    bar = tqdm(total=total, initial=progress.step, disable=fabric.global_rank != 0, dynamic_ncols=True, mininterval=1)
    loss_sum = torch.zeros((), device=fabric.device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=fabric.device)
    steps_since_log = 0
    throughput.reset(progress.tokens)

    def check_finite() -> None:
        if nonfinite.item():
            raise FloatingPointError(
                f"the loss or gradient norm became NaN/Inf by step {progress.step}; stopping without saving. "
                f"Resume from the last checkpoint in {setup.out_dir} with a lower optimizer.lr or train.max_norm"
            )

    with _sigterm_stops(stop):
        while progress.step < total:
            set_lr(optimizer, lr := lr_at(progress.step, setup.max_lr, train, total))
            step_tokens = 0
            for micro in range(accum):
                batch = _to_device(next(batches), fabric.device)
                step_tokens += setup.tokens_in(batch)
                with fabric.no_backward_sync(model, enabled=micro < accum - 1):
                    loss = setup.loss_fn(model, batch)
                    fabric.backward(loss / accum)
                loss_sum += loss.detach().float()
                nonfinite |= ~torch.isfinite(loss.detach())
            grad_norm = _clip_gradients(model, train.max_norm)
            nonfinite |= ~torch.isfinite(grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.tokens += step_tokens * fabric.world_size
            steps_since_log += 1
            bar.update(1)

            at_log_point = progress.step % train.log_interval == 0 or progress.step == total
            if at_log_point:
                check_finite()
                loss_avg = fabric.all_reduce(loss_sum / (accum * steps_since_log), reduce_op="mean").item()
                rates = throughput.measure(progress.tokens)
                values = {"tokens": progress.tokens, "loss": loss_avg, "lr": lr, "grad_norm": grad_norm.item(), **rates}
                values.update(peak_memory(fabric.device))
                metrics.log(values, progress.step)
                bar.set_postfix(loss=f"{loss_avg:.4f}", tok_s=f"{rates['tokens_per_sec']:.0f}")
                loss_sum.zero_()
                steps_since_log = 0
            if eval.interval and progress.step % eval.interval == 0 and progress.step < total:
                run_validation()
                throughput.reset(progress.tokens)  # validation time is not training throughput
            stopping = stop.requested
            if fabric.world_size > 1:
                # Any rank's SIGTERM stops every rank at the same step. The ranks agree at log points, where
                # the loop waits for the device anyway, so no step pays an extra host sync for it.
                flag = torch.tensor(float(stopping), device=fabric.device)
                stopping = at_log_point and bool(fabric.all_reduce(flag, reduce_op="max"))
            if stopping or (train.save_interval and progress.step % train.save_interval == 0 and progress.step < total):
                check_finite()
                path = save(step_dir(setup.out_dir, progress.step))
                fabric.print(f"saved {path}")
                throughput.reset(progress.tokens)
                if stopping:
                    bar.close()
                    fabric.print(f"SIGTERM: stopped after step {progress.step}; resume with --resume auto")
                    return path
    bar.close()
    check_finite()
    if eval.final_validation:
        run_validation()
    path = save(setup.out_dir / "final")
    fabric.print(f"saved {path}")
    return path
