"""The embedded corpus: the Python standard library's own source, which every machine running litliger has.

It needs no download, is a few MB of real, varied code, and is fixed for a given Python installation, so
the debug pretraining config can tokenize and train on it anywhere, offline.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePath

from litliger.data.text_files import TextFiles


def stdlib_dir() -> Path:
    """The folder of the running interpreter's standard library (e.g. /usr/lib/python3.11)."""
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass
class PythonStdlib(TextFiles):
    """The standard library's `.py` files as a pretraining corpus (tests and installed packages excluded).

    Files are taken top-level modules first, then package modules, each group sorted by path, until
    `max_bytes` would be exceeded (None: no cap). The choice depends only on the installation, so two runs
    on one machine see the same corpus and reuse the same cache. The validation split is held out by file
    (see TextFiles).
    """

    train_data_path: Path = field(default_factory=stdlib_dir)
    glob: str = "**/*.py"  # only the file-name part is used; folders are walked with `exclude` pruned
    max_bytes: int | None = 16_000_000
    # Folder names skipped anywhere in the tree: third-party code, and test suites full of odd encodings.
    exclude: tuple[str, ...] = ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")

    def _list_files(self, root: Path) -> list[Path]:
        # os.walk prunes excluded folders before descending: site-packages alone can hold 10x the stdlib.
        pattern = PurePath(self.glob).name
        files = []
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in self.exclude)
            files += [Path(folder, n) for n in names if fnmatch(n, pattern) and Path(folder, n).is_file()]
        files.sort(key=lambda f: f.relative_to(root).as_posix())
        if self.max_bytes is None:
            return files
        chosen, total = [], 0
        for f in sorted(files, key=lambda f: (len(f.relative_to(root).parts) > 1, f.relative_to(root).as_posix())):
            total += f.stat().st_size
            if total > self.max_bytes:
                break
            chosen.append(f)
        return sorted(chosen, key=lambda f: f.relative_to(root).as_posix())
