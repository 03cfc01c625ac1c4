"""Corpus file formats: which format a file is, how it is cut into parts, and the documents a part holds.

A file's format comes from its name. Text files (``.txt``, ``.md``, ``.py``, ... ``TEXT_SUFFIXES``) are one
document each. ``.jsonl`` and ``.json`` hold one record per line, or (``.json`` only) one JSON array of
records; ``.parquet`` holds a column of documents. JSON and text files may be compressed (``.gz``,
``.zst``). Each record is one document: its ``text_key`` field (or column).

Parts. A part is a piece of one file that a process reads on its own, so that one big file keeps every
core busy: a byte range of an uncompressed JSON-lines file (a line belongs to the part in which it
starts), a range of row groups of a parquet file, or a whole file. A compressed stream cannot be entered
in the middle (gzip members and zstd frames carry no index to seek to), and a JSON array has no line
structure to cut at, so each of those is one part: many such files (as corpora ship them) still spread
over all cores. Reading never holds more than one record (JSON) or one row-group batch (parquet).

Records that are not UTF-8 (or hold unpaired surrogate escapes) are skipped and counted, as non-UTF-8
text files are: web crawls carry a few, and one bad record should not stop a 1 TB preparation. The count
is reported in the summary. A record without ``text_key``, or whose value is not a string, is an error.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

TEXT_SUFFIXES = frozenset(
    {
        *(".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".html", ".htm", ".xml", ".csv", ".tsv"),
        *(".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".cu", ".java", ".js", ".jsx", ".ts", ".tsx"),
        *(".go", ".rs", ".rb", ".php", ".sh", ".bash", ".sql", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".css"),
        *(".scss", ".swift", ".kt", ".scala", ".lua", ".r", ".jl", ".hs", ".ml", ".pl", ".m", ".f90", ".cs"),
        *(".dart", ".vue", ".svelte", ".ipynb"),
    }
)
COMPRESSIONS = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}
RECORD_SUFFIXES = (".jsonl", ".json", ".ndjson")
_JSON_BLOCK = 1 << 20  # bytes read at a time from a JSON array


class FormatError(ValueError):
    """A file that cannot be read as the format its name says (one line: what, where, what to do)."""


@dataclass(frozen=True)
class FileFormat:
    kind: str  # "text" | "jsonl" | "json" | "parquet"
    compression: str | None = None  # None | "gz" | "zst"


def format_of(path: Path, text_only: bool = False) -> FileFormat:
    """The format of ``path`` from its name; ``text_only`` reads every file as one text document (TextFiles)."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if text_only:
        return FileFormat("text", compression)
    if last == ".parquet" and compression is None:
        return FileFormat("parquet")
    if last in RECORD_SUFFIXES:
        return FileFormat("jsonl" if last != ".json" else "json", compression)
    if last in TEXT_SUFFIXES:
        return FileFormat("text", compression)
    known = "text (.txt, .md, .py, ...), .jsonl, .json (each optionally .gz or .zst) and .parquet"
    raise FormatError(
        f"unknown file type {''.join(path.suffixes) or '(no extension)'!r}, in {path}; litliger reads {known}: "
        "rename the file, or set glob to leave it out"
    )


@dataclass(frozen=True)
class Part:
    """A piece of one file that one process reads: bytes [start, end) of a JSON-lines file, row groups
    [start, end) of a parquet file, or (end None) the whole file. ``split`` routes its documents: "train",
    "val", or "records" (each record by a hash of its place in the file; see ``Corpus``)."""

    path: Path
    name: str  # relative to the corpus root: in the cache key and in messages
    fmt: FileFormat
    start: int = 0
    end: int | None = None
    split: str = "train"
    size: int = field(default=0, compare=False)  # bytes of the file this part reads (progress and balance)


@dataclass
class Skipped:
    """Documents left out while reading, by reason."""

    not_utf8: int = 0
    empty: int = 0
    first: str = ""  # where the first non-UTF-8 record was

    def add(self, other: Skipped) -> None:
        self.not_utf8 += other.not_utf8
        self.empty += other.empty
        self.first = self.first or other.first


def read_documents(part: Part, text_key: str, skipped: Skipped) -> Iterator[tuple[int, str]]:
    """(locator, text) of every non-empty document of ``part``: the locator is the document's place in its
    file (a byte offset, a row number, a record number), stable however the file is cut into parts."""
    try:
        if part.fmt.kind == "text":
            yield from _text(part, skipped)
        elif part.fmt.kind == "parquet":
            yield from _parquet(part, text_key, skipped)
        elif part.fmt.compression is None and part.end is not None:
            yield from _jsonl_range(part, text_key, skipped)
        else:
            with _open(part) as f:
                yield from _json_stream(part, f, text_key, skipped)
    except Exception as e:
        stream_error = isinstance(e, EOFError | zlib.error | gzip.BadGzipFile) or _is_zstd_error(e)
        if part.fmt.compression and (stream_error or isinstance(e, OSError) and "gzip" in str(e).lower()):
            kind = "zstd" if part.fmt.compression == "zst" else "gzip"
            raise FormatError(
                f"corrupt or truncated {kind} stream ({one_line(e)}), in {part.path}; re-download or remove the file"
            ) from e
        raise


def one_line(e: BaseException) -> str:
    """An exception's message on one line (pyarrow's end with line breaks)."""
    return " ".join(str(e).split())


def _is_zstd_error(e: BaseException) -> bool:
    return type(e).__module__.startswith("zstandard") or "zstd" in str(e).lower()


def _open(part: Part) -> IO[bytes]:
    if part.fmt.compression == "gz":
        return gzip.open(part.path, "rb")
    if part.fmt.compression == "zst":
        return io.BufferedReader(_ZstdStream(part.path), buffer_size=1 << 20)
    return open(part.path, "rb")  # noqa: SIM115 (the caller's with-block closes it)


class _ZstdStream(io.RawIOBase):
    """A zstd file decompressed frame after frame; a stream cut short (a truncated download) is an error,
    where ``zstandard``'s own stream reader would just end early."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self.file = open(path, "rb")  # noqa: SIM115 (closed by close())
        self.dctx, self.zstandard = zstandard.ZstdDecompressor(), zstandard
        self.dobj = self.dctx.decompressobj()
        self.pending, self.started = b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 (a writable buffer)
        while not self.pending:
            data = self.file.read(1 << 20)
            if not data:
                if self.started and not self.dobj.eof:
                    raise EOFError("the last zstd frame is cut short")
                return 0
            while data:
                if self.dobj.eof:  # the next frame of a multi-frame file
                    self.dobj = self.dctx.decompressobj()
                self.started = True
                self.pending += self.dobj.decompress(data)
                data = self.dobj.unused_data if self.dobj.eof else b""
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


def _decode(data: bytes, where: str, skipped: Skipped) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        skipped.not_utf8 += 1
        skipped.first = skipped.first or where
        return None
    return text


def _text(part: Part, skipped: Skipped) -> Iterator[tuple[int, str]]:
    with _open(part) as f:
        if part.end is not None:  # a byte range of a single-file text corpus
            f.seek(part.start)
            data = f.read(part.end - part.start)
        else:
            data = f.read()
    text = _decode(data, str(part.path), skipped)
    if text is None:
        return
    if not text.strip():
        skipped.empty += 1
        return
    yield part.start, text


def _record_text(record: object, text_key: str, where: str, skipped: Skipped) -> str | None:
    if not isinstance(record, dict):
        raise FormatError(
            f"a record is a JSON {type(record).__name__}, not an object, in {where}; give one object per record "
            f"with the document in {text_key!r}"
        )
    if text_key not in record:
        keys = ", ".join(map(repr, list(record)[:12])) or "none"
        raise FormatError(
            f"record without {text_key!r}, in {where} (its keys: {keys}); set text_key to the field that holds the "
            "document"
        )
    text = record[text_key]
    if text is None:
        skipped.empty += 1
        return None
    if not isinstance(text, str):
        raise FormatError(
            f"{text_key!r} is a {type(text).__name__}, not a string, in {where}; set text_key to a text field"
        )
    if not text.strip():
        skipped.empty += 1
        return None
    if "\ud800" <= max(text, default="") and _has_surrogates(text):
        skipped.not_utf8 += 1
        skipped.first = skipped.first or where
        return None
    return text


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parse_line(line: bytes, where: str, text_key: str, skipped: Skipped) -> str | None:
    if not line.strip():
        return None
    text = _decode(line, where, skipped)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"invalid JSON ({e.msg} at column {e.colno}), in {where}; fix or remove the record") from e
    return _record_text(record, text_key, where, skipped)


def line_number(path: Path, offset: int) -> int:
    """1-based line number of the byte at ``offset`` (counted only when a message needs it)."""
    count, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(1 << 20, offset - done))
            if not block:
                break
            count += block.count(b"\n")
            done += len(block)
    return count


def _jsonl_range(part: Part, text_key: str, skipped: Skipped) -> Iterator[tuple[int, str]]:
    """The lines that start in [start, end) of an uncompressed JSON-lines file."""
    with open(part.path, "rb", buffering=1 << 20) as f:
        if part.start > 0:
            f.seek(part.start - 1)
            f.readline()  # the line in progress at start belongs to the previous part
        pos = f.tell()
        while pos < part.end:
            line = f.readline()
            if not line:
                break
            try:
                text = _parse_line(line, f"{part.path}:<line>", text_key, skipped)
            except FormatError as e:
                raise FormatError(str(e).replace("<line>", str(line_number(part.path, pos)))) from None
            if "<line>" in skipped.first:  # the first skipped record: say where, once
                skipped.first = skipped.first.replace("<line>", str(line_number(part.path, pos)))
            if text is not None:
                yield pos, text
            pos += len(line)


def _json_stream(part: Part, f: IO[bytes], text_key: str, skipped: Skipped) -> Iterator[tuple[int, str]]:
    """A (possibly compressed) JSON-lines stream, or a JSON array when its first byte is ``[``."""
    first = f.peek(1)[:1] if hasattr(f, "peek") else b""
    while first in (b" ", b"\n", b"\r", b"\t"):
        f.read(1)
        first = f.peek(1)[:1]
    if part.fmt.kind == "json" and first == b"[":
        yield from _json_array(part, f, text_key, skipped)
        return
    for n, line in enumerate(f, start=1):
        text = _parse_line(line, f"{part.path}:{n}", text_key, skipped)
        if text is not None:
            yield n, text


def _json_array(part: Part, f: IO[bytes], text_key: str, skipped: Skipped) -> Iterator[tuple[int, str]]:
    """The records of a JSON array, decoded one at a time from a rolling buffer (never the whole file)."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    buffer, pos, done, n = "", 0, False, 0

    def refill() -> None:
        nonlocal buffer, pos, done
        raw = f.read(_JSON_BLOCK)
        done = not raw
        try:
            buffer = buffer[pos:] + utf8.decode(raw, final=done)
        except UnicodeDecodeError as e:
            raise FormatError(f"not UTF-8 ({e.reason}), in {part.path}; save the file as UTF-8") from e
        pos = 0

    refill()
    pos = buffer.index("[") + 1
    while True:
        while True:  # skip separators
            while pos < len(buffer) and buffer[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buffer) or done:
                break
            refill()
        if pos >= len(buffer):
            raise FormatError(f"the JSON array is not closed (no ']'), in {part.path}; the file is truncated")
        if buffer[pos] == "]":
            return
        while True:
            try:
                record, end = decoder.raw_decode(buffer, pos)
                break
            except json.JSONDecodeError as e:
                if done:
                    raise FormatError(f"invalid JSON in record {n} ({e.msg}), in {part.path}; fix the file") from e
                refill()
        text = _record_text(record, text_key, f"{part.path}[{n}]", skipped)
        if text is not None:
            yield n, text
        n, pos = n + 1, end


def _parquet(part: Part, text_key: str, skipped: Skipped) -> Iterator[tuple[int, str]]:
    import pyarrow as pa

    pf = open_parquet(part.path)
    if text_key not in pf.schema_arrow.names:
        columns = ", ".join(map(repr, pf.schema_arrow.names[:12]))
        raise FormatError(
            f"no column {text_key!r}, in {part.path} (its columns: {columns}); set text_key to one of them"
        )
    end = pf.num_row_groups if part.end is None else part.end
    row = sum(pf.metadata.row_group(g).num_rows for g in range(part.start))
    for group in range(part.start, end):
        try:
            for batch in pf.iter_batches(batch_size=4096, row_groups=[group], columns=[text_key]):
                for value in batch.column(0).to_pylist():
                    where = f"{part.path} row {row}"
                    row += 1
                    if isinstance(value, bytes):
                        value = _decode(value, where, skipped)
                        if value is None:
                            continue
                    if value is None or (isinstance(value, str) and not value.strip()):
                        skipped.empty += 1
                    elif not isinstance(value, str):
                        raise FormatError(
                            f"column {text_key!r} holds {type(value).__name__} values, not text, in {part.path}; "
                            "set text_key to a string column"
                        )
                    else:
                        yield row - 1, value
        except (pa.ArrowException, OSError) as e:
            raise FormatError(
                f"corrupt parquet data in row group {group} ({one_line(e)}), in {part.path}; re-download it"
            ) from e


def open_parquet(path: Path):  # noqa: ANN201 (pyarrow is imported lazily)
    """A ``pyarrow.parquet.ParquetFile``; a corrupt footer is one clear line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise FormatError(f"not a readable parquet file ({one_line(e)}), in {path}; re-download or remove it") from e


def is_json_array(path: Path, fmt: FileFormat) -> bool:
    """Whether a ``.json`` file holds one JSON array (read as a whole stream) rather than one record per line."""
    if fmt.kind != "json":
        return False
    with _open(Part(path, path.name, fmt)) as f:
        head = f.read(4096).lstrip()
    return head[:1] == b"["


def file_parts(path: Path, name: str, fmt: FileFormat, split: str, target: int) -> list[Part]:
    """``path`` cut into parts of about ``target`` bytes where the format allows it (module docstring)."""
    size = path.stat().st_size
    if fmt.kind == "parquet":
        pf = open_parquet(path)
        groups = [pf.metadata.row_group(g).total_byte_size for g in range(pf.num_row_groups)]
        parts, start, acc = [], 0, 0
        for g, nbytes in enumerate(groups):
            acc += nbytes
            if acc >= target or g == len(groups) - 1:
                share = size * acc // max(sum(groups), 1)
                parts.append(Part(path, name, fmt, start, g + 1, split, share))
                start, acc = g + 1, 0
        return parts or [Part(path, name, fmt, 0, 0, split, size)]
    seekable = fmt.compression is None and fmt.kind in ("jsonl", "json") and not is_json_array(path, fmt)
    if not seekable or size <= target:
        return [Part(path, name, fmt, 0, None if not seekable else size, split, size)]
    n = -(-size // target)
    bounds = [size * i // n for i in range(n + 1)]
    return [Part(path, name, fmt, a, b, split, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
