"""Bytes a kernel moves per call, counted by the Triton interpreter (no GPU needed).

Every masked load and store the interpreter executes is counted with its element size, and the distinct addresses
are kept: the *minimum* is each distinct input element read once plus each distinct output element written once,
so a kernel that rereads its input (a second pass over a row, a weight reloaded per row) shows a ratio above 1.
The traffic is also reported without the 1-D tensors (weights and biases, reloaded by every program and
L2-resident on a GPU, and per-row statistics), so the ratio over the activations alone says whether the big
tensors are streamed once.

Needs ``TRITON_INTERPRET=1`` set before ``triton`` is imported.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels._launch import LaunchPlan


@dataclass
class Traffic:
    """Addresses and bytes of the loads and stores of one or more kernel runs."""

    loads: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (addresses, element size)
    stores: list[tuple[np.ndarray, int]] = field(default_factory=list)

    @staticmethod
    def _bytes(accesses: list[tuple[np.ndarray, int]], keep: np.ndarray | None = None) -> tuple[int, int]:
        """(bytes accessed, distinct bytes) of ``accesses``, only addresses where ``keep(addresses)`` when given."""
        total, distinct = 0, 0
        for size in {s for _, s in accesses}:
            addrs = [a for a, s in accesses if s == size]
            flat = np.concatenate(addrs) if addrs else np.empty(0, np.uint64)
            if keep is not None:
                flat = flat[keep(flat)]
            total += flat.size * size
            distinct += np.unique(flat).size * size
        return total, distinct

    def summary(self, exclude: list[tuple[int, int]] = ()) -> dict[str, int]:
        """Bytes loaded/stored and the minimum; ``exclude``: (start, end) address ranges left out."""

        def keep(addrs: np.ndarray) -> np.ndarray:
            mask = np.ones(addrs.shape, dtype=bool)
            for start, end in exclude:
                mask &= (addrs < start) | (addrs >= end)
            return mask

        loaded, loaded_min = self._bytes(self.loads, keep)
        stored, stored_min = self._bytes(self.stores, keep)
        return {"loaded": loaded, "stored": stored, "moved": loaded + stored, "minimum": loaded_min + stored_min}


def _addresses(ptrs, mask) -> np.ndarray:
    """The addresses a masked access touches (the interpreter's masks may be 0/1 integers: cast to bool)."""
    return ptrs.data[np.broadcast_to(mask.data.astype(bool), ptrs.data.shape)].astype(np.uint64)


@contextmanager
def count_traffic() -> Iterator[Traffic]:
    """Record every load and store the interpreter runs inside the block."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store
    traffic = Traffic()

    def counted_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        size = interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize
        traffic.loads.append((_addresses(ptrs, mask), size))
        return load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)

    def counted_store(self, ptrs, value, mask, cache_modifier, eviction_policy):
        size = interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize
        traffic.stores.append((_addresses(ptrs, mask), size))
        return store(self, ptrs, value, mask, cache_modifier, eviction_policy)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        yield traffic
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store


def plan_traffic(plan: LaunchPlan) -> dict[str, int]:
    """Run ``plan`` (CPU tensors) through the interpreter and count its traffic: all of it, and without its 1-D
    tensor arguments (``*_activations``: weights, biases and per-row statistics left out)."""
    with count_traffic() as traffic:
        plan.kernel[plan.grid](*plan.args, **plan.constexprs, num_warps=plan.num_warps)
    vectors = [
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for t in plan.args
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.stride(0) != 0
    ]
    result = traffic.summary()
    result.update({f"{k}_activations": v for k, v in traffic.summary(vectors).items()})
    return result
