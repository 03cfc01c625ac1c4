"""What guards one training run from start to end: the out_dir lock, the signal handlers, and the
clean-up of what an interrupted earlier run left behind. Pretraining and finetuning both enter it first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L

from ..checkpoint.safety import RunLock, check_run_dir, sweep_leftovers
from .signals import StopSignals


@contextmanager
def training_session(fabric: L.Fabric, out_dir: Path) -> Iterator[StopSignals]:
    """Check that ``out_dir`` may hold a run (not the root, the home folder or a folder of other content), lock
    it (rank 0, before anything is written into it), install SIGTERM/SIGINT handling and remove leftovers of
    this run's interrupted saves. Every rank gets the same outcome: a refused or locked folder is an error on
    all of them, not a hang."""
    signals = StopSignals()
    with signals.installed():
        lock, error, notes = None, None, []
        if fabric.global_rank == 0:
            lock = RunLock(out_dir)
            try:
                check_run_dir(out_dir)
                stale = lock.acquire()
            except ValueError as e:
                error, lock = str(e), None
            else:
                if stale:
                    notes.append(stale.stale_notice())
                notes += [f"removed {name} (left by an interrupted save)" for name in sweep_leftovers(out_dir)]
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
