"""Writing a small file whole or not at all, and checking beforehand that it can be written (stdlib only)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a hidden temporary file in the same folder, renamed into place when
    complete: a failure (a full disk, a kill) leaves the previous file as it was, never a part of the new one.
    A symbolic link at ``path`` is kept (the file it points to is written, as a plain write would), and the
    new file's mode follows the umask like a plain write's."""
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a plain write would have made it 0666 - umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_out_file(path: Path, advice: str) -> None:
    """Refuse, with one line that says why, an ``--out_file`` that could not be written: a folder, a path
    below a file, a folder without write permission (the nearest existing one; the rest is created), or
    something that is not a regular file. ``advice`` ends the folder messages ("give the path of ... to write")."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder, in --out_file; {advice}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{parent} is a file, not a folder, in --out_file {path}; give a path inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"the folder {parent} is not writable, in --out_file {path}; give a path you may write to")
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a regular file, in --out_file; {advice}")


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` ({} when absent); a corrupt file is a ValueError that names it."""
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"invalid JSON ({e}), in {path}; fix or replace the file") from e
    if not isinstance(values, dict):
        raise ValueError(f"not a JSON object, in {path}; fix or replace the file")
    return values
