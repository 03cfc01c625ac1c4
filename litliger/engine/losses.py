"""What training and validation share: the loss-function contract (``LossFn``, ``CountFn``), the one next-token
loss, and validation over all ranks (``validate``, ``validation_sums``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import nn

from ..data.base import batch_inputs, rank_share
from .runtime import reshard

Batch = Any
# The loss summed over the batch's target tokens (the engine divides by the step's target count), or
# ``(loss, stats)``: ``stats`` maps metric names (e.g. "rewards/accuracy") to values summed over the same units as
# the loss, which the engine averages like the loss and logs beside it (with a "val_" prefix in validation).
LossFn = Callable[[nn.Module, Batch], "torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]"]
# The number of target tokens of a batch: an int when every batch has the same number (no host sync
# and no collective is needed then), else a tensor on the batch's device.
CountFn = Callable[[Batch], "int | torch.Tensor"]


def loss_and_stats(out: torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict]:
    """A :data:`LossFn` result as ``(loss, stats)`` (no stats: an empty dict)."""
    return (out, {}) if isinstance(out, torch.Tensor) else out


def add_stats(sums: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
    for name, value in stats.items():
        value = value.detach().double()
        sums[name] = sums[name] + value if name in sums else value


def reduced_means(fabric: L.Fabric, sums: dict[str, torch.Tensor], count: float | torch.Tensor) -> dict[str, float]:
    """``sums`` summed over ranks (one collective) and divided by ``count``."""
    if not sums:
        return {}
    stacked = torch.stack(list(sums.values()))
    if fabric.world_size > 1:
        stacked = fabric.all_reduce(stacked, reduce_op="sum")
    means = (stacked / count).tolist()
    return dict(zip(sums, means, strict=True))


def next_token_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The summed next-token loss of any data module's batch (``litliger.data.base.batch_inputs``): a (B, T + 1)
    token block predicts tokens 1..T from 0..T-1, an instruction batch its targets != -100; with document ids
    the model masks attention between documents. The fused loss is in the model."""
    idx, targets, document_ids = batch_inputs(batch)
    return model(idx, targets=targets, reduction="sum", document_ids=document_ids)


def next_token_count(batch: Batch) -> int:
    """Target tokens of a pretraining batch (B, T + 1), or ``{"tokens", "document_ids"}``: B x T, the same for
    every batch (no host sync)."""
    tokens = batch["tokens"] if isinstance(batch, dict) else batch
    return tokens.shape[0] * (tokens.shape[1] - 1)


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def validate(
    fabric: L.Fabric,
    model: nn.Module,
    loader: Iterable,
    max_iters: int,
    loss_fn: LossFn = next_token_loss,
    count_targets: CountFn = next_token_count,
    should_stop: Callable[[], bool] = lambda: False,
) -> float | None:
    """Mean loss per target token over the first ``max_iters`` batches of ``loader``, all ranks together
    (see :func:`validation_sums`): the same number at any world size.

    Returns None when ``should_stop`` cut it short (single process only: with several ranks every rank
    must run the same forwards, so validation always completes there).
    """
    sums = validation_sums(fabric, model, loader, max_iters, loss_fn, count_targets, should_stop)
    return None if sums is None else (sums[0] / max(sums[1], 1.0))


ValidationSums = tuple[float, float, dict[str, float]]


@torch.no_grad()
def validation_sums(
    fabric: L.Fabric,
    model: nn.Module,
    loader: Iterable,
    max_iters: int,
    loss_fn: LossFn = next_token_loss,
    count_targets: CountFn = next_token_count,
    should_stop: Callable[[], bool] = lambda: False,
) -> ValidationSums | None:
    """(summed loss, target tokens, summed stats of the loss function) over the first ``max_iters`` batches of
    ``loader``, all ranks together.

    ``loader`` yields the whole validation split, the same batches on every rank (a data module's
    ``val_dataloader``); batch i is evaluated on rank ``i % world_size`` (``rank_share``), so the batches
    counted, ``max_iters`` x the micro batch size samples, do not depend on the world size. A rank with one
    batch fewer runs a filler batch whose loss counts zero: every rank runs the same forwards.
    """
    model.eval()
    total = torch.zeros((), device=fabric.device, dtype=torch.float64)
    count = torch.zeros((), device=fabric.device, dtype=torch.float64)
    stats: dict[str, torch.Tensor] = {}
    stopped = False
    for batch, counted in rank_share(loader, max_iters, fabric.global_rank, fabric.world_size):
        if fabric.world_size == 1 and should_stop():
            stopped = True
            break
        batch = to_device(batch, fabric.device)
        loss, batch_stats = loss_and_stats(loss_fn(model, batch))
        if counted:
            total += loss.double()
            count += count_targets(batch)
            add_stats(stats, batch_stats)
        else:  # a filler batch: its stats count zero, but every rank must hold the same names for the reduction
            add_stats(stats, {k: torch.zeros_like(v) for k, v in batch_stats.items()})
    model.train()
    reshard(model)
    if stopped:
        return None
    names = list(stats)
    sums = torch.stack([total, count, *(stats[n] for n in names)])
    if fabric.world_size > 1:
        sums = fabric.all_reduce(sums, reduce_op="sum")
    values = sums.tolist()
    return values[0], values[1], dict(zip(names, values[2:], strict=True))
