"""The training loop shared by pretraining and finetuning: ``fit`` and ``validate``."""

from __future__ import annotations

import contextlib
import shlex
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from tqdm import tqdm

from ..checkpoint.layout import FINAL_DIR, step_dir
from ..model.config import Config, flops_per_token
from ..model.parallelize import unwrap
from ..nn.recompute import offloaded_activations
from .args import EvalArgs, TrainArgs
from .losses import (
    Batch,
    CountFn,
    LossFn,
    add_stats,
    loss_and_stats,
    next_token_count,
    next_token_loss,
    reduced_means,
    to_device,
    validation_sums,
)
from .metrics import MetricsLog, Throughput, peak_flops, peak_memory
from .optim import lr_at, set_lr
from .signals import RunInterrupted, StopSignals
from .training_state import WriteFiles, prune_step_checkpoints, save_training_checkpoint


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
    total_steps: int
    write_files: WriteFiles  # what a checkpoint folder holds (see save_training_checkpoint)
    signals: StopSignals
    resumed_from: Path | None = None  # metrics.jsonl keeps its lines up to this checkpoint's step; keep_last keeps it
    trainable_only: bool = False  # step checkpoints gather only parameters with requires_grad
    loss_fn: LossFn = next_token_loss
    count_targets: CountFn = next_token_count
    tokens_in: Callable[[Batch], int] = next_token_count
    data_metrics: Callable[[], dict[str, float]] | None = None  # e.g. a mixture's tokens and epochs per source
    # validation's own loss and count when it measures something else than training does (distillation trains on
    # the teacher's distributions and validates the student's next-token loss); None: loss_fn and count_targets
    val_loss_fn: LossFn | None = None
    val_count_targets: CountFn | None = None


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


def _step_target_count(fabric: L.Fabric, counts: list) -> int | torch.Tensor:
    """Target tokens of one optimizer step over all micro-batches and ranks."""
    if all(isinstance(c, int) for c in counts):
        return sum(counts) * fabric.world_size  # every rank's batches hold the same count
    total = torch.stack([torch.as_tensor(c, device=fabric.device) for c in counts]).sum().double()
    return fabric.all_reduce(total, reduce_op="sum") if fabric.world_size > 1 else total


def _nonfinite_message(step: int, first_bad_step: int, loss_bad: bool, precision: str, out_dir: Path) -> str:
    what = "the loss" if loss_bad else "the gradient norm"
    if first_bad_step == 1:
        advice = "the initial weights or the data already give non-finite values; check the checkpoint or init_std"
    elif precision.endswith("-true") and not precision.startswith("32"):
        advice = f"{precision} keeps weights in half precision; use --precision bf16-mixed or 32-true"
    else:
        advice = "lower --optimizer.lr or set --train.max_norm"
    return (
        f"{what} became NaN/Inf by step {step}; stopping without saving. Resume from the last checkpoint "
        f"in {out_dir}: {advice}"
    )


class _Run:
    """One call of :func:`fit`: what the training loop's steps share, and each step's parts as methods.

    It holds the run's fixed parts (fabric, model, optimizer, the arguments, the data position), its
    bookkeeping (progress, metrics, throughput, the progress bar, when the last checkpoint was saved) and the
    accumulators of the current log window (loss and target-token sums, non-finite flags, the window's first
    step). :func:`fit` calls the methods in order; each method does one part of a step.
    """

    def __init__(
        self,
        fabric: L.Fabric,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        accum: int,
        batches: Iterator[Batch],
        loader_state: Callable[[], dict | None],
        val_loader: Iterable | None,
        train: TrainArgs,
        eval: EvalArgs,
        setup: FitSetup,
        progress: Progress,
    ) -> None:
        self.fabric, self.model, self.optimizer = fabric, model, optimizer
        self.accum, self.batches, self.loader_state, self.val_loader = accum, batches, loader_state, val_loader
        self.train, self.eval, self.setup, self.progress = train, eval, setup, progress
        self.total = setup.total_steps
        self.signals = setup.signals
        self.precision = getattr(fabric, "litliger_precision", "32-true")
        self.metrics = MetricsLog(fabric, setup.out_dir, keep_through=progress.step if setup.resumed_from else None)
        self.throughput = Throughput(
            flops_per_token(setup.config, setup.seq_len), peak_flops(fabric.device, self.precision), fabric.world_size
        )
        self.last_save = time.monotonic()
        self.bar: tqdm | None = None  # opened by start(), after the initial validation
        self.lr = 0.0  # the last step's learning rate and gradient norm, logged at log points
        self.grad_norm = torch.zeros(())
        # the current log window: summed on the device, read (one host sync) at the next log point
        self.loss_sum = torch.zeros((), device=fabric.device, dtype=torch.float64)
        self.count_sum: int | torch.Tensor = 0
        self.stat_sums: dict[str, torch.Tensor] = {}  # the loss function's stats (e.g. DPO's rewards), summed
        self.nonfinite_loss = torch.zeros((), dtype=torch.bool, device=fabric.device)
        self.nonfinite_grad = torch.zeros((), dtype=torch.bool, device=fabric.device)
        self.first_step_of_window = progress.step + 1

    def start(self) -> None:
        """Open the progress bar and start measuring throughput (after any initial validation)."""
        step, rank = self.progress.step, self.fabric.global_rank
        self.bar = tqdm(total=self.total, initial=step, disable=rank != 0, dynamic_ncols=True, mininterval=1)
        self.throughput.reset(self.progress.tokens)

    def train_step(self) -> None:
        """One optimizer step over ``accum`` micro-batches: set the lr, backward each micro-batch scaled by the
        step's target count, clip, step, and advance the counters. The loss and the non-finite flags are only
        summed into the window here (on the device); log() and check_finite() read them."""
        fabric, model, optimizer, setup, progress = self.fabric, self.model, self.optimizer, self.setup, self.progress
        self.lr = lr_at(progress.step, setup.max_lr, self.train, self.total)
        set_lr(optimizer, self.lr)
        micro_batches = [to_device(next(self.batches), fabric.device) for _ in range(self.accum)]
        step_count = _step_target_count(fabric, [setup.count_targets(b) for b in micro_batches])
        # gradients are averaged over ranks: undo that, then divide by the step's target count
        scale = fabric.world_size / step_count
        if isinstance(scale, torch.Tensor):
            scale = scale.float()
        step_tokens = 0
        for micro, batch in enumerate(micro_batches):
            step_tokens += setup.tokens_in(batch)
            offload = offloaded_activations() if self.train.offload == "activations" else contextlib.nullcontext()
            with fabric.no_backward_sync(model, enabled=micro < self.accum - 1), offload:
                loss, stats = loss_and_stats(setup.loss_fn(model, batch))
                fabric.backward(loss * scale)
            self.loss_sum += loss.detach().double()
            add_stats(self.stat_sums, stats)
            self.nonfinite_loss |= ~torch.isfinite(loss.detach())
        self.count_sum = self.count_sum + step_count
        self.grad_norm = _clip_gradients(model, self.train.max_norm)
        self.nonfinite_grad |= ~torch.isfinite(self.grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.tokens += step_tokens * fabric.world_size
        self.bar.update(1)

    def at_log_point(self) -> bool:
        """Every ``train.log_interval`` steps, and at the last step."""
        return self.progress.step % self.train.log_interval == 0 or self.progress.step == self.total

    def log(self) -> None:
        """Check the window for non-finite values, log its mean loss, lr, grad norm, throughput and memory,
        and start the next window."""
        fabric, progress = self.fabric, self.progress
        self.check_finite()
        self.first_step_of_window = progress.step + 1
        all_loss = fabric.all_reduce(self.loss_sum, reduce_op="sum") if fabric.world_size > 1 else self.loss_sum
        loss_avg = (all_loss / self.count_sum).item()
        rates = self.throughput.measure(progress.tokens)
        values = {
            "tokens": progress.tokens,
            "loss": loss_avg,
            "lr": self.lr,
            "grad_norm": self.grad_norm.item(),
            **reduced_means(fabric, self.stat_sums, self.count_sum),
            **rates,
        }
        values.update(peak_memory(fabric.device))
        if self.setup.data_metrics is not None:
            values.update(self.setup.data_metrics())
        self.metrics.log(values, progress.step)
        self.bar.set_postfix(loss=f"{loss_avg:.4f}", tok_s=f"{rates['tokens_per_sec']:.0f}")
        self.loss_sum.zero_()
        self.count_sum = 0
        self.stat_sums = {}

    def validate(self) -> bool:
        """Validate (the module's :func:`validate`) and log; False when a signal cut it short (nothing is
        logged then). True when there is no validation set."""
        if self.val_loader is None:
            return True
        fabric, setup, progress = self.fabric, self.setup, self.progress
        # one loader, or one per source of a mixture: val_loss/<name> each, and val_loss over all their tokens
        loaders = self.val_loader if isinstance(self.val_loader, Mapping) else {"": self.val_loader}
        values: dict[str, float] = {}
        total = count = 0.0
        stats: dict[str, float] = {}
        for name, loader in loaders.items():
            sums = validation_sums(
                fabric, self.model, loader, self.eval.max_iters, setup.val_loss_fn or setup.loss_fn,
                setup.val_count_targets or setup.count_targets, lambda: self.signals.requested,
            )  # fmt: skip
            if sums is None:
                return False
            if name:
                values[f"val_loss/{name}"] = sums[0] / max(sums[1], 1.0)
            total, count = total + sums[0], count + sums[1]
            for key, value in sums[2].items():
                stats[key] = stats.get(key, 0.0) + value
        val = total / max(count, 1.0)
        values.update({f"val_{key}": value / max(count, 1.0) for key, value in stats.items()})
        self.metrics.log({"val_loss": val, **values, "tokens": progress.tokens}, progress.step)
        per_source = "".join(f", {k} {v:.4f}" for k, v in values.items())
        fabric.print(f"step {progress.step}: val_loss {val:.4f}{per_source}")
        return True

    def maybe_validate(self) -> None:
        """Validate every ``eval.interval`` steps before the last one (the last one has its own)."""
        progress = self.progress
        if self.eval.interval and progress.step % self.eval.interval == 0 and progress.step < self.total:
            self.validate()
            self.throughput.reset(progress.tokens)  # validation time is not training throughput

    def save(self, path: Path) -> Path:
        """Write a training checkpoint (weights or trainable tensors, optimizer, counters, data position), after
        the loggers wrote out every line logged so far (a save is where a stopped or crashed run resumes)."""
        setup = self.setup
        self.metrics.flush()
        path = save_training_checkpoint(
            self.fabric,
            path,
            model=self.model,
            optimizer=self.optimizer,
            state=self.progress.to_dict(),
            loader_state=self.loader_state(),
            write_files=setup.write_files,
            trainable_only=setup.trainable_only,
        )
        self.fabric.print(f"saved {path}")
        return path

    def _periodic_save_due(self, at_log_point: bool) -> bool:
        """Every ``train.save_interval`` steps, and at a log point once ``train.save_interval_minutes``
        passed since the last save (rank 0's clock decides, so every rank saves at the same step)."""
        train, fabric, step = self.train, self.fabric, self.progress.step
        if step >= self.total:
            return False  # final/ follows
        if train.save_interval and step % train.save_interval == 0:
            return True
        if not (train.save_interval_minutes and at_log_point):
            return False
        due = time.monotonic() - self.last_save >= 60 * train.save_interval_minutes
        return bool(fabric.broadcast(due, src=0)) if fabric.world_size > 1 else due

    def _save_step(self) -> Path:
        """Save ``step-*``, restart the save clock and prune to ``train.keep_last`` (never the resumed folder)."""
        setup, train = self.setup, self.train
        path = self.save(step_dir(setup.out_dir, self.progress.step))
        self.last_save = time.monotonic()
        if train.keep_last and self.fabric.global_rank == 0:
            keep = {setup.resumed_from} if setup.resumed_from else set()
            for name in prune_step_checkpoints(setup.out_dir, train.keep_last, keep=keep):
                self.fabric.print(f"removed {name} (train.keep_last={train.keep_last})")
        return path

    def maybe_save(self, at_log_point: bool) -> Path | None:
        """Save ``step-*`` when a periodic save is due (never a non-finite state); the folder, or None."""
        if not self._periodic_save_due(at_log_point):
            return None
        self.check_finite()
        saved = self._save_step()
        self.throughput.reset(self.progress.tokens)
        return saved

    def agree_to_stop(self, at_sync_point: bool) -> bool:
        """Whether the run stops here for a signal (on any rank, when several)."""
        fabric, signals = self.fabric, self.signals
        # Any rank's signal stops every rank at the same step. The ranks agree at log points, where the loop
        # waits for the device anyway, so no step pays an extra host sync for it.
        if fabric.world_size == 1:
            return signals.requested
        flag = torch.tensor(float(signals.requested), device=fabric.device)
        return at_sync_point and bool(fabric.all_reduce(flag, reduce_op="max"))

    def stop_here(self, saved: Path | None = None) -> Path:
        """Stop for a signal: save ``step-*`` unless ``saved`` already holds this step, and say how to resume."""
        self.bar.close()
        path = saved or self._save_step()
        self.fabric.print(
            f"{self.signals.name or 'SIGTERM'}: stopped after step {self.progress.step}; resume with --resume auto"
        )
        if self.signals.received == signal.SIGINT:
            raise RunInterrupted(signal.SIGINT)  # saved; Ctrl-C still exits 130 (cli.py), as at any other moment
        return path

    def check_finite(self) -> None:
        """Raise FloatingPointError (one host sync) when a loss or gradient norm of this window was NaN/Inf."""
        if self.nonfinite_loss.item() or self.nonfinite_grad.item():
            message = _nonfinite_message(
                self.progress.step,
                self.first_step_of_window,
                bool(self.nonfinite_loss.item()),
                self.precision,
                self.setup.out_dir,
            )
            self.metrics.flush()  # the lines logged before it stay readable
            raise FloatingPointError(message)


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
) -> Path | None:
    """Train until ``setup.total_steps`` is reached, a signal arrives, or the loss turns non-finite.

    Returns the folder of the last checkpoint written (``final`` at the end, ``step-*`` when stopped by
    SIGTERM). SIGINT (Ctrl-C) saves the same way and then raises :class:`RunInterrupted`, so the command exits
    130 as a shell expects of Ctrl-C; so does any signal that arrives during the save of ``final``, once
    ``final`` is complete: the run is saved, and nothing that follows it (the end-of-run sample) runs.
    """
    accum = train.gradient_accumulation_steps(fabric.world_size)
    # a finished run, run again, never gets here: the recipes ask training_state.finished_run first, so final/
    # stays as it is, byte for byte (finetunes record their base by its content; a rewrite risks the only copy)
    run = _Run(
        fabric,
        model,
        optimizer,
        accum=accum,
        batches=batches,
        loader_state=loader_state,
        val_loader=val_loader,
        train=train,
        eval=eval,
        setup=setup,
        progress=progress,
    )
    if eval.initial_validation and progress.step == 0:
        run.validate()  # nothing is unsaved yet: a signal here ends the run at once
    run.start()
    with run.signals.deferred():
        while progress.step < run.total:
            run.train_step()
            at_log_point = run.at_log_point()
            if at_log_point:
                run.log()
            run.maybe_validate()
            saved = run.maybe_save(at_log_point)
            # checked after the periodic save: a signal that arrived during it stops the run at this step (saved
            # once), not after another step
            if run.agree_to_stop(at_log_point):
                run.check_finite()
                return run.stop_here(saved)
        run.bar.close()
        run.check_finite()
        validated = not eval.final_validation or run.validate()
        if not validated or run.agree_to_stop(True):
            # stopped during the final validation: keep the trained weights; a resume validates and finishes
            return run.stop_here()
        # before "saved .../final", which stays the run's last line; save() flushes the loggers
        fabric.print(f"plot the curves with: litliger plot {shlex.quote(str(setup.out_dir))}")
        path = run.save(setup.out_dir / FINAL_DIR)
    # a signal that arrived during the final save was only recorded: act on it now that final/ is complete
    if run.agree_to_stop(True):
        raise RunInterrupted(run.signals.received or signal.SIGTERM)  # ranks without a signal of their own
    return path
