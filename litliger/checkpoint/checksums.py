"""Every file of a checkpoint folder, recorded with its size and sha256 when written, verified when read.

``checksums.json`` sits at the root of every checkpoint folder litliger writes (a training run's step and
final folders, converted and merged models) and lists every other file below it::

    {"format": "litliger-checksums/1", "files": {"model.safetensors": {"size": 123, "sha256": "..."}, ...}}

Loading a model verifies the files outside ``training_state/``; resuming verifies all of them. A flipped
bit, a truncated or a replaced file is refused with its name instead of being trained on. Verification
hashes at disk speed (several files at once); ``LITLIGER_VERIFY=0`` turns it off. A folder without
``checksums.json`` (made by hand, or by a litliger older than this file) is read as it is: there is
nothing to compare with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from .layout import CHECKSUMS_FILE
from .tensor_files import sha256_file

FORMAT = "litliger-checksums/1"
VERIFY_ENV = "LITLIGER_VERIFY"
TRAINING_STATE_PREFIX = "training_state/"

Entry = dict[str, Any]  # {"size": int, "sha256": str}


def verification_enabled() -> bool:
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def file_entry(path: Path) -> Entry:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _hash_all(paths: Iterable[Path]) -> list[Entry]:
    # hashlib releases the GIL on large buffers: a few threads hash several files at once
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(paths)))) as pool:
        return list(pool.map(file_entry, paths))


def write_checksums(folder: Path, known: Mapping[str, Entry] | None = None) -> None:
    """Record every file below ``folder``; ``known`` holds entries already computed elsewhere (by the rank
    that wrote the file), which are taken as they are for files of that name."""
    known = dict(known or {})
    names = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE
    )
    todo = [n for n in names if n not in known]
    files = {
        **{n: known[n] for n in names if n in known},
        **dict(zip(todo, _hash_all(folder / n for n in todo), strict=True)),
    }
    record = {"format": FORMAT, "files": dict(sorted(files.items()))}
    with open(folder / CHECKSUMS_FILE, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=1) + "\n")


def read_checksums(folder: Path) -> dict[str, Entry] | None:
    """The recorded entries of ``folder`` (relative name -> entry), or None when it records none."""
    path = folder / CHECKSUMS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        files = record["files"]
        if record.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("not a litliger checksum record")
        for name, entry in files.items():
            parts = PurePosixPath(name).parts
            if PurePosixPath(name).is_absolute() or ".." in parts or not parts:
                raise ValueError(f"the name {name!r} points outside the folder")
            if not (isinstance(entry["size"], int) and isinstance(entry["sha256"], str)):
                raise ValueError(f"the entry of {name} is malformed")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt ({e}); restore the checkpoint or use another one") from e
    return files


def incomplete_files(folder: Path) -> list[str] | None:
    """Recorded files that are missing or of another size (a cheap completeness check; with verification
    turned off only missing ones), or None when ``folder`` records no checksums."""
    files = read_checksums(folder)
    if files is None:
        return None
    sized = verification_enabled()
    return [
        n
        for n, e in files.items()
        if not (folder / n).is_file() or (sized and (folder / n).stat().st_size != e["size"])
    ]


def verify_checksums(folder: str | Path, *, training_state: bool) -> None:
    """Check the recorded files of ``folder`` (also those under training_state/ when ``training_state``)
    against their sizes and sha256; raise ``ValueError`` naming the first that differs."""
    folder = Path(folder)
    if not verification_enabled():
        return
    files = read_checksums(folder)
    if files is None:
        return
    chosen = {n: e for n, e in files.items() if training_state or not n.startswith(TRAINING_STATE_PREFIX)}
    advice = f"restore the checkpoint or use another one ({VERIFY_ENV}=0 skips this check)"
    for name, entry in chosen.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path} is missing (it is listed in {folder / CHECKSUMS_FILE}); {advice}")
        if path.stat().st_size != entry["size"]:
            raise ValueError(
                f"{path} has {path.stat().st_size} bytes but was written with {entry['size']}: the file is "
                f"corrupt or incomplete (truncated or replaced); {advice}"
            )
    names = list(chosen)
    for name, actual in zip(names, _hash_all(folder / n for n in names), strict=True):
        if actual["sha256"] != chosen[name]["sha256"]:
            raise ValueError(
                f"{folder / name} does not match the sha256 recorded when it was written (it is corrupt or was "
                f"changed since); {advice}"
            )
