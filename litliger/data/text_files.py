"""A folder (or a single file) of text files, each one document: the simplest case of ``Corpus``.

Every file matched by ``glob`` is read as one UTF-8 document whatever its extension; empty files and
files that are not UTF-8 are skipped (the latter with a warning). Preparation, the cache, the validation
split and the loaders are ``TokenCorpus``'s (``corpus.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from litliger.data.corpus import TokenCorpus
from litliger.data.records import Part


@dataclass
class TextFiles(TokenCorpus):
    """Pretraining data from a folder (or a single file) of UTF-8 text; each file is one document.

    Args:
        train_data_path: folder of training files (searched with `glob`), or one text file.
        val_data_path: folder (or file) of validation text. None holds out files of the training folder:
            `val_split_fraction` of them (at least one), chosen by a hash of their names, so the split is
            deterministic and stable when files are added; a single-file corpus holds out its last lines
            instead. `val_split_fraction=0` means no validation set.
        glob: pattern of the files to read, relative to the folder.
        seed: shuffle seed of the training stream (the order also changes every epoch).
        num_workers: dataloader worker processes (0 = load in the main process).
        num_proc: preparation processes (None: every core this process may use).
        cache_dir: where prepared data is cached; default `<cache root>/data`, the root being
            `$LITLIGER_CACHE` or `~/.cache/litliger`.
        reset: on resume, ignore the checkpoint's data position and start this data from its beginning.
        document_mask: batches carry document ids from the EOS that ends every document: no attention across
            documents, positions restart at each (litliger/model/documents.py). Off by default.
    """

    train_data_path: Path
    val_data_path: Path | None = None
    val_split_fraction: float = 0.05
    glob: str = "**/*.txt"
    seed: int = 42
    num_workers: int = 0
    num_proc: int | None = None
    cache_dir: Path | None = None
    reset: bool = False
    document_mask: bool = False
    _text_only = True

    def __post_init__(self) -> None:
        self.train_data_path = Path(self.train_data_path).expanduser()
        if self.val_data_path is not None:
            self.val_data_path = Path(self.val_data_path).expanduser()
        self._check()

    def _roots(self) -> tuple[tuple[str, str], tuple[str, str] | None]:
        val = (str(self.val_data_path), "val_data_path") if self.val_data_path is not None else None
        return (str(self.train_data_path), "train_data_path"), val

    def _glob(self) -> str | None:
        return self.glob

    def documents(self) -> dict[str, list[Part]]:
        """The train and val documents (files, or a single file's byte ranges)."""
        parts = self.parts()
        return {s: [p for p in parts if p.split == s] for s in ("train", "val")}
