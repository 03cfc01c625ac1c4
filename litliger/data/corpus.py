"""A pretraining corpus of any common format, tokenized once into a content-addressed cache.

``Corpus`` reads a file, a folder or a glob of text, JSON-lines, JSON, parquet (and compressed) files
(``records.py`` says how each format is read and cut into parts), tokenizes it on all cores into token
shards (``shards.py``) in the cache, and trains on blocks of ``max_seq_length + 1`` tokens with an exactly
resumable loader. ``TextFiles`` and ``PythonStdlib`` are the same machinery with every file read as one
text document.

Validation split (``val_split_fraction``, unless ``val_path`` names its own data; 0 means none, 1 means
everything: a held-out corpus for ``litliger evaluate``, which nothing can train on):

- one-document-per-file formats hold out that share of the files (at least one), ranked by a hash of their
  relative names: deterministic, and stable when files are added. A single text file holds out its tail,
  cut at the first line break after ``1 - val_split_fraction`` of its bytes.
- record formats hold out each record whose hash of (file name, place in the file) falls under the
  share: deterministic, independent of how the file is cut into parts, and stable when files are added.

Cache key: the shards format, the tokenizer, ``text_key``, the hold-out share, the parts and each file's
identity (``identity.py``: size, modification time and a sampled digest, or every byte with
``verify="full"``). The sequence length is not in it: one preparation serves every block size.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from litliger.data.base import DataModule, ResumableLoader, token_train_loader, token_val_loader
from litliger.data.cache import bytes_digest, cache_root, json_digest, publish_dir
from litliger.data.identity import VERIFY_MODES, file_identity
from litliger.data.records import FileFormat, Part, Skipped, file_parts, format_of, read_documents
from litliger.data.shards import (
    CHUNK_TOKENS,
    META,
    SHARDS_FORMAT,
    finish,
    plan_units,
    run_units,
    split_complete,
    split_tokens,
    summarize,
    token_dtype,
    unit_target,
)
from litliger.data.tokenizer import Tokenizer, decode_utf8

_GLOB_CHARS = frozenset("*?[")
_BPE_TEXT_CAP = 256 << 20  # characters of a record corpus a default BPE tokenizer is trained on


def default_workers() -> int:
    """Preparation processes when ``num_proc`` is not given: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class TokenCorpus(DataModule):
    """The machinery behind ``Corpus`` and ``TextFiles``: list, split, prepare into the cache, load.

    Subclasses say where the data is (``_roots``), how files are matched (``_glob``) and whether every
    file is one text document whatever its name (``_text_only``).
    """

    text_key: str = "text"
    val_split_fraction: float = 0.05
    seed: int = 42
    num_workers: int = 0
    num_proc: int | None = None
    verify: str = "fast"
    cache_dir: Path | None = None
    _text_only = False

    @abstractmethod
    def _roots(self) -> tuple[tuple[str, str], tuple[str, str] | None]:
        """((train location, its argument name), (val location, its argument name) or None)."""

    @abstractmethod
    def _glob(self) -> str | None:
        """The pattern of files inside a folder (None: every file but hidden ones)."""

    def _check(self) -> None:
        self._parts: list[Part] | None = None
        if not 0.0 <= self.val_split_fraction <= 1.0:
            raise ValueError(f"val_split_fraction must be in [0, 1], got {self.val_split_fraction}.")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {self.verify!r}.")
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"num_proc must be >= 1 (or None for all cores), got {self.num_proc}.")

    # ---------------------------------------------------------------- DataModule

    def training_files(self) -> list[Path]:
        return list(dict.fromkeys(p.path for p in self.parts() if p.split != "val" and p.fmt.kind == "text"))

    def _require_training_split(self) -> None:
        """Refuse to train on a corpus that is all validation (``val_split_fraction`` 1, no ``val_path``)."""
        if self.val_split_fraction >= 1.0 and self._roots()[1] is None:
            raise ValueError(
                f"val_split_fraction=1.0 holds out all of {self._roots()[0][0]} for validation, so there is nothing "
                "to train on, in --data.val_split_fraction; use a value below 1 to train (1.0 is for litliger "
                "evaluate)"
            )

    def train_tokenizer(self, vocab_size: int) -> Tokenizer:
        self._require_training_split()
        if all(p.fmt.kind == "text" and p.fmt.compression is None for p in self.parts()):
            return super().train_tokenizer(vocab_size)
        return Tokenizer.train_bpe([], vocab_size, texts=self.tokenizer_texts, identity=json_digest(self._key_parts()))

    def tokenizer_texts(self) -> Iterator[str]:
        """Training documents for a BPE: spread over the training parts, at most 256 Mi characters."""
        return _capped_texts([p for p in self.parts() if p.split != "val"], self.text_key)

    def prepare_data(self) -> None:
        tokenizer = self._require_tokenizer()
        entry = self.entry()
        if _entry_complete(entry):
            return
        if entry.exists():  # published once, but files have gone missing since: rebuild it
            shutil.rmtree(entry)
        parts = self.parts()
        units = plan_units(parts, unit_target(sum(p.size for p in parts)))
        start = time.perf_counter()
        with publish_dir(entry) as tmp:
            results = run_units(
                units, tokenizer=tokenizer, text_key=self.text_key, fraction=self.val_split_fraction, out_dir=tmp,
                num_proc=self.num_proc or default_workers(), progress=sys.stderr.isatty(), label="litliger.data",
            )  # fmt: skip
            summary = summarize(results, time.perf_counter() - start)
            self._check_summary(summary)
            dtype = token_dtype(tokenizer.vocab_size)
            meta = {**vars(summary), "tokenizer": tokenizer.fingerprint}
            finish(tmp, results, dtype=dtype, chunk_tokens=CHUNK_TOKENS, key=entry.name, meta=meta)
        print(f"litliger.data: {summary.line()}, cached in {entry}", file=sys.stderr)

    def setup(self) -> None:
        if not _entry_complete(self.entry()):
            raise FileNotFoundError(
                f"The data of {self._roots()[0][0]} is not prepared for this tokenizer: call prepare_data() "
                "(on rank 0) before setup()."
            )
        block, (root, _) = self.max_seq_length + 1, self._roots()[0]
        for split in ("train", "val"):
            if (self.entry() / split).is_dir() and not any(d // block for d in split_tokens(self.entry() / split)):
                tokens = sum(split_tokens(self.entry() / split))
                raise ValueError(
                    f"The {split} text of {root} ({tokens} tokens) is shorter than one sample of max_seq_length + 1 = "
                    f"{block} tokens: add text or lower max_seq_length."
                )

    def streams(self) -> dict:
        """Where the prepared splits are: {"train", "val" (or None), "fingerprint", "options"} (as TokenShards)."""
        entry = self.entry()
        val = entry / "val"
        return {
            "train": str(entry / "train"),
            "val": str(val) if (val / "index.json").is_file() else None,
            "fingerprint": entry.name,
            "options": {},
        }

    def train_dataloader(self) -> ResumableLoader:
        self._require_training_split()
        entry = self.entry()
        return token_train_loader(
            str(entry / "train"), block=self.max_seq_length + 1, batch_size=self.batch_size, seed=self.seed,
            num_workers=self.num_workers, fingerprint=entry.name, what=f"the training data of {self._roots()[0][0]}",
            eos_id=self.document_eos(),
        )  # fmt: skip

    def val_dataloader(self):  # noqa: ANN201 (a StreamingDataLoader or None)
        entry = self.entry()
        if not (entry / "val" / "index.json").is_file():
            return None
        return token_val_loader(
            str(entry / "val"), block=self.max_seq_length + 1, batch_size=self.batch_size,
            num_workers=self.num_workers, what=f"the validation data of {self._roots()[0][0]}",
            eos_id=self.document_eos(),
        )  # fmt: skip

    # ---------------------------------------------------------------- corpus

    def parts(self) -> list[Part]:
        """The corpus cut into parts, each routed to train, val or record-level hold-out (listed once)."""
        if self._parts is None:
            (train_root, train_arg), val = self._roots()
            files = self._files(train_root, train_arg)
            if val is not None:
                parts = [(f, n, fmt, "train") for f, n, fmt in files]
                parts += [(f, n, fmt, "val") for f, n, fmt in self._files(*val)]
            elif self.val_split_fraction == 0:
                parts = [(f, n, fmt, "train") for f, n, fmt in files]
            else:
                parts = self._split(files)
            total = sum(f.stat().st_size for f, *_ in parts)
            target = unit_target(total)
            self._parts = []
            for f, name, fmt, split in parts:
                if isinstance(split, tuple):  # a byte range of a single text file
                    (start, end, which) = split
                    self._parts.append(Part(f, name, fmt, start, end, which, end - start))
                else:
                    self._parts += file_parts(f, name, fmt, split, target)
        return self._parts

    def _split(self, files: list[tuple[Path, str, FileFormat]]) -> list[tuple]:
        texts = [x for x in files if x[2].kind == "text"]
        records = [(*x, "records") for x in files if x[2].kind != "text"]
        if self.val_split_fraction >= 1.0:  # all validation: every file, and every record (is_val_record)
            return [(*x, "val") for x in texts] + records
        if len(files) == 1 and texts:
            (f, name, fmt) = texts[0]
            cut = _line_cut(f, self.val_split_fraction)
            return [(f, name, fmt, (0, cut, "train")), (f, name, fmt, (cut, f.stat().st_size, "val"))]
        if len(texts) < 2:
            return [(*x, "train") for x in texts] + records
        n_val = min(max(1, round(self.val_split_fraction * len(texts))), len(texts) - 1)
        held_out = {x[1] for x in sorted(texts, key=lambda x: bytes_digest(x[1].encode()))[:n_val]}
        return [(*x, "val" if x[1] in held_out else "train") for x in texts] + records

    def _files(self, location: str, what: str) -> list[tuple[Path, str, FileFormat]]:
        """(path, name relative to the root, format) of the corpus files at ``location``, sorted by name."""
        text = str(location)
        if _GLOB_CHARS & set(text):
            prefix = re.split(r"[*?\[]", os.path.expanduser(text), maxsplit=1)[0]  # names are relative to the
            root = Path(prefix) if prefix.endswith(("/", os.sep)) else Path(prefix).parent  # pattern's folder
            found = [Path(p) for p in globlib.glob(os.path.expanduser(text), recursive=True)]
            files = sorted((p for p in found if p.is_file()), key=lambda p: p.as_posix())
            if not files:
                raise FileNotFoundError(
                    f"{type(self).__name__}.{what}: no file matches {text}; check the pattern or the folder"
                )
        else:
            root = Path(text).expanduser()
            if not root.exists():
                raise FileNotFoundError(
                    f"{type(self).__name__}.{what}: {root} does not exist; point it at a corpus file or folder."
                )
            if root.is_file():
                files, root = [root], root.parent
            else:
                files = self._list_files(root)
                if not files:
                    raise ValueError(
                        f"No files matching '{self._glob() or '**/*'}' in {root}: add files there or set glob "
                        "(e.g. '**/*.jsonl')."
                    )
        listed = [(f, _relative(f, root), format_of(f, self._text_only)) for f in files]
        return self._readable(listed, location)

    def _list_files(self, root: Path) -> list[Path]:
        """The corpus files under a folder, sorted by relative path (subclasses may filter or cap them)."""
        pattern = self._glob() or "**/*"
        found = (p for p in root.glob(pattern) if p.is_file() and not _hidden(p.relative_to(root)))
        return sorted(found, key=lambda p: p.relative_to(root).as_posix())

    def _readable(self, files: list[tuple[Path, str, FileFormat]], location: str) -> list:
        """Leave out small plain text files that are empty or not UTF-8 (one warning), as documents go."""
        kept, undecodable = [], []
        for f, name, fmt in files:
            if fmt.kind == "text" and fmt.compression is None and f.stat().st_size <= 1 << 20:
                text = decode_utf8(f.read_bytes())
                if text is None:
                    undecodable.append(f)
                if not text or not text.strip():
                    continue
            kept.append((f, name, fmt))
        if not kept:
            raise ValueError(
                f"No text in {location}: the {len(files)} files matching '{self._glob() or '**/*'}' are all empty "
                "or not UTF-8. Point the path at UTF-8 text files or change glob."
            )
        if undecodable:
            warnings.warn(
                f"Skipped {len(undecodable)} of {len(files)} files in {location} that are not UTF-8, "
                f"e.g. {undecodable[0]}.",
                stacklevel=4,
            )
        return kept

    # ---------------------------------------------------------------- cache

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__}.connect(tokenizer, batch_size, max_seq_length) was not called.")
        return self.tokenizer

    def _key_parts(self) -> list:
        identities: dict[Path, str] = {}
        for p in self.parts():
            if p.path not in identities:
                identities[p.path] = file_identity(p.path, self.verify)
        return [
            [p.name, p.fmt.kind, p.fmt.compression, p.start, p.end, p.split, identities[p.path]] for p in self.parts()
        ]

    def entry(self) -> Path:
        """The cache folder of this corpus with this tokenizer (``train/``, ``val/``, ``litliger.json``)."""
        if not hasattr(self, "_entry_path") or self._entry_for != self._require_tokenizer().fingerprint:
            key = json_digest(
                {
                    "format": SHARDS_FORMAT,
                    "tokenizer": self._require_tokenizer().fingerprint,
                    "text_key": self.text_key,
                    "fraction": self.val_split_fraction,
                    "chunk_tokens": CHUNK_TOKENS,
                    "parts": self._key_parts(),
                }
            )
            root = Path(self.cache_dir).expanduser() if self.cache_dir is not None else cache_root() / "data"
            self._entry_path, self._entry_for = root / f"corpus-{key[:24]}", self._require_tokenizer().fingerprint
        return self._entry_path

    def _check_summary(self, summary) -> None:  # noqa: ANN001
        if summary.documents["train" if self.val_split_fraction < 1.0 else "val"] == 0:
            (root, _), _ = self._roots()
            raise ValueError(
                f"No text in {root}: its records are all empty or not UTF-8 (text_key={self.text_key!r}); point the "
                "path at the corpus or set text_key"
            )
        if self.val_split_fraction > 0 and self._roots()[1] is None and summary.documents["val"] == 0:
            raise ValueError(
                f"val_split_fraction={self.val_split_fraction} held out no record of {self._roots()[0][0]} (too few "
                "records): raise it, name a val_path, or set it to 0 for no validation"
            )


def _entry_complete(entry: Path) -> bool:
    if not (entry / META).is_file():
        return False
    return all(split_complete(entry / s) for s in ("train", "val") if (entry / s).exists())


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _line_cut(path: Path, fraction: float) -> int:
    """Where a single text file's validation tail starts: the first line break after ``1 - fraction``."""
    data = path.read_bytes()
    target = int(len(data) * (1 - fraction))
    cut = data.find(b"\n", target) + 1
    if cut == 0 or not data[cut:].strip():
        cut = data.rfind(b"\n", 0, target) + 1
    if cut == 0 or not data[:cut].strip() or not data[cut:].strip():
        raise ValueError(
            f"Cannot hold out validation text from the single file {path}: it has no line break to split at. "
            "Pass a validation path, or add more files."
        )
    return cut  # UTF-8 never has b"\n" inside a multi-byte character, so both halves decode


def _capped_texts(parts: list[Part], text_key: str) -> Iterator[str]:
    """Documents for training a BPE, spread over the parts, up to ``_BPE_TEXT_CAP`` characters."""
    budget = _BPE_TEXT_CAP // max(len(parts), 1)
    for part in parts:
        seen = 0
        for _, text in read_documents(part, text_key, Skipped()):
            yield text
            seen += len(text)
            if seen >= budget:
                break


@dataclass
class Corpus(TokenCorpus):
    """Pretraining data of any common format: text, JSON lines, JSON, parquet (see the module docstring).

    Args:
        path: a file, a folder (searched with ``glob``), or a glob pattern (``data/*.jsonl.zst``).
        text_key: the field (JSON) or column (parquet) that holds each document.
        glob: pattern of the files to read inside a folder (default: every file but hidden ones).
        val_path: a file, folder or glob of validation data; None holds out ``val_split_fraction``.
        val_split_fraction: share held out for validation (0: no validation set; 1: all of it, for evaluation only).
        seed: shuffle seed of the training stream (the order also changes every epoch).
        num_workers: dataloader worker processes (0 = load in the main process).
        num_proc: preparation processes (None: every core this process may use).
        verify: how files are identified in the cache key: "fast" (size, mtime, sampled digest) or "full"
            (SHA-256 of every byte); see ``litliger/data/identity.py``.
        cache_dir: where prepared data is cached; default ``<cache root>/data``.
        reset: on resume, ignore the checkpoint's data position and start this data from its beginning.
        document_mask: batches carry document ids from the EOS that ends every document: no attention across
            documents, positions restart at each (litliger/model/documents.py). Off by default.
    """

    path: str | Path
    text_key: str = "text"
    glob: str | None = None
    val_path: str | Path | None = None
    val_split_fraction: float = 0.05
    seed: int = 42
    num_workers: int = 0
    num_proc: int | None = None
    verify: str = "fast"
    cache_dir: Path | None = None
    reset: bool = False
    document_mask: bool = False

    def __post_init__(self) -> None:
        self._check()

    def _roots(self) -> tuple[tuple[str, str], tuple[str, str] | None]:
        val = (str(self.val_path), "val_path") if self.val_path is not None else None
        return (str(self.path), "path"), val

    def _glob(self) -> str | None:
        return self.glob


def corpus_meta(entry: Path) -> dict:
    """The ``litliger.json`` of a prepared entry or output folder."""
    return json.loads((entry / META).read_text())
