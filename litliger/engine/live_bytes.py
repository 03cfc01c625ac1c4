"""Peak live tensor bytes: a dispatch-mode counter of the storages that ops create and free.

``LiveBytes`` sees every op (forward, backward and optimizer step: dispatch modes follow autograd into
backward) and counts each new storage's bytes once, from the op that made it until Python frees it (a finalizer
on the storage). It works on real tensors (what a run holds, on any device) and on fake tensors
(``FakeTensorMode``: shapes without data, which is how the planner traces a model it cannot afford to build).
Tensors that exist before it starts (parameters, optimizer state) are passed as a baseline.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages under ``tensors`` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes(baseline, existing) as m: ...``, ``existing`` the tensors ``baseline`` counts; then
    ``m.peak`` (bytes, baseline included) and ``m.live``. ``mark(name)`` records the live bytes at a point
    (``m.marks[name]``); ``enter(phase)`` starts a phase, whose own peak is ``m.phase_peaks[phase]``."""

    def __init__(self, baseline: int = 0, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        # storages that were there before (parameters, optimizer state): in the baseline, never counted again
        # when an op returns a view of them (a weight's transpose)
        self._existing = {t.untyped_storage()._cdata for t in existing}
        self.live = self.peak = baseline
        self.marks: dict[str, int] = {}
        self.phase = "start"
        self.phase_peaks: dict[str, int] = {"start": baseline}
        self._known: dict[int, tuple[str, str, int]] = {}  # storage -> (phase, op that made it, bytes)

    def mark(self, name: str) -> None:
        self.marks[name] = self.live

    def enter(self, phase: str) -> None:
        """From now on, peaks are also recorded under ``phase`` (``phase_peaks``), starting from the bytes live."""
        self.phase = phase
        self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), self.live)

    def held(self) -> dict[tuple[str, str], int]:
        """The bytes alive now that ops made while this counter ran, by (phase they were made in, op)."""
        out: dict[tuple[str, str], int] = {}
        for phase, op, nbytes in self._known.values():
            out[phase, op] = out.get((phase, op), 0) + nbytes
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._known.pop(key, None)
        self.live -= nbytes

    def _add(self, t: torch.Tensor, op: str) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._known or key in self._existing:
            return
        nbytes = st.nbytes()
        self._known[key] = (self.phase, op, nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.phase_peaks[self.phase] = max(self.phase_peaks[self.phase], self.live)
        weakref.finalize(st, self._free, key, nbytes)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self._add(t, func.__name__)
        return out
