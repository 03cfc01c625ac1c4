"""Recompute a cheap tensor in backward instead of holding it from forward to backward.

A pre-norm block feeds ``h = norm(x)`` to matmuls, and each matmul keeps its input for the weight gradient,
so autograd holds ``h`` (tokens x hidden) next to ``x``, which the norm itself keeps. Inside
:func:`recomputed`, a consumer that saves ``h`` (or a view of it) saves a note instead, and backward rebuilds
``h`` from ``x`` with the same kernel: one normalisation pass per block and norm, bitwise the value forward
produced (the kernels are deterministic and ``add_rms_norm``'s output is exactly ``rms_norm`` of its sum).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from ..kernels.backend import get_backend, use_backend


class _Recomputed:
    """The tensor ``fn()`` on first use in backward, shared by every saved view of it."""

    __slots__ = ("fn", "backend", "value")

    def __init__(self, fn: Callable[[], torch.Tensor], backend: str) -> None:
        self.fn, self.backend, self.value = fn, backend, None

    def get(self) -> torch.Tensor:
        if self.value is None:  # the kernel backend of forward, whatever thread runs backward
            with torch.no_grad(), use_backend(self.backend):
                self.value = self.fn().contiguous()
        return self.value


def _address(s: torch.Tensor) -> int | None:
    """The identity of ``s``'s storage (the same for every view of it; also for fake tensors, which the memory
    planner traces)."""
    try:
        return s.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, TypeError):  # a tensor subclass without plain storage
        return None


_offloading: ContextVar[bool] = ContextVar("litliger_offloading_activations", default=False)


@contextmanager
def offloaded_activations(pin_memory: bool = True) -> Iterator[None]:
    """Every tensor autograd saves inside goes to CPU memory (torch's ``save_on_cpu``; pinned, so the copies
    overlap compute) and comes back for backward. :func:`recomputed` steps aside inside: only the innermost
    saved-tensor hooks act, and its notes would keep norm outputs' inputs on the device instead."""
    token = _offloading.set(True)
    try:
        with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
            yield
    finally:
        _offloading.reset(token)


@contextmanager
def recomputed(t: torch.Tensor, fn: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Within the block, autograd saves no reference to ``t``'s memory: each saved view of ``t`` is rebuilt
    in backward from ``fn()``, which must return ``t``'s value again (same shape, dtype and contents) from
    tensors that stay alive anyway. A no-op without grad, while ``torch.compile`` traces, and inside
    :func:`offloaded_activations`.
    """
    if torch.compiler.is_compiling() or _offloading.get() or not (torch.is_grad_enabled() and t.requires_grad):
        yield
        return
    plain = t.is_contiguous() and t.storage_offset() == 0  # so a saved view maps onto the rebuilt tensor
    real = t.device.type != "meta" and t.numel() > 0  # meta tensors: no memory to save, no address to tell apart
    if not (plain and real):
        yield
        return
    ptr, device, dtype = _address(t), t.device, t.dtype
    note = _Recomputed(fn, get_backend())

    def pack(s: torch.Tensor) -> Any:
        if s.device == device and s.dtype == dtype and _address(s) == ptr:
            return note, s.shape, s.stride(), s.storage_offset()
        return s

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        note_, shape, stride, offset = packed
        return note_.get().as_strided(shape, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
