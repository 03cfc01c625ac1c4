"""Input checks shared by the kernel ops. They read host metadata only (shapes, dtypes, devices)."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, t: torch.Tensor, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{op}: all inputs must be on one device, got {listed}")


def check_vector(op: str, name: str, t: torch.Tensor | None, size: int, against: str) -> None:
    """``t`` must be a 1-D float tensor of length ``size`` (the last dim of ``against``)."""
    if t is None:
        return
    check_float(name, t, op)
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(
            f"{op}: {name} has shape {tuple(t.shape)} but {against} has last dimension {size}; "
            f"expected {name} of shape ({size},)"
        )


def check_same_shape(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{op}: {a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} must have the same shape")


def compute_dtype(*ts: torch.Tensor | None) -> torch.dtype:
    """fp32 for half/single inputs, fp64 when any input is fp64 (the test oracle)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


REDUCTIONS = ("mean", "sum", "none")
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def check_loss_args(op: str, reduction: str, label_smoothing: float, z_loss: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction={reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing={label_smoothing} must be in [0, 1]")
    if z_loss < 0.0:
        raise ValueError(f"{op}: z_loss={z_loss} must be >= 0")


def check_targets(op: str, targets: torch.Tensor, rows_shape: torch.Size, vocab: int, ignore_index: int) -> None:
    """Targets are integer class ids in [0, vocab) or ``ignore_index``, one per row.

    The value range is checked here for CPU tensors only (free there), and not while ``torch.compile``
    traces (a data-dependent branch would break the graph). On CUDA that check would cost a host sync per
    call, so the kernels (and the twins) instead give a row with an out-of-range target a NaN loss, which
    the training engine's non-finite-loss check reports.
    """
    if not isinstance(targets, torch.Tensor) or targets.dtype not in INT_DTYPES:
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"{op}: targets must be an integer tensor (int64 or int32), got {got}")
    if targets.shape != rows_shape:
        raise ValueError(
            f"{op}: targets has shape {tuple(targets.shape)} but the input has {tuple(rows_shape)} rows "
            "(all dimensions but the last); they must match"
        )
    if targets.device.type != "cpu" or targets.numel() == 0 or torch.compiler.is_compiling() or not has_data(targets):
        return
    flat = targets.reshape(-1)
    bad = ((flat < 0) | (flat >= vocab)) & (flat != ignore_index)
    if bool(bad.any()):
        idx = bad.nonzero().flatten()[:5].tolist()
        vals = flat[idx].tolist()
        raise ValueError(
            f"{op}: targets must be in [0, {vocab}) or ignore_index={ignore_index}; found "
            f"{int(bad.sum())} out of range, e.g. value {vals} at flat positions {idx}"
        )


def has_data(t: torch.Tensor) -> bool:
    """False for tensors without values (meta, or fake ones: the memory planner traces shapes only), whose
    value checks are skipped."""
    return t.device.type != "meta" and not is_fake(t)


def same_start(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` start at the same memory (``data_ptr`` equality, also for fake tensors)."""
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata and a.storage_offset() * a.element_size() == (
        b.storage_offset() * b.element_size()
    )
