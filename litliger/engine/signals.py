"""SIGTERM and SIGINT (Ctrl-C) at any moment of a run, without losing anything.

A run is in one of two states as far as signals are concerned:

- *nothing unsaved* (setup, data preparation, tokenizer training, the initial validation, the end-of-run
  sample): the first signal raises :class:`RunInterrupted` at once. It is a ``BaseException``, so every
  ``finally`` and context manager on the way up runs: temporary folders are removed, the run lock is
  released. The CLI exits 0 for SIGTERM (a scheduler asked politely) and 130 for SIGINT.
- *progress that a checkpoint must keep* (inside :meth:`StopSignals.deferred`: the training loop, a save,
  the final validation): a signal is only recorded. The loop finishes the step, saves, and returns; a
  save is never interrupted, not even by a second signal.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(BaseException):
    """A signal arrived while there was no training progress to save."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; no unsaved training progress was lost")

    @property
    def exit_code(self) -> int:
        return 130 if self.signum == signal.SIGINT else 0


class StopSignals:
    """Records SIGTERM/SIGINT for one run; raises or defers as the module docstring describes."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal's number
        self._deferring = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if self._deferring == 0:
            raise RunInterrupted(signum)

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle the signals for the duration of the block (main thread only; a no-op elsewhere)."""
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in HANDLED}
        except ValueError:  # not the main thread: leave the process's handlers alone
            self._previous = {}
        try:
            yield self
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside this block a signal is only recorded (checked by the training loop)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
