"""Launch settings shared by the row-wise Triton kernels, and the one place a kernel is launched.

Every launcher ends in :func:`launch`. Under :func:`capture_launches` it records a :class:`LaunchPlan` instead of
running the kernel, so the launchers can be run on meta tensors at any model's sizes: that is how the kernels are
compiled ahead of time for named GPUs (:mod:`litliger.tools.aot`) with exactly the grid, constexprs and warps
a real call would use.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import triton

# One program handles one row; a row wider than this is walked in blocks inside the kernel.
MAX_FUSED_SIZE = 65536
# Row-tiled kernels (norms) pack narrow rows into tiles of about this many elements.
_TILE_ELEMENTS = 2048


@dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=num_warps)``."""

    kernel: Any  # a triton JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__


_captured: ContextVar[list[LaunchPlan] | None] = ContextVar("litliger_captured_launches", default=None)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, num_warps: int, **constexprs: Any) -> None:
    """Launch ``kernel`` on ``grid``; under :func:`capture_launches`, record the launch instead."""
    plans = _captured.get()
    if plans is not None:
        plans.append(LaunchPlan(kernel, grid, args, constexprs, num_warps))
        return
    kernel[grid](*args, **constexprs, num_warps=num_warps)


@contextmanager
def capture_launches() -> Iterator[list[LaunchPlan]]:
    """Collect the launches of the enclosed launcher calls without running any kernel (tensors may be on meta)."""
    plans: list[LaunchPlan] = []
    token = _captured.set(plans)
    try:
        yield plans
    finally:
        _captured.reset(token)


def row_settings(n_cols: int, max_block: int = MAX_FUSED_SIZE) -> tuple[int, int]:
    """``(BLOCK_SIZE, num_warps)`` for a kernel that loads a row of ``n_cols`` elements per block."""
    block = min(triton.next_power_of_2(max(1, n_cols)), max_block)
    if block >= 32768:
        warps = 32
    elif block >= 8192:
        warps = 16
    elif block >= 2048:
        warps = 8
    else:
        warps = 4
    return block, warps


def tile_settings(n_cols: int, max_block: int, max_rows: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` for a row-wise kernel over rows of ``n_cols`` elements."""
    block_n = min(triton.next_power_of_2(max(1, n_cols)), max_block)
    block_m = max(1, min(max_rows, _TILE_ELEMENTS // block_n))
    _, num_warps = row_settings(block_m * block_n, max_block=block_m * block_n)
    return block_m, block_n, num_warps


def bwd_programs(device: torch.device, n_tiles: int, per_sm: int, on_cpu: int) -> tuple[int, int]:
    """``(num_programs, tiles_per_program)`` for a backward that loops over row tiles and sums dw partials."""
    if device.type == "cuda":
        programs = _sm_count(torch.cuda.current_device() if device.index is None else device.index) * per_sm
    else:
        programs = on_cpu
    tiles_per_program = triton.cdiv(n_tiles, max(1, min(programs, n_tiles)))
    return triton.cdiv(n_tiles, tiles_per_program), tiles_per_program


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def as_rows(t: torch.Tensor, n_cols: int | None = None) -> torch.Tensor:
    """``t`` as a ``(rows, n_cols)`` matrix with unit column stride (default n_cols: the last dim), a view
    whenever the layout allows one. A contiguous tensor may be viewed with wider rows (e.g. one flat row)."""
    n = t.shape[-1] if n_cols is None else n_cols
    if n > 1 and t.stride(-1) != 1:
        # The kernels step through columns with unit stride. A strided last dim is rare (e.g. the broadcast
        # gradient of y.sum()), so it is copied here, explicitly, rather than paying a stride in every load.
        t = t.contiguous()
    try:
        return t.view(-1, n)
    except RuntimeError:
        # Leading dims that do not collapse into one row stride (e.g. a permuted batch): copy.
        return t.reshape(-1, n)
