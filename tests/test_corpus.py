"""Corpus: every format gives the same token stream, parts, record-level hold-out, bad input, the cache key, memory."""

import gzip
import json
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zstandard

import litliger.data.corpus as corpus
import litliger.data.identity as identity
import litliger.data.records as records
import litliger.data.shards as shards
from litliger.data import Corpus, Tokenizer
from litliger.data.records import FormatError, Part, Skipped, file_parts, format_of, read_documents
from litliger.data.shards import split_tokens

VOCAB = [
    "alpha", "beta", "gamma", "delta", "épsilon", "zeta", "ēta", "θeta", "iota", "kappa", "lambda", "mu", "ünïcödé",
    "日本語", "emoji🙂", 'quote"d', "back\\slash", "tab\there", "line\nbreak", "crlf\r\nend", "{braces}", "[brackets],",
    "colon:",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))


def make_docs(n: int, seed: int = 0, words: tuple[int, int] = (5, 30), prefix: str = "doc") -> list[str]:
    """`n` distinct documents of random words: non-ASCII, JSON-special characters, line breaks (LF and CRLF)."""
    rng = random.Random(seed)
    return [f"{prefix} {i}: " + " ".join(rng.choices(VOCAB, k=rng.randint(*words))) for i in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = make_docs(200, seed=99)
    return Tokenizer.train_bpe([], 300, texts=lambda: iter(texts), identity="t", use_cache=False)


def jsonl_bytes(docs: list[str], key: str = "text") -> bytes:
    """One record per line, with another field; every other record keeps non-ASCII characters unescaped."""
    lines = [json.dumps({"id": i, key: d, "meta": {"n": i}}, ensure_ascii=i % 2 == 1) for i, d in enumerate(docs)]
    return "".join(line + "\n" for line in lines).encode()


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def multi_frame_zst(data: bytes, cuts: list[int]) -> bytes:
    """``data`` as several concatenated zstd frames, one per piece between ``cuts``."""
    bounds = [0, *cuts, len(data)]
    compressor = zstandard.ZstdCompressor()
    return b"".join(compressor.compress(data[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True))


def chunk_stream(folder: Path) -> list[int]:
    """The token ids of a prepared split: its chunk files (12-byte header, uint16 ids) in index order."""
    index = json.loads((folder / "index.json").read_text())
    ids: list[int] = []
    for chunk in index["chunks"]:
        data = (folder / chunk["filename"]).read_bytes()
        assert np.frombuffer(data[:12], dtype=np.uint32).tolist() == [1, 12, len(data)]
        tokens = np.frombuffer(data[12:], dtype=np.uint16)
        assert chunk["dim"] == len(tokens) and chunk["chunk_bytes"] == len(data)
        ids += tokens.tolist()
    assert sum(split_tokens(folder)) == len(ids)
    return ids


def stream_of(tok: Tokenizer, docs: list[str]) -> list[int]:
    return [i for d in docs for i in tok.encode(d, eos=True)]


def documents_of(tok: Tokenizer, folder: Path) -> list[str]:
    """The documents of a prepared split: its stream cut at each EOS, decoded."""
    docs, current = [], []
    for t in chunk_stream(folder):
        if t == tok.eos_id:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    assert current == []  # every document ends with EOS
    return docs


def prepare(tok: Tokenizer, path: Path, **kwargs) -> Corpus:
    kwargs.setdefault("val_split_fraction", 0.0)
    kwargs.setdefault("num_proc", 1)
    data = Corpus(path, **kwargs)
    data.connect(tok, 2, 16)
    data.prepare_data()
    return data


def assert_cache_empty(tmp_path: Path) -> None:
    """Neither an entry nor a temporary (.tmp-*) folder under the cache's data folder."""
    data_dir = tmp_path / "cache" / "data"
    assert not data_dir.exists() or sorted(p.name for p in data_dir.iterdir()) == []


# ----------------------------------------------------------------------------- 1. formats


def _write_format(fmt: str, root: Path, docs: list[str]) -> tuple[Path, dict, list[str]]:
    """Write ``docs`` in ``fmt`` under ``root``: (path to give Corpus, its extra arguments, expected order)."""
    root.mkdir(parents=True)
    data = jsonl_bytes(docs)
    if fmt == "text":
        # a/ holds the even documents, b/ the odd ones: the stream follows the sorted relative paths
        for i, d in enumerate(docs):
            f = root / "docs" / "ab"[i % 2] / f"{i:03d}.txt"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(d.encode())
        return root / "docs", {}, docs[0::2] + docs[1::2]
    if fmt == "jsonl":
        (root / "c.jsonl").write_bytes(data)
        return root / "c.jsonl", {}, docs
    if fmt == "jsonl.gz":
        (root / "c.jsonl.gz").write_bytes(gzip.compress(data))
        return root / "c.jsonl.gz", {}, docs
    if fmt == "jsonl.zst":
        (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
        return root / "c.jsonl.zst", {}, docs
    if fmt == "jsonl.zst-frames":  # three frames, cut in the middle of lines
        cuts = [len(data) // 3 + 5, 2 * len(data) // 3 + 11]
        assert data[cuts[0] - 1 : cuts[0]] != b"\n" and data[cuts[1] - 1 : cuts[1]] != b"\n"
        (root / "c.jsonl.zst").write_bytes(multi_frame_zst(data, cuts))
        return root / "c.jsonl.zst", {}, docs
    if fmt in ("json-array", "json-array-small-blocks"):
        records_ = [{"id": i, "text": d} for i, d in enumerate(docs)]
        text = "\n " + json.dumps(records_, indent=2, ensure_ascii=False) + "\n"  # leading white space too
        (root / "c.json").write_text(text, encoding="utf-8")
        return root / "c.json", {}, docs
    if fmt == "json-lines":
        (root / "c.json").write_bytes(data)
        return root / "c.json", {}, docs
    if fmt == "json.gz-lines":
        (root / "c.json.gz").write_bytes(gzip.compress(data))
        return root / "c.json.gz", {}, docs
    if fmt == "parquet":
        write_parquet(root / "c.parquet", {"id": list(range(len(docs))), "text": docs}, row_group_size=7)
        return root / "c.parquet", {}, docs
    if fmt == "parquet-content":
        columns = {"content": docs, "text": ["decoy"] * len(docs), "id": list(range(len(docs)))}
        write_parquet(root / "c.parquet", columns, row_group_size=9)
        return root / "c.parquet", {"text_key": "content"}, docs
    raise AssertionError(fmt)


FORMATS = [
    "text",
    "jsonl",
    "jsonl.gz",
    "jsonl.zst",
    "jsonl.zst-frames",
    "json-array",
    "json-array-small-blocks",
    "json-lines",
    "json.gz-lines",
    "parquet",
    "parquet-content",
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_token_stream(
    tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    docs = make_docs(40)
    if fmt == "json-array-small-blocks":  # the rolling buffer refills inside records and inside UTF-8 characters
        monkeypatch.setattr(records, "_JSON_BLOCK", 13)
    path, kwargs, expected = _write_format(fmt, tmp_path / "src", docs)
    data = prepare(tok, path, **kwargs)
    entry = data.entry()
    assert entry.parent == tmp_path / "cache" / "data" and (entry / "litliger.json").is_file()
    assert chunk_stream(entry / "train") == stream_of(tok, expected)
    assert not (entry / "val").exists()  # val_split_fraction=0: no validation split
    meta = json.loads((entry / "litliger.json").read_text())
    assert meta["documents"] == {"train": 40, "val": 0} and meta["dtype"] == "uint16"


# ----------------------------------------------------------------------------- 2. parts


def test_a_line_straddling_any_cut_is_read_exactly_once(tmp_path: Path) -> None:
    docs = make_docs(8, words=(1, 4))
    raw = jsonl_bytes(docs)
    lines = raw.split(b"\n")
    # blank lines, a CRLF line end and a last line without a line break
    raw = b"\n".join(lines[:3]) + b"\n\n\n" + b"\n".join(lines[3:5]) + b"\r\n" + b"\n".join(lines[5:]).rstrip(b"\n")
    path = tmp_path / "c.jsonl"
    path.write_bytes(raw)
    fmt = format_of(path)
    whole = [t for _, t in read_documents(Part(path, "c.jsonl", fmt, 0, len(raw)), "text", Skipped())]
    assert whole == docs
    for cut in range(len(raw) + 1):
        halves = [Part(path, "c.jsonl", fmt, 0, cut), Part(path, "c.jsonl", fmt, cut, len(raw))]
        got = [t for p in halves for _, t in read_documents(p, "text", Skipped())]
        assert got == docs, f"cut at byte {cut}"
    for target in range(40, len(raw) + 40, 17):
        parts = file_parts(path, "c.jsonl", fmt, "train", target)
        assert parts[0].start == 0 and parts[-1].end == len(raw)
        assert all(a.end == b.start for a, b in zip(parts[:-1], parts[1:], strict=True))
        located = [(loc, t) for p in parts for loc, t in read_documents(p, "text", Skipped())]
        assert [t for _, t in located] == docs, f"target {target}: {len(parts)} parts"
        assert sorted({loc for loc, _ in located}) == [loc for loc, _ in located]  # byte offsets, in order, once


def test_big_files_are_cut_into_parts_and_give_the_one_part_stream(
    tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = make_docs(150)
    (tmp_path / "src").mkdir()
    jsonl = tmp_path / "src" / "a.jsonl"
    jsonl.write_bytes(jsonl_bytes(docs[:100]))
    write_parquet(tmp_path / "src" / "b.parquet", {"text": docs[100:]}, row_group_size=5)  # 10 row groups
    expected = stream_of(tok, docs)

    one = prepare(tok, tmp_path / "src")
    assert [(p.name, p.start, p.end) for p in one.parts()] == [
        ("a.jsonl", 0, jsonl.stat().st_size),
        ("b.parquet", 0, 10),
    ]
    assert chunk_stream(one.entry() / "train") == expected

    monkeypatch.setattr(corpus, "unit_target", lambda total: 997)
    cut = prepare(tok, tmp_path / "src")
    jsonl_parts = [p for p in cut.parts() if p.name == "a.jsonl"]
    parquet_parts = [(p.start, p.end) for p in cut.parts() if p.name == "b.parquet"]
    raw = jsonl.read_bytes()
    assert len(jsonl_parts) > 5 and jsonl_parts[0].start == 0 and jsonl_parts[-1].end == len(raw)
    assert all(a.end == b.start for a, b in zip(jsonl_parts[:-1], jsonl_parts[1:], strict=True))
    assert any(raw[p.start - 1 : p.start] != b"\n" for p in jsonl_parts[1:])  # some cuts fall inside a line
    assert len(parquet_parts) > 1 and parquet_parts[0][0] == 0 and parquet_parts[-1][1] == 10
    assert all(a[1] == b[0] for a, b in zip(parquet_parts[:-1], parquet_parts[1:], strict=True))
    assert cut.entry() != one.entry()
    assert len(json.loads((cut.entry() / "train" / "index.json").read_text())["chunks"]) > 1  # one per unit
    assert chunk_stream(cut.entry() / "train") == expected  # each record once, in order


def test_the_default_unit_size_cuts_a_big_jsonl_file(tmp_path: Path) -> None:
    line = json.dumps({"text": "kappa lambda " * 40}) + "\n"
    path = tmp_path / "big.jsonl"
    path.write_text(line * (5 * (1 << 20) // len(line)))  # 5 MiB: several units
    size = path.stat().st_size
    parts = Corpus(path, val_split_fraction=0.0).parts()
    assert len(parts) == -(-size // corpus.unit_target(size)) > 1
    assert parts[0].start == 0 and parts[-1].end == size
    assert all(a.end == b.start for a, b in zip(parts[:-1], parts[1:], strict=True))
    assert parts[0].end % len(line) != 0  # cut inside a line


def test_layout_is_the_same_for_any_number_of_processes(
    tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = make_docs(240)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_bytes(jsonl_bytes(docs[:160]))
    write_parquet(tmp_path / "src" / "b.parquet", {"text": docs[160:]}, row_group_size=10)
    monkeypatch.setattr(corpus, "unit_target", lambda total: 2000)
    pools: list[int] = []
    real_pool = shards._run_pool
    monkeypatch.setattr(shards, "_run_pool", lambda *a: (pools.append(a[2]), real_pool(*a)))

    def layout(num_proc: int, cache: str) -> dict[str, bytes]:
        train = prepare(tok, tmp_path / "src", num_proc=num_proc, cache_dir=tmp_path / cache).entry() / "train"
        assert chunk_stream(train) == stream_of(tok, docs)
        return {p.name: p.read_bytes() for p in sorted(train.iterdir())}

    in_process = layout(1, "in-process")
    assert pools == []
    # A small corpus may be prepared in-process whatever num_proc (shards._IN_PROCESS_BELOW where it exists).
    monkeypatch.setattr(shards, "_IN_PROCESS_BELOW", 0, raising=False)
    pool_2, pool_3 = layout(2, "pool-2"), layout(3, "pool-3")
    assert pools == [2, 3]
    index = json.loads(in_process["index.json"])
    assert len(index["chunks"]) > 4 and len(in_process) == len(index["chunks"]) + 1
    assert in_process == pool_2 == pool_3  # same file names, same bytes, same index


# ----------------------------------------------------------------------------- 3. record-level hold-out


def test_record_level_validation_hold_out(tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = make_docs(500, seed=3, words=(3, 10))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "records.jsonl").write_bytes(jsonl_bytes(docs))

    data = prepare(tok, tmp_path / "src", val_split_fraction=0.2)
    assert [p.split for p in data.parts()] == ["records"]
    train, val = documents_of(tok, data.entry() / "train"), documents_of(tok, data.entry() / "val")
    assert 0.12 * 500 <= len(val) <= 0.28 * 500
    assert not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)]  # file order kept within each split

    data.setup()
    assert next(iter(data.train_dataloader())).shape == (2, 17)
    assert next(iter(data.val_dataloader())).shape == (2, 17)

    # The same records cut into other parts: the same split (it depends on file name and place in the file).
    monkeypatch.setattr(corpus, "unit_target", lambda total: 3000)
    cut = prepare(tok, tmp_path / "src", val_split_fraction=0.2)
    assert len(cut.parts()) > 5 and cut.entry() != data.entry()
    assert documents_of(tok, cut.entry() / "train") == train
    assert documents_of(tok, cut.entry() / "val") == val

    # Another file added: the records of the first keep their split.
    (tmp_path / "src" / "zz-more.jsonl").write_bytes(jsonl_bytes(make_docs(50, seed=4, prefix="more")))
    more = prepare(tok, tmp_path / "src", val_split_fraction=0.2)
    assert [d for d in documents_of(tok, more.entry() / "val") if not d.startswith("more")] == val
    assert [d for d in documents_of(tok, more.entry() / "train") if not d.startswith("more")] == train


# ----------------------------------------------------------------------------- 4. bad input


def _jsonl_lines(*records_: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records_)


def _truncated_zstd(root: Path) -> Path:
    # Lines of 128 bytes: zstd's 128 KiB blocks end at line ends. The stream loses its last bytes (an
    # interrupted download): what decodes is 2048 whole records, so only a check of the stream can tell.
    lines = [json.dumps({"text": f"doc {i} " + "kappa" * 30})[:125] + '"}\n' for i in range(3000)]
    assert {len(x) for x in lines} == {128}
    z = zstandard.ZstdCompressor().compress("".join(lines).encode())
    (root / "bad.jsonl.zst").write_bytes(z[:-10])
    return root / "bad.jsonl.zst"


def _corrupt_zstd(root: Path) -> Path:
    z = bytearray(zstandard.ZstdCompressor().compress(jsonl_bytes(make_docs(300))))
    z[len(z) // 2 : len(z) // 2 + 50] = bytes(50)
    (root / "bad.jsonl.zst").write_bytes(bytes(z))
    return root / "bad.jsonl.zst"


def _garbage_parquet_footer(root: Path) -> Path:
    path = write_parquet(root / "bad.parquet", {"text": make_docs(20)}, row_group_size=5)
    raw = bytearray(path.read_bytes())
    raw[-120:-8] = b"\xab" * 112  # the metadata; the length and the magic "PAR1" stay
    path.write_bytes(bytes(raw))
    return path


def _bad(name: str, content: bytes) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        (root / name).write_bytes(content)
        return root / name

    return write


GOOD = {"text": "a good document"}
BAD_INPUTS = [
    pytest.param(
        _bad("bad.jsonl", _jsonl_lines(GOOD, GOOD, {"title": "t", "body": "b"}, GOOD)),
        r"record without 'text', in \S*bad\.jsonl:3 \(its keys: 'title', 'body'\); set text_key",
        id="jsonl-missing-key",
    ),
    pytest.param(
        _bad("bad.jsonl.gz", gzip.compress(_jsonl_lines(GOOD, {"body": "b"}))),
        r"record without 'text', in \S*bad\.jsonl\.gz:2 \(its keys: 'body'\)",
        id="jsonl.gz-missing-key",
    ),
    pytest.param(
        _bad("bad.json", json.dumps([GOOD, GOOD, {"body": "b", "id": 2}], indent=2).encode()),
        r"record without 'text', in \S*bad\.json\[2\] \(its keys: 'body', 'id'\)",
        id="json-array-missing-key",
    ),
    pytest.param(
        lambda root: write_parquet(root / "bad.parquet", {"id": [1, 2], "body": ["x", "y"]}, row_group_size=1),
        r"no column 'text', in \S*bad\.parquet \(its columns: 'id', 'body'\); set text_key",
        id="parquet-missing-column",
    ),
    pytest.param(
        _bad("bad.jsonl.gz", gzip.compress(jsonl_bytes(make_docs(50)))[:-20]),
        r"corrupt or truncated gzip stream \(.*\), in \S*bad\.jsonl\.gz; re-download or remove the file",
        id="truncated-gzip",
    ),
    pytest.param(
        _truncated_zstd,
        r"corrupt or truncated zstd stream \(.*\), in \S*bad\.jsonl\.zst; re-download or remove the file",
        id="truncated-zstd",
    ),
    pytest.param(
        _corrupt_zstd,
        r"corrupt or truncated zstd stream \(.*\), in \S*bad\.jsonl\.zst; re-download or remove the file",
        id="corrupt-zstd",
    ),
    pytest.param(
        _garbage_parquet_footer,
        r"not a readable parquet file \(.*\), in \S*bad\.parquet; re-download or remove it",
        id="parquet-garbage-footer",
    ),
    pytest.param(
        _bad("bad.jsonl", b'{"text": "fine"}\n{"text": "no closing quote}\n'),
        r"invalid JSON \(.* at column \d+\), in \S*bad\.jsonl:2; fix or remove the record",
        id="invalid-json",
    ),
    pytest.param(
        _bad("bad.json", b'[{"text": "a"}, {"text": "b"}'),
        r"the JSON array is not closed \(no '\]'\), in \S*bad\.json; the file is truncated",
        id="json-array-not-closed",
    ),
    pytest.param(
        _bad("bad.jsonl", _jsonl_lines(GOOD, {"text": 5})),
        r"'text' is a int, not a string, in \S*bad\.jsonl:2; set text_key to a text field",
        id="jsonl-non-string",
    ),
    pytest.param(
        _bad("bad.jsonl", _jsonl_lines(GOOD, ["text", "a list"])),
        r"a record is a JSON list, not an object, in \S*bad\.jsonl:2",
        id="jsonl-not-an-object",
    ),
    pytest.param(
        lambda root: write_parquet(root / "bad.parquet", {"text": [1, 2, 3]}, row_group_size=2),
        r"column 'text' holds int values, not text, in \S*bad\.parquet; set text_key to a string column",
        id="parquet-non-string",
    ),
    pytest.param(
        _bad("bad.bin", b"\x00\x01binary"),
        r"unknown file type '\.bin', in \S*bad\.bin; .*rename the file, or set glob to leave it out",
        id="unknown-extension",
    ),
]


@pytest.mark.parametrize(("write", "message"), BAD_INPUTS)
def test_bad_input_is_one_clear_line_and_leaves_no_cache(
    tok: Tokenizer, tmp_path: Path, write: Callable[[Path], Path], message: str
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a-good.jsonl").write_bytes(jsonl_bytes(make_docs(5)))
    bad = write(tmp_path / "src")
    with pytest.raises(ValueError, match=f"(?s){message}") as info:  # (?s): a line break fails below, not here
        prepare(tok, tmp_path / "src")
    assert isinstance(info.value, FormatError)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)
    assert_cache_empty(tmp_path)


def test_an_error_in_a_worker_process_is_the_same_line(
    tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [json.dumps({"text": d}) for d in make_docs(400, words=(3, 8))]
    lines[299] = json.dumps({"title": "t"})
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(corpus, "unit_target", lambda total: 4000)  # line 300 is in a later part
    monkeypatch.setattr(shards, "_IN_PROCESS_BELOW", 0, raising=False)
    data = Corpus(tmp_path / "bad.jsonl", val_split_fraction=0.0, num_proc=2)
    data.connect(tok, 2, 16)
    assert data.parts()[0].end < sum(len(x) + 1 for x in lines[:299])
    with pytest.raises(FormatError, match=r"record without 'text', in \S*bad\.jsonl:300 \(its keys: 'title'\)"):
        data.prepare_data()
    assert_cache_empty(tmp_path)


def test_glob_leaves_out_files_of_unknown_type(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_bytes(jsonl_bytes(make_docs(5)))
    (tmp_path / "src" / "b.bin").write_bytes(b"\x00\x01")
    data = prepare(tok, tmp_path / "src", glob="*.jsonl")
    assert chunk_stream(data.entry() / "train") == stream_of(tok, make_docs(5))


NOT_UTF8 = [
    pytest.param("bad.jsonl", lambda lines: b"".join(lines), id="jsonl-raw-0xff"),
    pytest.param("bad.jsonl.zst", lambda lines: zstandard.ZstdCompressor().compress(b"".join(lines)), id="zst"),
    pytest.param("bad.jsonl.gz", lambda lines: gzip.compress(b"".join(lines)), id="gz"),
]


@pytest.mark.parametrize(("name", "encode"), NOT_UTF8)
def test_records_that_are_not_utf8_are_skipped_and_counted(
    tok: Tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture, name: str, encode: Callable[[list[bytes]], bytes]
) -> None:
    docs = make_docs(6)
    lines = [json.dumps({"text": d}).encode() + b"\n" for d in docs]
    lines.insert(2, b'{"text": "caf\xff au lait"}\n')
    (tmp_path / name).write_bytes(encode(lines))
    data = prepare(tok, tmp_path / name)
    assert chunk_stream(data.entry() / "train") == stream_of(tok, docs)
    err = capsys.readouterr().err
    assert "skipped 1 records that are not UTF-8" in err and str(tmp_path / name) in err


def test_a_record_with_an_unpaired_surrogate_is_skipped(
    tok: Tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    docs = make_docs(4)
    lines = [json.dumps({"text": d}) for d in docs]
    lines.insert(1, '{"text": "half a pair \\ud800 here"}')
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    data = prepare(tok, tmp_path / "c.jsonl.gz")
    assert chunk_stream(data.entry() / "train") == stream_of(tok, docs)
    err = capsys.readouterr().err
    assert f"skipped 1 records that are not UTF-8 (first: {tmp_path / 'c.jsonl.gz'}:2)" in err


def test_the_summary_names_the_line_of_the_first_record_that_is_not_utf8(
    tok: Tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lines = [json.dumps({"text": d}).encode() + b"\n" for d in make_docs(4)]
    lines.insert(2, b'{"text": "caf\xff"}\n')
    (tmp_path / "bad.jsonl").write_bytes(b"".join(lines))
    prepare(tok, tmp_path / "bad.jsonl")
    assert f"(first: {tmp_path / 'bad.jsonl'}:3)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 5. a file that changes


@pytest.mark.parametrize("pool", [False, True], ids=["in-process", "pool"])
def test_a_file_that_changes_during_preparation_is_an_error(
    tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool: bool
) -> None:
    path = tmp_path / "growing.jsonl"
    path.write_bytes(jsonl_bytes(make_docs(30)))
    real = shards.read_documents

    def growing(part: Part, text_key: str, skipped: Skipped) -> Iterator[tuple[int, str]]:
        for n, item in enumerate(real(part, text_key, skipped)):
            yield item
            if n == 0:
                with open(part.path, "ab") as f:
                    f.write(b'{"text": "appended while reading"}\n')

    monkeypatch.setattr(shards, "read_documents", growing)
    if pool:
        monkeypatch.setattr(shards, "_IN_PROCESS_BELOW", 0, raising=False)
    with pytest.raises(RuntimeError, match=r"growing\.jsonl changed while it was being prepared") as info:
        prepare(tok, path, num_proc=2 if pool else 1)
    assert "\n" not in str(info.value)
    assert_cache_empty(tmp_path)


# ----------------------------------------------------------------------------- 6. the cache key


def entry_of(tok: Tokenizer, path: Path, verify: str = "fast") -> Path:
    data = Corpus(path, val_split_fraction=0.0, verify=verify)
    data.connect(tok, 2, 16)
    return data.entry()


def test_an_unchanged_corpus_reuses_its_entry(tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_run_units = corpus.run_units
    monkeypatch.setattr(corpus, "run_units", lambda *a, **kw: (calls.append(1), real_run_units(*a, **kw))[1])
    path = tmp_path / "c.jsonl"
    path.write_bytes(jsonl_bytes(make_docs(20)))
    entry = prepare(tok, path).entry()
    mtime = (entry / "train" / "index.json").stat().st_mtime_ns
    assert prepare(tok, path).entry() == entry and len(calls) == 1
    assert (entry / "train" / "index.json").stat().st_mtime_ns == mtime
    (tmp_path / "moved").mkdir()
    os.rename(path, tmp_path / "moved" / "c.jsonl")  # mv keeps the name and the modification time
    assert prepare(tok, tmp_path / "moved" / "c.jsonl").entry() == entry and len(calls) == 1
    path = tmp_path / "moved" / "c.jsonl"
    assert prepare(tok, path, verify="full").entry() != entry and len(calls) == 2
    assert prepare(tok, path, text_key="text", val_split_fraction=0.1).entry() != entry and len(calls) == 3


def test_a_small_file_is_identified_by_every_byte(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_bytes(jsonl_bytes(make_docs(20)))
    before = entry_of(tok, path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert entry_of(tok, path) == before  # up to 1 MiB the key is the content: a touch (or cp) reuses it
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size
    assert entry_of(tok, path) != before


def _sampled(size: int) -> list[tuple[int, int]]:
    """The byte ranges ``fast`` hashes in a file of ``size`` bytes (identity.py)."""
    last, n, width = size - identity._WINDOW, identity._WINDOWS, identity._WINDOW
    return [(last * i // (n - 1), last * i // (n - 1) + width) for i in range(n)]


def test_a_big_file_fast_and_full_rules_and_the_documented_risk(tok: Tokenizer, tmp_path: Path) -> None:
    line = json.dumps({"text": "x" * 1000}) + "\n"
    path = tmp_path / "big.jsonl"
    path.write_text(line * (1600 * 1024 // len(line)))  # 1.6 MB: above the 1 MiB sampled size
    size = path.stat().st_size
    assert size > identity._SMALL
    fast, full = entry_of(tok, path), entry_of(tok, path, "full")
    assert fast != full and entry_of(tok, path) == fast and entry_of(tok, path, "full") == full

    def edit(offset: int) -> None:
        """Change one byte in place, keeping the size and the modification time."""
        st = os.stat(path)
        with open(path, "r+b") as f:
            f.seek(offset)
            old = f.read(1)
            assert old == b"x"
            f.seek(offset)
            f.write(b"y")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns

    # Outside the sampled windows: "fast" does not see the edit and would reuse a stale entry (the risk
    # identity.py documents); "full" hashes every byte and sees it.
    windows = _sampled(size)
    raw = path.read_bytes()
    unsampled = next(o for o in range(size) if raw[o : o + 1] == b"x" and not any(a <= o < b for a, b in windows))
    edit(unsampled)
    assert entry_of(tok, path) == fast
    full_edited = entry_of(tok, path, "full")
    assert full_edited != full

    # Inside a window both see it.
    sampled = next(o for o in range(windows[7][0], windows[7][1]) if raw[o : o + 1] == b"x")
    edit(sampled)
    fast_edited = entry_of(tok, path)
    assert fast_edited != fast and entry_of(tok, path, "full") not in (full, full_edited)

    # A touch changes the "fast" key (the modification time is in it), not the "full" one.
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert entry_of(tok, path) != fast_edited
    full_touched = entry_of(tok, path, "full")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert entry_of(tok, path) == fast_edited and entry_of(tok, path, "full") == full_touched

    # Appending changes the size: both keys change.
    with open(path, "ab") as f:
        f.write(line.encode())
    assert entry_of(tok, path) != fast_edited and entry_of(tok, path, "full") != full_touched


# ----------------------------------------------------------------------------- 7. memory

# ru_maxrss survives fork and exec: a process started from this pytest process (torch loaded) would start
# with pytest's peak. The child forks at once, before importing anything, and the grandchild (a fresh peak
# of ~10 MB) prepares the corpus in-process, where a worker would (tokenize_unit), and measures itself.
_PEAK = textwrap.dedent(
    """
    import os, sys

    pid = os.fork()
    if pid:
        sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    try:
        import json, resource
        import litliger.data.shards as shards
        from litliger.data import Corpus, Tokenizer
        from litliger.data.corpus import corpus_meta

        shards._IN_PROCESS_BELOW = 1 << 40
        tok = Tokenizer.from_dir(sys.argv[1])
        data = Corpus(sys.argv[2], val_split_fraction=0.0, num_proc=1, cache_dir=sys.argv[3])
        data.connect(tok, 2, 16)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        data.prepare_data()
        peak = max(resource.getrusage(r).ru_maxrss for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        documents = corpus_meta(data.entry())["documents"]["train"]
        print(json.dumps({"before_kib": before, "peak_kib": peak, "documents": documents}), flush=True)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    os._exit(0)
    """
)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tok")
    block = [jsonl_bytes(make_docs(6000, seed=s, words=(20, 60))) for s in range(10)]  # ~2 MB each
    compressor = zstandard.ZstdCompressor(level=1)
    (tmp_path / "small.jsonl.zst").write_bytes(compressor.compress(block[0]))
    (tmp_path / "big.jsonl.zst").write_bytes(compressor.compress(b"".join(block)))
    assert 1.5e6 < len(block[0]) < 3e6

    def start(name: str) -> subprocess.Popen:
        args = [str(tmp_path / "tok"), str(tmp_path / name), str(tmp_path / f"cache-{name}")]
        return subprocess.Popen([sys.executable, "-c", _PEAK, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def peak(child: subprocess.Popen) -> dict:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err.decode()[-2000:]
        return json.loads(out.decode().strip().splitlines()[-1])

    children = [start("small.jsonl.zst"), start("big.jsonl.zst")]  # at once: each measures only itself
    try:
        small, big = map(peak, children)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert big["documents"] == 10 * small["documents"] == 60000
    assert small["before_kib"] < 2 << 20  # a measure of this process, not one inherited from pytest
    assert big["peak_kib"] < small["peak_kib"] + 50 * 1024, (small, big)
