"""Any folder of text files -> tokenized, EOS-separated token blocks in a hash-keyed litdata cache.

Each file is a document: its ids followed by the tokenizer's EOS id (and preceded by BOS when the
tokenizer's `add_bos` is set, as for Llama tokenizers). Documents are concatenated and cut into samples
of `max_seq_length + 1` tokens (inputs are `b[:, :-1]`, targets `b[:, 1:]`); litdata's TokensLoader
reads the blocks straight from the chunk files. Tokens are stored as uint16 when the vocabulary has at
most 65,536 ids and as int32 otherwise, and come out of the loaders as int64.

A split's cache entry is named by a hash of the format version, the sample length, the tokenizer, the
relative names and contents of its documents and the writer layout, so any change to those prepares a
new entry and an unchanged corpus is never tokenized twice.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from litdata import StreamingDataLoader, StreamingDataset, optimize
from litdata.streaming.item_loader import TokensLoader

from litliger.data.base import DataModule, ResumableLoader, collate_tokens
from litliger.data.cache import bytes_digest, cache_root, json_digest, publish_dir
from litliger.data.tokenizer import Tokenizer, decode_utf8

FORMAT_VERSION = 1
_BLOCKS_PER_CHUNK = 1024  # samples per chunk file: enough chunks to shuffle well, few enough to stay cheap
_MAX_WRITERS = 2  # litdata.optimize processes; tokenizing is CPU-bound and the machines we target are small
_ONE_WRITER_BELOW = 1 << 20  # bytes; below this a second process costs more than it saves
_NEVER_EVICT = 1 << 50  # litdata may delete chunks it thinks are a download cache; ours are the data itself
_META = "litliger.json"


@dataclass(frozen=True)
class Document:
    """One document: a file, or a byte range of one (a single-file corpus's train/val parts)."""

    path: Path
    name: str  # path relative to the corpus root: part of the cache key, so moving the corpus keeps the cache
    digest: str  # SHA-256 of the document's bytes
    size: int
    start: int = 0
    end: int | None = None

    def read(self) -> str:
        """The document's text, checked against the digest its cache key was made from."""
        with open(self.path, "rb") as f:
            f.seek(self.start)
            data = f.read(-1 if self.end is None else self.end - self.start)
        if bytes_digest(data) != self.digest:
            raise RuntimeError(f"{self.path} changed while it was being prepared; run again.")
        return data.decode("utf-8")


@dataclass
class TextFiles(DataModule):
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
        cache_dir: where prepared data is cached; default `<cache root>/data`, the root being
            `$LITLIGER_CACHE` or `~/.cache/litliger`.
    """

    train_data_path: Path
    val_data_path: Path | None = None
    val_split_fraction: float = 0.05
    glob: str = "**/*.txt"
    seed: int = 42
    num_workers: int = 0
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        self._documents: dict[str, list[Document]] | None = None
        self.train_data_path = Path(self.train_data_path).expanduser()
        if self.val_data_path is not None:
            self.val_data_path = Path(self.val_data_path).expanduser()
        if not 0.0 <= self.val_split_fraction < 1.0:
            raise ValueError(f"val_split_fraction must be in [0, 1), got {self.val_split_fraction}.")

    # ---------------------------------------------------------------- DataModule

    def training_files(self) -> list[Path]:
        return list(dict.fromkeys(doc.path for doc in self.documents()["train"]))

    def prepare_data(self) -> None:
        self._require_tokenizer()
        for split, docs in self.documents().items():
            if docs:
                self._prepare(split, docs)

    def setup(self) -> None:
        for split, docs in self.documents().items():
            if docs and not _is_complete(self._entry(split, docs)):
                raise FileNotFoundError(
                    f"The {split} data of {self.train_data_path} is not prepared for this tokenizer and "
                    f"max_seq_length={self.max_seq_length}: call prepare_data() (on rank 0) before setup()."
                )

    def train_dataloader(self) -> ResumableLoader:
        # A new dataset per loader: a resumed loader must not inherit the iteration state of an earlier one.
        entry = self._entry("train", self.documents()["train"])
        dataset = self._dataset(entry, shuffle=True)
        loader = ResumableLoader(dataset, self.batch_size, self.num_workers, fingerprint=entry.name)
        if len(loader) == 0:
            raise ValueError(
                f"The training data ({_read_meta(entry)['samples']} samples of {self.max_seq_length + 1} tokens) "
                f"gives no full batch of {self.batch_size} per rank and worker: add text, or lower batch_size, "
                "max_seq_length or num_workers."
            )
        return loader

    def val_dataloader(self) -> StreamingDataLoader | None:
        docs = self.documents()["val"]
        if not docs:
            return None
        dataset = self._dataset(self._entry("val", docs), shuffle=False)
        loader = StreamingDataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_tokens
        )
        if len(loader) == 0:  # only possible with several ranks, where litdata drops the incomplete batches
            raise ValueError(
                f"The validation data gives no full batch of {self.batch_size} per rank: add validation text or "
                "lower batch_size or max_seq_length."
            )
        return loader

    # ---------------------------------------------------------------- corpus

    def documents(self) -> dict[str, list[Document]]:
        """The train and val documents (scanned once: valid UTF-8, non-empty, hashed)."""
        if self._documents is None:
            train = _scan(self._files(self.train_data_path, "train_data_path"), self.train_data_path, self.glob)
            if self.val_data_path is not None:
                val = _scan(self._files(self.val_data_path, "val_data_path"), self.val_data_path, self.glob)
            elif self.val_split_fraction == 0:
                val = []
            elif len(train) == 1:
                train, val = _split_lines(train[0], self.val_split_fraction)
            else:
                train, val = _split_files(train, self.val_split_fraction)
            self._documents = {"train": train, "val": val}
        return self._documents

    def _files(self, root: Path, what: str) -> list[Path]:
        """The files of a corpus root, sorted by relative path; errors say what is wrong and what to do."""
        if not root.exists():
            raise FileNotFoundError(
                f"{type(self).__name__}.{what}: {root} does not exist; point it at a folder of text files."
            )
        if root.is_file():
            return [root]
        files = self._list_files(root)
        if not files:
            raise ValueError(
                f"No files matching '{self.glob}' in {root}: add text files there or set glob (e.g. '**/*.md')."
            )
        return files

    def _list_files(self, root: Path) -> list[Path]:
        """The corpus files under `root`, sorted by relative path (subclasses may filter or cap them)."""
        return sorted((p for p in root.glob(self.glob) if p.is_file()), key=lambda p: p.relative_to(root).as_posix())

    # ---------------------------------------------------------------- cache

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__}.connect(tokenizer, batch_size, max_seq_length) was not called.")
        return self.tokenizer

    def _entry(self, split: str, docs: list[Document]) -> Path:
        key = json_digest(
            {
                "format": FORMAT_VERSION,
                "block_size": self.max_seq_length + 1,
                "tokenizer": self._require_tokenizer().fingerprint,
                "documents": [[d.name, d.start, d.end, d.digest] for d in docs],
                "writers": _writers(docs),
                "chunk_tokens": self._chunk_tokens(),
            }
        )
        root = self.cache_dir if self.cache_dir is not None else cache_root() / "data"
        return Path(root).expanduser() / f"{split}-{key[:24]}"

    def _chunk_tokens(self) -> int:
        return (self.max_seq_length + 1) * _BLOCKS_PER_CHUNK

    def _prepare(self, split: str, docs: list[Document]) -> None:
        entry = self._entry(split, docs)
        if _is_complete(entry):
            return
        if entry.exists():  # published once, but chunk files have gone missing since: rebuild it
            shutil.rmtree(entry)
        tokenizer = self._require_tokenizer()
        start = time.perf_counter()
        dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        writers = _writers(docs)
        with publish_dir(entry) as tmp:
            fn = _TokenizeShard(tokenizer, docs, _shards(docs, writers), dtype)
            _optimize(fn, writers, tmp, self._chunk_tokens())
            chunks = json.loads((tmp / "index.json").read_text())["chunks"]
            block = self.max_seq_length + 1
            meta = {
                "format": FORMAT_VERSION,
                "files": len({d.path for d in docs}),
                "documents": len(docs),
                "bytes": sum(d.size for d in docs),
                "tokens": sum(c["dim"] for c in chunks),
                "samples": sum(c["dim"] // block for c in chunks),
                "block_size": block,
                "dtype": np.dtype(dtype).name,
                "seconds": round(time.perf_counter() - start, 2),
            }
            if meta["samples"] == 0:
                where = self.val_data_path if split == "val" and self.val_data_path else self.train_data_path
                raise ValueError(
                    f"The {split} text of {where} ({meta['tokens']} tokens) is shorter than one sample of "
                    f"max_seq_length + 1 = {block} tokens: add text or lower max_seq_length."
                )
            (tmp / _META).write_text(json.dumps(meta, indent=2) + "\n")
        print(
            f"litliger.data: {split}: {meta['files']} files, {meta['bytes'] / 1e6:.1f} MB -> {meta['tokens']:,} "
            f"tokens ({meta['samples']:,} samples) in {meta['seconds']} s, cached in {entry}",
            file=sys.stderr,
        )

    def _dataset(self, entry: Path, shuffle: bool) -> StreamingDataset:
        return StreamingDataset(
            input_dir=str(entry),
            item_loader=TokensLoader(block_size=self.max_seq_length + 1),
            shuffle=shuffle,
            # Training: every rank and worker gets the same number of full batches (litdata forces this
            # under torch.distributed anyway). Validation on one rank keeps every sample.
            drop_last=True if shuffle else None,
            seed=self.seed,
            item_shuffle_window=0,  # a full permutation inside each chunk, independent of LITDATA_* env settings
            max_cache_size=_NEVER_EVICT,
        )


class _TokenizeShard:
    """The `litdata.optimize` function: shard index -> token arrays of its documents, each ending with EOS."""

    def __init__(self, tokenizer: Tokenizer, docs: list[Document], shards: list[range], dtype: type) -> None:
        self.tokenizer = tokenizer
        self.docs = docs
        self.shards = shards
        self.dtype = dtype

    def __call__(self, shard: int) -> Iterator[np.ndarray]:
        for i in self.shards[shard]:
            (ids,) = self.tokenizer.encode_batch([self.docs[i].read()], eos=True)
            yield np.asarray(ids, dtype=self.dtype)


def _optimize(fn: _TokenizeShard, writers: int, out_dir: Path, chunk_tokens: int) -> None:
    """Run `litdata.optimize` over `writers` shards without leaking its process-wide side effects."""
    # fork starts a worker in ~0.1 s where spawn re-imports torch (~5 s on 2 cores); macOS and Windows use spawn.
    method = "fork" if sys.platform == "linux" else "spawn"
    work = Path(tempfile.mkdtemp(prefix="litliger-optimize-"))
    env = {
        # litdata's scratch folders default to a shared /tmp/chunks that every optimize() call rmtree's.
        "DATA_OPTIMIZER_CACHE_FOLDER": str(work / "chunks"),
        "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(work / "data"),
        # Forked children must not use the parent's Rust thread pool (and say so on stderr).
        "TOKENIZERS_PARALLELISM": "false",
    }
    previous_method = multiprocessing.get_start_method(allow_none=True)
    try:
        with _environ(env), _signals_wait():
            optimize(
                fn=fn,
                inputs=list(range(writers)),
                output_dir=str(out_dir),
                chunk_size=chunk_tokens,
                item_loader=TokensLoader(),
                num_workers=writers,
                keep_data_ordered=True,  # each writer takes a fixed shard: the layout is a function of the key
                reorder_files=False,
                start_method=method,
                verbose=False,
            )
    finally:
        multiprocessing.set_start_method(previous_method, force=True)  # optimize() sets it globally
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _signals_wait() -> Iterator[None]:
    """SIGTERM and SIGINT wait until ``optimize()`` returns, then are raised again for the run's handler.

    Interrupted mid-way, ``optimize()`` leaves its worker processes waiting forever for a stop message (the
    process then never exits, and they keep the run's out_dir lock), and litdata's own SIGINT handler
    calls ``os._exit(0)``, which skips every clean-up. Its workers inherit the waiting handler, so a Ctrl-C
    sent to the whole process group lets them finish too; tokenizing is bounded work.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from litdata.processing import data_processor

    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: received.append(signum)) for s in _STOP_SIGNALS}
    # litdata's one use of the signal module is installing that handler: give it a module that ignores it
    original, data_processor.signal = data_processor.signal, SimpleNamespace(signal=lambda *_: None, SIGINT=0)
    try:
        yield
    finally:
        data_processor.signal = original
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            signal.raise_signal(received[0])


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _writers(docs: list[Document]) -> int:
    if sum(d.size for d in docs) < _ONE_WRITER_BELOW:
        return 1
    return max(1, min(_MAX_WRITERS, os.cpu_count() or 1, len(docs)))


def _shards(docs: list[Document], n: int) -> list[range]:
    """Cut the documents, in order, into `n` contiguous non-empty ranges of about equal bytes."""
    total = sum(d.size for d in docs)
    bounds, seen = [0], 0
    for i, doc in enumerate(docs):
        seen += doc.size
        if len(bounds) < n and seen >= total * len(bounds) / n and len(docs) - (i + 1) >= n - len(bounds):
            bounds.append(i + 1)
    while len(bounds) < n:  # only when a few huge documents end the list
        bounds.append(bounds[-1] + 1)
    bounds.append(len(docs))
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _is_complete(entry: Path) -> bool:
    """Published, and no chunk file has gone missing since (a complete entry is renamed into place last)."""
    if not (entry / _META).is_file() or not (entry / "index.json").is_file():
        return False
    chunks = json.loads((entry / "index.json").read_text())["chunks"]
    return all((entry / c["filename"]).is_file() for c in chunks)


def _read_meta(entry: Path) -> dict:
    return json.loads((entry / _META).read_text())


def _scan(files: list[Path], root: Path, glob: str) -> list[Document]:
    """Documents of the files that hold UTF-8 text; the rest are skipped with one warning."""
    docs, undecodable = [], []
    for f in files:
        data = f.read_bytes()
        text = decode_utf8(data)
        if text is None:
            undecodable.append(f)
        if not text or not text.strip():  # empty files (e.g. bare __init__.py) are no documents
            continue
        name = f.name if root.is_file() else f.relative_to(root).as_posix()
        docs.append(Document(path=f, name=name, digest=bytes_digest(data), size=len(data)))
    if not docs:
        raise ValueError(
            f"No text in {root}: the {len(files)} files matching '{glob}' are all empty or not UTF-8. "
            "Point the path at UTF-8 text files or change glob."
        )
    if undecodable:
        warnings.warn(
            f"Skipped {len(undecodable)} of {len(files)} files in {root} that are not UTF-8, e.g. {undecodable[0]}.",
            stacklevel=3,
        )
    return docs


def _split_files(docs: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """Hold out `fraction` of the documents (at least one), ranked by a hash of their names."""
    n_val = min(max(1, round(fraction * len(docs))), len(docs) - 1)
    held_out = set(sorted(docs, key=lambda d: bytes_digest(d.name.encode()))[:n_val])
    return [d for d in docs if d not in held_out], [d for d in docs if d in held_out]


def _split_lines(doc: Document, fraction: float) -> tuple[list[Document], list[Document]]:
    """Split a single document at the first line break after `1 - fraction` of its bytes."""
    with open(doc.path, "rb") as f:
        data = f.read()
    target = int(len(data) * (1 - fraction))
    cut = data.find(b"\n", target) + 1
    if cut == 0 or not data[cut:].strip():
        cut = data.rfind(b"\n", 0, target) + 1
    train, val = data[:cut], data[cut:]
    if cut == 0 or not train.strip() or not val.strip():
        raise ValueError(
            f"Cannot hold out validation text from the single file {doc.path}: it has no line break to split "
            "at. Pass val_data_path, or add more files."
        )
    # UTF-8 never has b"\n" inside a multi-byte character, so both halves decode.
    return (
        [Document(doc.path, doc.name, bytes_digest(train), len(train), 0, cut)],
        [Document(doc.path, doc.name, bytes_digest(val), len(val), cut, len(data))],
    )
