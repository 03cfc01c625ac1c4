"""What guards one training run from start to end: the out_dir lock, the signal handlers, and the
clean-up of what an interrupted earlier run left behind. Pretraining and finetuning both enter it first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L

from ..output_safety import RunLock
from .checkpointing import sweep_temporary
from .signals import StopSignals


@contextmanager
def training_session(fabric: L.Fabric, out_dir: Path) -> Iterator[StopSignals]:
    """Lock ``out_dir`` (rank 0, before anything is written into it), install SIGTERM/SIGINT handling and
    remove leftovers of interrupted saves. Every rank gets the same outcome: a locked folder is an error
    on all of them, not a hang."""
    signals = StopSignals()
    with signals.installed():
        lock, error, notes = None, None, []
        if fabric.global_rank == 0:
            lock = RunLock(out_dir)
            try:
                stale = lock.acquire()
            except ValueError as e:
                error, lock = str(e), None
            else:
                if stale:
                    notes.append(stale.stale_notice())
                notes += [f"removed {name} (left by an interrupted save)" for name in sweep_temporary(out_dir)]
        if fabric.world_size > 1:
            error = fabric.broadcast(error, src=0)
        if error:
            raise ValueError(error)
        for note in notes:
            fabric.print(note)
        try:
            yield signals
        finally:
            if lock is not None:
                lock.release()
