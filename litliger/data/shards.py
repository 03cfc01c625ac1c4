"""Tokenizing a corpus into token shards, on every core: the one writer behind every prepared dataset.

Output. A split is a folder of chunk files plus ``index.json`` in litdata's format for ``TokensLoader``
(what LitGPT's preparation scripts write with ``litdata.optimize``), so litdata's ``StreamingDataset``
streams it, locally or from object storage. A chunk file is ``[1, 12, 12 + nbytes]`` (uint32: one item, its
byte offsets) followed by the token ids (uint16 when the vocabulary has at most 65,536 ids, else int32).
The shards are one token stream, documents each followed by EOS (after BOS when the tokenizer adds one),
independent of the training sequence length: the block size is chosen when training, and a block never
spans two chunks (at most ``block - 1`` tokens per chunk go unused).

Work. The parts of the corpus (``records.Part``) are grouped in order into units of about ``target``
bytes; a unit is tokenized by one process into its own chunk files (``chunk-<unit>-<k>.bin``), and the
index lists the units' chunks in unit order. The layout is therefore a function of the corpus and the
tokenizer alone, never of how many processes or machines prepared it. Several machines each take the
units ``i % num_nodes == node_rank`` and write a part file; whichever finishes last writes the index.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from litliger.data.identity import stat_key
from litliger.data.records import Part, Skipped, read_documents
from litliger.data.tokenizer import Tokenizer

SHARDS_FORMAT = 2
CHUNK_TOKENS = 1 << 21  # 4 MiB of uint16 ids per chunk: small downloads, few files
META = "litliger.json"
SPLITS = ("train", "val")
_BATCH_DOCS, _BATCH_CHARS = 512, 1 << 21  # documents handed to encode_batch at once


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32 (loaders return int64 either way)."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


def unit_target(total_bytes: int) -> int:
    """Bytes per unit: about 64 units for a small corpus (so all cores share it), 1-16 MiB each."""
    return int(min(max(total_bytes // 64, 1 << 20), 1 << 24))


class ChunkWriter:
    """Appends token ids and writes them as chunk files of ``chunk_tokens`` ids (the last one shorter)."""

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, chunk_tokens: int) -> None:
        self.folder, self.prefix, self.dtype, self.chunk_tokens = folder, prefix, dtype, chunk_tokens
        self.pending: list[np.ndarray] = []
        self.count = 0
        self.chunks: list[dict[str, Any]] = []

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.count += len(ids)
        while self.count >= self.chunk_tokens:
            data = np.concatenate(self.pending)
            self._write(data[: self.chunk_tokens])
            rest = data[self.chunk_tokens :]
            self.pending, self.count = [rest], len(rest)

    def close(self) -> list[dict[str, Any]]:
        if self.count:
            self._write(np.concatenate(self.pending))
        self.pending, self.count = [], 0
        return self.chunks

    def _write(self, data: np.ndarray) -> None:
        name = f"{self.prefix}-{len(self.chunks):05d}.bin"
        header = np.array([1, 12, 12 + data.nbytes], dtype=np.uint32)
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / name, "wb") as f:
            f.write(header.tobytes())
            f.write(data.astype(self.dtype, copy=False).tobytes())
        self.chunks.append({"chunk_bytes": 12 + data.nbytes, "chunk_size": 1, "dim": int(len(data)), "filename": name})


def write_index(folder: Path, chunks: list[dict[str, Any]], dtype: np.dtype, chunk_tokens: int, stamp: str) -> None:
    """litdata's ``index.json`` for ``chunks`` (written last and atomically: its presence means complete)."""
    from litdata.constants import _NUMPY_DTYPES_MAPPING

    dtype_index = next(i for i, d in _NUMPY_DTYPES_MAPPING.items() if d == dtype)
    index = {
        "chunks": chunks,
        "config": {
            "chunk_bytes": None,
            "chunk_size": chunk_tokens,
            "compression": None,
            "data_format": [f"no_header_numpy:{dtype_index}"],
            "data_spec": '[1, {"type": null, "context": null, "children_spec": []}]',
            "encryption": None,
            "item_loader": "TokensLoader",
        },
        "updated_at": stamp,  # litdata names a remote dataset's local cache by it: a content key
    }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "index.json.tmp"
    tmp.write_text(json.dumps(index, sort_keys=True) + "\n")
    os.replace(tmp, folder / "index.json")


def is_val_record(name: str, locator: int, fraction: float) -> bool:
    """The record-level hold-out rule: a hash of the file's relative name and the record's place in it."""
    digest = hashlib.blake2b(f"{name}\0{locator}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2.0**64


@dataclass(frozen=True)
class Unit:
    index: int
    parts: tuple[Part, ...]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


def plan_units(parts: list[Part], target: int) -> list[Unit]:
    """Group the parts, in order, into units of about ``target`` bytes (a bigger part is a unit alone)."""
    units: list[Unit] = []
    group: list[Part] = []
    for part in parts:
        if group and sum(p.size for p in group) + part.size > target:
            units.append(Unit(len(units), tuple(group)))
            group = []
        group.append(part)
    if group:
        units.append(Unit(len(units), tuple(group)))
    return units


@dataclass
class UnitResult:
    index: int
    chunks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    documents: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    skipped: Skipped = field(default_factory=Skipped)


@dataclass
class _Context:
    """What every worker needs: set once per process (fork or spawn), not sent with every unit."""

    units: list[Unit]
    tokenizer: Tokenizer
    text_key: str
    fraction: float  # the record-level hold-out share
    out_dir: Path
    dtype: np.dtype
    chunk_tokens: int
    stats: dict[str, tuple[int, int]]  # path -> (size, mtime_ns) when the corpus was listed


_CTX: _Context | None = None


def _init_worker(ctx: _Context) -> None:
    global _CTX
    _CTX = ctx
    # The parent stops the pool on a signal (terminate): die at once then, and leave Ctrl-C to the parent.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def tokenize_unit(index: int) -> UnitResult:
    """Tokenize one unit into its chunk files (runs in a worker process, or in the caller's)."""
    ctx = _CTX
    assert ctx is not None
    unit = ctx.units[index]
    result = UnitResult(index)
    writers = {s: ChunkWriter(ctx.out_dir / s, f"chunk-{index:06d}", ctx.dtype, ctx.chunk_tokens) for s in SPLITS}
    batches: dict[str, list[str]] = {s: [] for s in SPLITS}

    def flush(split: str) -> None:
        texts = batches[split]
        if not texts:
            return
        ids = ctx.tokenizer.encode_batch(texts, eos=True)
        total = sum(map(len, ids))
        writers[split].add(np.fromiter(itertools.chain.from_iterable(ids), dtype=ctx.dtype, count=total))
        result.tokens[split] = result.tokens.get(split, 0) + total
        result.documents[split] = result.documents.get(split, 0) + len(texts)
        batches[split] = []

    for part in unit.parts:
        chars: dict[str, int] = dict.fromkeys(SPLITS, 0)
        for locator, text in read_documents(part, ctx.text_key, result.skipped):
            split = part.split
            if split == "records":
                split = "val" if is_val_record(part.name, locator, ctx.fraction) else "train"
            batches[split].append(text)
            chars[split] += len(text)
            if len(batches[split]) >= _BATCH_DOCS or chars[split] >= _BATCH_CHARS:
                flush(split)
                chars[split] = 0
        if stat_key(part.path) != ctx.stats[str(part.path)]:
            raise RuntimeError(
                f"{part.path} changed while it was being prepared (its size or modification time differ); "
                "prepare again once the file no longer changes"
            )
        result.bytes += part.size
    for split in SPLITS:
        flush(split)
        result.chunks[split] = writers[split].close()
    return result


def run_units(
    units: list[Unit],
    *,
    tokenizer: Tokenizer,
    text_key: str,
    fraction: float,
    out_dir: Path,
    num_proc: int,
    chunk_tokens: int | None = None,
    mine: Callable[[int], bool] = lambda i: True,
    progress: bool = True,
    label: str = "prepare",
) -> list[UnitResult]:
    """Tokenize the units that ``mine`` selects into ``out_dir/{train,val}``, ``num_proc`` at a time.

    A signal or an error stops the worker processes at once (the caller removes what they wrote). Prints a
    progress bar (MB/s, tokens/s) on stderr when ``progress``.
    """
    from tqdm import tqdm

    todo = [u.index for u in units if mine(u.index)]
    paths = {str(p.path) for u in units for p in u.parts}
    chunk_tokens = chunk_tokens or CHUNK_TOKENS
    ctx = _Context(
        units, tokenizer, text_key, fraction, out_dir, token_dtype(tokenizer.vocab_size), chunk_tokens,
        {p: stat_key(Path(p)) for p in paths},
    )  # fmt: skip
    total = sum(units[i].size for i in todo)
    results: list[UnitResult] = []
    start = time.perf_counter()
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=not progress, file=sys.stderr, mininterval=1)

    def done(result: UnitResult) -> None:
        results.append(result)
        bar.update(units[result.index].size)
        seconds = max(time.perf_counter() - start, 1e-9)
        tokens = sum(sum(r.tokens.values()) for r in results)
        bar.set_postfix_str(f"{tokens / seconds / 1e3:,.0f}k tok/s", refresh=False)

    try:
        with _one_thread_per_process():
            if num_proc <= 1:  # in this process, on one core
                global _CTX
                previous, _CTX = _CTX, ctx
                try:
                    for i in todo:
                        done(tokenize_unit(i))
                finally:
                    _CTX = previous
            elif todo:
                _run_pool(ctx, todo, min(num_proc, len(todo)), done)
    finally:
        bar.close()
    return sorted(results, key=lambda r: r.index)


@contextmanager
def _one_thread_per_process() -> Iterator[None]:
    """``tokenizers`` uses one thread per call (it reads the variable at every call): one core per process,
    and forked workers never touch the parent's Rust thread pool."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _run_pool(ctx: _Context, todo: list[int], processes: int, done: Callable[[UnitResult], None]) -> None:
    # fork starts a worker in ~0.1 s where spawn re-imports torch (~5 s); macOS and Windows use spawn.
    method = "fork" if sys.platform == "linux" else "spawn"
    pool = multiprocessing.get_context(method).Pool(processes, initializer=_init_worker, initargs=(ctx,))
    try:
        for result in pool.imap_unordered(tokenize_unit, todo, chunksize=1):
            done(result)
        pool.close()
    except BaseException:
        pool.terminate()  # a signal (RunInterrupted) or an error: stop every worker now
        raise
    finally:
        pool.join()


@dataclass
class Summary:
    """What a preparation produced, per split, and what it skipped."""

    documents: dict[str, int]
    tokens: dict[str, int]
    bytes: int
    seconds: float
    skipped: Skipped
    units: int

    def line(self) -> str:
        parts = [f"{self.documents.get(s, 0):,} documents, {self.tokens.get(s, 0):,} tokens {s}" for s in SPLITS]
        text = f"{self.bytes / 1e6:,.1f} MB -> {'; '.join(parts)}"
        if self.seconds > 0:
            rate = sum(self.tokens.values()) / self.seconds
            text += (
                f" in {self.seconds:.1f} s ({self.bytes / 1e6 / self.seconds:,.1f} MB/s, {rate / 1e3:,.0f}k tokens/s)"
            )
        if self.skipped.not_utf8:
            text += f"; skipped {self.skipped.not_utf8} records that are not UTF-8 (first: {self.skipped.first})"
        return text


def summarize(results: list[UnitResult], seconds: float) -> Summary:
    skipped = Skipped()
    for r in results:
        skipped.add(r.skipped)
    return Summary(
        documents={s: sum(r.documents.get(s, 0) for r in results) for s in SPLITS},
        tokens={s: sum(r.tokens.get(s, 0) for r in results) for s in SPLITS},
        bytes=sum(r.bytes for r in results),
        seconds=round(seconds, 2),
        skipped=skipped,
        units=len(results),
    )


def finish(
    out_dir: Path, results: list[UnitResult], *, dtype: np.dtype, chunk_tokens: int, key: str, meta: dict
) -> dict:
    """Write each split's index (units in order) and ``litliger.json``; returns the metadata written."""
    results = sorted(results, key=lambda r: r.index)
    for split in SPLITS:
        chunks = [c for r in results for c in r.chunks.get(split, [])]
        if chunks:
            write_index(out_dir / split, chunks, dtype, chunk_tokens, key[:16])
    text = json.dumps({"format": SHARDS_FORMAT, "key": key, "dtype": dtype.name, **meta}, indent=2, default=_jsonable)
    (out_dir / META).write_text(text + "\n")
    return json.loads(text)


def _jsonable(value: object) -> object:
    if isinstance(value, Skipped):
        return asdict(value)
    return str(value)


def results_to_json(results: list[UnitResult]) -> list[dict]:
    return [{**asdict(r), "skipped": asdict(r.skipped)} for r in results]


def results_from_json(items: list[dict]) -> list[UnitResult]:
    return [UnitResult(**{**d, "skipped": Skipped(**d["skipped"])}) for d in items]


def split_complete(folder: Path) -> bool:
    """Whether a prepared split folder has its index and every chunk file the index lists."""
    index = folder / "index.json"
    if not index.is_file():
        return False
    chunks = json.loads(index.read_text())["chunks"]
    return all((folder / c["filename"]).is_file() for c in chunks)


def split_tokens(folder: Path) -> list[int]:
    """Tokens per chunk of a prepared split (litdata index, ours or LitGPT's)."""
    return [c["dim"] for c in json.loads((folder / "index.json").read_text())["chunks"]]
