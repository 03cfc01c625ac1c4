"""Content-addressed cache folders: where they live, how keys are hashed, how entries are published.

An entry is a folder named by a hash of everything that determines its content. It is written into a
private temporary folder and renamed into place as the last step, so a folder under its final name is
always complete: an interrupted preparation leaves only a `.tmp-*` folder behind, never an entry that
looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """The root of litliger's caches: `$LITLIGER_CACHE`, else `$XDG_CACHE_HOME/litliger`, else `~/.cache/litliger`."""
    if env := os.environ.get("LITLIGER_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "litliger"


def bytes_digest(data: bytes) -> str:
    """Hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def json_digest(obj: Any) -> str:
    """Hex SHA-256 of a JSON-serialisable object (keys sorted, so dict order never changes a key)."""
    return bytes_digest(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def reclaim_stale(folder: Path) -> list[str]:
    """Remove ``.tmp-*`` folders in ``folder`` left by processes of this host that no longer run (a kill
    during preparation); returns their names. Folders of live processes and of other hosts are kept."""
    mine = re.compile(rf"-{re.escape(socket.gethostname())}-(\d+)-[0-9a-f]{{8}}$")  # .tmp-<name>-<host>-<pid>-<uuid>
    removed = []
    for path in folder.glob(".tmp-*"):
        match = mine.search(path.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


@contextmanager
def publish_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `final`; on success rename it to `final` atomically.

    If another process published `final` first (two runs preparing the same key), its entry is kept and
    ours is discarded: both are built from identical inputs. On error the temporary folder is removed.
    The SIGINT/SIGTERM handlers are restored afterwards: a builder may replace them for good (litdata's
    ``optimize`` installs a SIGINT handler that ends the process with ``os._exit(0)``, so a later Ctrl-C
    would lose a training run's unsaved steps instead of saving them).
    """
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    final.parent.mkdir(parents=True, exist_ok=True)
    reclaim_stale(final.parent)
    tmp = final.parent / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for s, handler in handlers.items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(s, handler)
