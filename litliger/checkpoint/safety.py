"""Guards for folders a command writes into: nothing a user or a training run holds is ever lost.

``check_output_dir`` is called by every command that publishes a folder with ``checkpoint.atomic_dir``
(convert_from_hf, convert_to_hf, merge_lora), because publishing replaces an existing folder whole;
``check_output_file`` by a command that publishes one file (convert_to_gguf, with ``io.atomic_file``).
``check_run_dir`` decides whether a training run may use a folder as its ``out_dir`` at all, ``RunLock``
makes a run the only writer of its ``out_dir``, and ``sweep_leftovers`` removes what an interrupted save
of that run left behind: only names litliger itself creates (``scratch_path``), never a user's folder.

All of it lives here, below the engine and the recipes, and imports only the standard library (and
``util.files``), so any layer can use it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import stat
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from ..util.files import check_out_file
from .layout import (
    CHECKSUMS_FILE,
    CONFIG_FILE,
    FINAL_DIR,
    LOCK_FILE,
    STEP_DIR_PATTERN,
    TRAINING_STATE_DIR,
    is_leftover,
)


def sweep_leftovers(out_dir: Path) -> list[str]:
    """Remove what an interrupted save of a training run left in ``out_dir``; returns the names handled.

    Only the scratch names of a step or final checkpoint (``scratch_path``) are touched. A kill between the
    two renames of a replacing publish leaves ``.litliger-old.<name>.*`` without ``<name>``: that folder is
    the only copy and is renamed back, never deleted. Call only on a run's out_dir, holding its lock.
    """
    handled = []
    for path in sorted(out_dir.iterdir()) if out_dir.is_dir() else ():
        leftover = is_leftover(path.name)
        if not leftover or path.is_symlink() or not path.is_dir():
            continue
        kind, name = leftover
        original = out_dir / name
        if kind == "old" and not original.exists():
            path.rename(original)
        else:
            shutil.rmtree(path, ignore_errors=True)
        handled.append(path.name)
    return handled


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` is a training run's out_dir: it holds the run lock (a regular file) or a step or
    final checkpoint with its training state."""
    lock = folder / LOCK_FILE
    if lock.is_file() and not lock.is_symlink():
        return True
    return any(
        (STEP_DIR_PATTERN.match(p.name) or p.name == FINAL_DIR) and (p / TRAINING_STATE_DIR).is_dir()
        for p in folder.iterdir()
    )


def check_run_dir(out_dir: str | Path) -> None:
    """Refuse an ``out_dir`` a training run must not write into; raise ``ValueError`` saying why.

    The filesystem root and the home folder are always refused; any other existing folder only when it holds
    something and is not a litliger run (a run writes its lock, logs and checkpoints there and removes its
    own leftovers, so it never shares a folder with a user's files).
    """
    out = Path(out_dir).expanduser()
    real = out.resolve()
    if real == Path(real.anchor) or real == Path.home().resolve():
        where = "the filesystem root" if real == Path(real.anchor) else "your home folder"
        raise ValueError(f"out_dir {out_dir} is {where}, in --out_dir; choose a folder of its own, e.g. out/my_run")
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"out_dir {out_dir} is an existing file, in --out_dir; choose a folder path")
    entries = [p.name + ("/" if p.is_dir() else "") for p in sorted(out.iterdir())]
    if entries and not is_run_dir(out):
        raise ValueError(
            f"out_dir {out_dir} holds files that are not a litliger run ({_names(entries)}), in --out_dir; "
            "choose a new or empty folder (nothing was changed)"
        )


def check_output_dir(
    out_dir: str | Path, *, inputs: Sequence[str | Path], overwrite: bool, flag: str = "--overwrite"
) -> None:
    """Refuse an output folder whose replacement would lose data; raise ``ValueError`` saying why.

    Always refused, even with ``overwrite``: an input folder itself, a folder that holds an input (a parent
    of it), a folder inside an input (the input would change while it is the source), an existing file, and
    a folder that is or holds a training run (``_training_run_marks``). Otherwise a non-empty folder is refused unless
    ``overwrite``; a missing or empty one is fine. ``flag`` is the CLI option that sets ``overwrite``.
    Call it before the work (to fail fast) and again just before publishing (the folder may have changed).
    """
    out = Path(out_dir).resolve()
    for source in inputs:
        src = Path(source).resolve()
        if out == src:
            raise ValueError(f"output folder {out_dir} is the input folder; choose another folder")
        if src.is_relative_to(out):
            raise ValueError(f"output folder {out_dir} holds the input {source}; choose a folder outside it")
        if out.is_relative_to(src):
            raise ValueError(f"output folder {out_dir} is inside the input {source}; choose a folder outside it")
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"output folder {out_dir} is an existing file; choose a folder path")
    entries = [p.name + ("/" if p.is_dir() else "") for p in sorted(out.iterdir())]
    if run_marks := _training_run_marks(out):
        raise ValueError(
            f"output folder {out_dir} holds a training run ({_names(run_marks)}); choose another folder "
            f"({flag} never replaces training checkpoints)"
        )
    if entries and not overwrite:
        raise ValueError(
            f"output folder {out_dir} is not empty (holds {_names(entries)}); choose an empty or new folder, "
            f"or pass {flag} true to replace it"  # jsonargparse's bool flags take a value
        )


def check_output_file(
    out_file: str | Path, *, inputs: Sequence[str | Path], overwrite: bool, flag: str = "--overwrite"
) -> None:
    """``check_output_dir`` for a command that publishes one file (``convert_to_gguf``); raise ``ValueError``.

    Always refused, even with ``overwrite``: a path inside an input folder, inside a checkpoint folder (it
    holds model_config.yaml or checksums.json) or inside a training run's folder (``is_run_dir``, or a
    ``training_state/`` beside it), at any depth, since a file added there changes what the folder holds; a
    folder, or a path that cannot be written (``check_out_file``). An existing file is refused unless
    ``overwrite``. Call it before the work and again just before publishing.
    """
    check_out_file(Path(out_file), "give the path of the file to write")
    out = Path(out_file).resolve()
    for source in inputs:
        src = Path(source).resolve()
        if out.is_relative_to(src):
            raise ValueError(f"output file {out_file} is inside the input {source}; choose a path outside it")
    for folder in out.parents:
        if _is_checkpoint_folder(folder) or _readable_run_dir(folder):
            raise ValueError(
                f"output file {out_file} is inside the checkpoint or training run {folder}; choose a path outside "
                f"it ({flag} never writes into checkpoints)"
            )
    if out.exists() and not overwrite:  # jsonargparse's bool flags take a value
        raise ValueError(f"output file {out_file} exists; choose a new file, or pass {flag} true to replace it")


def _is_checkpoint_folder(folder: Path) -> bool:
    """A checkpoint folder or one of its parts: it holds model_config.yaml, checksums.json or training_state/."""
    return any((folder / name).exists() for name in (CONFIG_FILE, CHECKSUMS_FILE, TRAINING_STATE_DIR))


def _readable_run_dir(folder: Path) -> bool:
    """``is_run_dir`` for a folder above an output file; one that does not exist or cannot be listed (a parent
    such as /home without read permission) holds no run this process could have written."""
    try:
        return folder.is_dir() and is_run_dir(folder)
    except OSError:
        return False


def _training_run_marks(folder: Path) -> list[str]:
    """What shows ``folder`` is (or holds) a run's out_dir or checkpoint, as paths relative to it.

    Directly inside: ``step-XXXXXXXX/``, ``final/``, ``training_state/`` or the lock file. Deeper down only
    the unambiguous ones (``training_state/``, the lock file), since e.g. ``exports/final/`` may be anything.
    Symbolic links are not followed: replacing the folder removes a link, never what it points to.
    """
    marks = []
    for root, dirs, files in os.walk(folder):
        where = Path(root).relative_to(folder)
        direct = where == Path(".")
        marks += [str(where / name) for name in sorted(files) if name == LOCK_FILE]
        dirs.sort()  # walk in name order: the same folder gives the same message
        for name in dirs:
            if name == TRAINING_STATE_DIR or (direct and (STEP_DIR_PATTERN.match(name) or name == FINAL_DIR)):
                marks.append(str(where / name) + "/")
    return marks


def _names(names: list[str], shown: int = 3) -> str:
    """``a/, b.txt, c and 4 more``: folders end in /, so a user sees what would be lost."""
    if len(names) <= shown:
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return ", ".join(names[:shown]) + f" and {len(names) - shown} more"


# --- the run lock ------------------------------------------------------------------------------------------


class RunLockedError(ValueError):
    """The out_dir is locked by another live process, or already by this one.

    A ValueError, so the CLI reports it as one line like every other input a user can fix.
    """


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a run lock: what the lock file records."""

    pid: int
    host: str
    started: str  # the command line is not recorded: it may hold secrets, and the file is for the run alone

    def stale_notice(self) -> str:
        """The one line a caller prints when it takes over the lock of a process that died holding it."""
        return f"taking over the stale lock of process {self.pid} on host {self.host}"


# Locks held by this process, by the lock file's (device, inode): a second flock from this process on the
# same file would fail as if another process held it, naming our own pid, so re-entry is caught first.
_HELD: set[tuple[int, int]] = set()


class RunLock:
    """An exclusive lock on a run's ``out_dir``: ``out_dir/.litliger-lock`` held with ``flock``.

    The kernel drops a flock when its holder dies, so a crashed run (even SIGKILLed) never leaves the folder
    stuck: the next run takes the lock over, and ``acquire()`` returns the dead holder (from the file's
    content) so the caller can print ``holder.stale_notice()``. The library itself prints nothing.

    Not re-entrant: acquiring a folder this process already holds (through any ``RunLock`` or path
    spelling) raises ``RunLockedError`` instead of counting, since two writers in one process are as much
    a bug as two processes. ``release()`` empties the file (so a clean exit is not reported as stale later)
    but leaves it in place: deleting it would let a waiting process lock a file that is about to vanish.
    Processes forked while the lock is held share it (flock belongs to the open file), so a run is only
    considered finished when its forked workers are gone too.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None
        self.stale: LockHolder | None = None  # the dead holder the last acquire() took over

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> LockHolder | None:
        """Lock ``out_dir`` (creating it); returns the holder whose stale lock was taken over, else None."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = _open_lock_file(self.path)
        try:
            key = _file_key(os.fstat(fd))
            if key in _HELD:
                raise RunLockedError(
                    f"out_dir {self.out_dir} is already locked by this process (pid {os.getpid()}); "
                    "release that lock before acquiring it again"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                who = (
                    f"process {holder.pid} on host {holder.host} (started {holder.started})"
                    if holder
                    else "another process (just starting)"  # it has the flock but has not written its info yet
                )
                raise RunLockedError(
                    f"out_dir {self.out_dir} is in use by {who}; wait for it to finish or choose another --out_dir"
                ) from None
            try:  # the name must still be the file we locked: not swapped for a link or another file meanwhile
                now = os.lstat(self.path)
            except FileNotFoundError:
                now = None
            if now is None or not stat.S_ISREG(now.st_mode) or _file_key(now) != key:
                raise RunLockedError(
                    f"{self.path} was replaced while this run locked it, in --out_dir; make sure no other "
                    "program writes into out_dir and start again"
                )
            stale = _read_holder(fd)
            started = datetime.now().astimezone().isoformat(timespec="seconds")
            me = LockHolder(os.getpid(), socket.gethostname(), started)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(dataclasses.asdict(me)).encode(), 0)
        except BaseException:
            os.close(fd)  # closing drops the flock too, if it was taken
            raise
        self._fd, self._key, self.stale = fd, key, stale
        _HELD.add(key)
        return stale

    def release(self) -> None:
        """Unlock and close; a no-op when not held (safe in ``finally``)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # still locked: nobody reads a half-cleared file
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            _HELD.discard(self._key)
            self._fd = self._key = None

    def __enter__(self) -> RunLock:
        """``with RunLock(out_dir) as lock:``; a taken-over stale holder is in ``lock.stale``."""
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _file_key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _open_lock_file(path: Path) -> int:
    """Open (or create, owner-only) the lock file without following a symbolic link: a link planted there
    must not make the run truncate the file it points to. Anything but a regular file is refused."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if path.is_symlink():
            raise RunLockedError(
                f"{path} is a symbolic link, in --out_dir; a run lock must be a regular file: remove the link "
                "(nothing was changed)"
            ) from None
        raise RunLockedError(
            f"cannot open the run lock {path} ({e.strerror}), in --out_dir; fix its permissions"
        ) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunLockedError(f"{path} is not a regular file, in --out_dir; remove it (nothing was changed)")
    return fd


def _read_holder(fd: int) -> LockHolder | None:
    """The holder recorded in the lock file, or None when it is empty (released cleanly) or unreadable."""
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0))
        return LockHolder(int(info["pid"]), str(info["host"]), str(info["started"]))
    except (ValueError, KeyError, TypeError):
        return None
