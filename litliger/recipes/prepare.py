"""``litliger prepare``: tokenize a corpus into token shards before training, on every core of every machine.

The output (a local folder or a URL such as ``s3://bucket/corpus``) holds ``train/`` and ``val/`` (litdata
token shards, independent of the training sequence length), ``tokenizer/`` and ``litliger.json`` (what was
prepared, from what, with which tokenizer). Train on it with ``--data litliger.data.TokenShards
--data.path <out_dir>`` or as a Mixture source.

Several machines: run the same command on each with ``--num_nodes N --node_rank r`` (or under SLURM /
torchrun, whose variables are read). Node r tokenizes the units ``i % N == r`` (the layout never depends on
N), writes its chunk files and ``.parts/node-r.json``; the node that finds every part present writes the
indexes. A node that fails can simply run again. A local output on one machine is written into a private
scratch folder and renamed into place, so it is complete or absent; a remote one is uploaded with the
indexes last, so a reader never sees an index that points at missing chunks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..checkpoint.safety import check_output_dir
from ..data import DataModule, Mixture, Tokenizer
from ..data.cache import publish_dir
from ..data.corpus import TokenCorpus, default_workers
from ..data.remote import check_reachable, is_remote, list_names, read_text, upload_folder, write_text
from ..data.shards import (
    CHUNK_TOKENS,
    META,
    finish,
    plan_units,
    results_from_json,
    results_to_json,
    run_units,
    summarize,
    token_dtype,
    unit_target,
)
from ..data.token_shards import TOKENIZER_DIR
from ..util.checks import check_at_least, check_positive

PARTS_DIR = ".parts"
OUTPUT_NAMES = {"train", "val", PARTS_DIR, TOKENIZER_DIR, META}
_GLOB = frozenset("*?[")


def main(
    data: DataModule | None = None,
    out_dir: str | None = None,
    tokenizer_dir: Path | None = None,
    vocab_size: int | None = None,
    num_proc: int | None = None,
    num_nodes: int | None = None,
    node_rank: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``litliger prepare``: tokenize ``data`` into token shards in ``out_dir`` (see the module docstring).

    Args:
        data: a Corpus, TextFiles or PythonStdlib (one output), or a Mixture (one output per source, in
            ``out_dir/<name>``).
        out_dir: a new or empty local folder, or a URL (``s3://bucket/prefix``).
        tokenizer_dir: the tokenizer to use (a Hugging Face tokenizer folder or a checkpoint).
        vocab_size: without ``tokenizer_dir``: train a byte-level BPE of this size on the data.
        num_proc: processes on this machine (default: the data's ``num_proc``, else every core it may use).
        num_nodes: machines preparing this output together (default: $SLURM_NNODES, $NUM_NODES, or 1).
        node_rank: this machine's index (default: $SLURM_NODEID, $NODE_RANK, $GROUP_RANK, or 0).
        storage_options: for a remote out_dir, e.g. ``{"endpoint_url": "https://..."}``.

    Returns the output's ``litliger.json`` (a Mixture: one per source output).
    """
    if data is None:
        raise ValueError("no data, in --data; name a corpus, e.g. --data litliger.data.Corpus --data.path corpus/")
    if out_dir is None:
        raise ValueError("no output, in --out_dir; give a new or empty folder, or a URL such as s3://bucket/corpus")
    check_positive("num_proc", num_proc, "set the processes to use, or leave it unset for all cores", optional=True)
    num_nodes = num_nodes if num_nodes is not None else _env_int(("SLURM_NNODES", "NUM_NODES"), 1)
    node_rank = node_rank if node_rank is not None else _env_int(("SLURM_NODEID", "NODE_RANK", "GROUP_RANK"), 0)
    check_positive("num_nodes", num_nodes, "set how many machines prepare this output")
    check_at_least("vocab_size", vocab_size, 257, "a byte-level BPE needs 256 byte ids and EOS", optional=True)
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"node_rank={node_rank} is not in [0, {num_nodes}), in --node_rank; number machines 0..N-1")
    out = str(out_dir)
    if is_remote(out):
        check_reachable(out, storage_options, flag="--storage_options")
    corpora = _corpora(data, out)
    tokenizer = _tokenizer(data, tokenizer_dir, vocab_size)
    results = {}
    for corpus, target in corpora:
        corpus.connect(tokenizer, batch_size=1, max_seq_length=1)
        processes = num_proc or corpus.num_proc or default_workers()  # --num_proc, else the data's own setting
        results[target] = prepare_corpus(
            corpus, tokenizer, target, num_proc=processes, num_nodes=num_nodes,
            node_rank=node_rank, storage_options=storage_options,
        )  # fmt: skip
    return results if isinstance(data, Mixture) else results[out]


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if (value := os.environ.get(name, "").strip()).isdigit():
            return int(value)
    return default


def _corpora(data: DataModule, out: str) -> list[tuple[TokenCorpus, str]]:
    if isinstance(data, Mixture):
        pairs = []
        for source, module in zip(data.sources, data.modules, strict=True):
            if not isinstance(module, TokenCorpus):
                raise ValueError(
                    f"source {source.name!r} is prepared shards already ({source.path}), in --data; prepare only "
                    "sources that are corpus files"
                )
            pairs.append((module, _join(out, source.name)))
        return pairs
    if not isinstance(data, TokenCorpus):
        raise ValueError(
            f"litliger prepare reads a corpus (Corpus, TextFiles, PythonStdlib or a Mixture of them), got "
            f"{type(data).__name__}, in --data"
        )
    return [(data, out)]


def _join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}" if is_remote(location) else str(Path(location) / name)


def _tokenizer(data: DataModule, tokenizer_dir: Path | None, vocab_size: int | None) -> Tokenizer:
    if tokenizer_dir is not None:
        if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"tokenizer_dir {tokenizer_dir} holds no tokenizer.json, in --tokenizer_dir; name a tokenizer folder"
            )
        return Tokenizer.from_dir(tokenizer_dir)
    if vocab_size is None:
        raise ValueError(
            "no tokenizer, in --tokenizer_dir; name a tokenizer folder, or give --vocab_size to train a BPE on the data"
        )
    return data.train_tokenizer(vocab_size)


def prepare_corpus(
    corpus: TokenCorpus,
    tokenizer: Tokenizer,
    out: str,
    *,
    num_proc: int,
    num_nodes: int = 1,
    node_rank: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize ``corpus`` into the shards at ``out`` (this node's share); returns the output's metadata
    (complete once every node is done) or this node's summary."""
    remote = is_remote(out)
    key = corpus.entry().name  # the same content key as the corpus's cache entry
    existing = read_text(_join(out, META), storage_options) if remote else _read_local(Path(out) / META)
    if existing and json.loads(existing).get("key") == key:
        print(f"litliger prepare: {out} already holds this corpus prepared with this tokenizer", file=sys.stderr)
        return json.loads(existing)
    if not remote:
        roots = [r for r, _ in filter(None, corpus._roots())]
        # several machines write into one shared folder: what the others wrote there is expected
        shared = num_nodes > 1 and Path(out).is_dir() and {p.name for p in Path(out).iterdir()} <= OUTPUT_NAMES
        check_output_dir(out, inputs=[r for r in roots if not _GLOB & set(r)], overwrite=shared)
    parts = corpus.parts()
    units = plan_units(parts, unit_target(sum(p.size for p in parts)))
    label = f"prepare {out}" + (f" (node {node_rank} of {num_nodes})" if num_nodes > 1 else "")
    start = time.perf_counter()

    def tokenize(folder: Path) -> list:
        return run_units(
            units, tokenizer=tokenizer, text_key=corpus.text_key, fraction=corpus.val_split_fraction, out_dir=folder,
            num_proc=num_proc, mine=lambda i: i % num_nodes == node_rank, progress=True, label=label,
        )  # fmt: skip

    dtype = token_dtype(tokenizer.vocab_size)
    meta = {"tokenizer": tokenizer.fingerprint, "num_nodes": num_nodes, "units": len(units)}
    if num_nodes == 1 and not remote:
        with publish_dir(Path(out)) as tmp:
            results = tokenize(tmp)
            summary = summarize(results, time.perf_counter() - start)
            corpus._check_summary(summary)
            tokenizer.save(tmp / TOKENIZER_DIR)
            written = finish(
                tmp, results, dtype=dtype, chunk_tokens=CHUNK_TOKENS, key=key, meta={**meta, **vars(summary)}
            )
        print(f"litliger prepare: {summary.line()} -> {out}", file=sys.stderr)
        return written
    scratch = Path(tempfile.mkdtemp(prefix="litliger-prepare-")) if remote else Path(out)
    try:
        results = tokenize(scratch)
        summary = summarize(results, time.perf_counter() - start)
        print(f"litliger prepare: node {node_rank}: {summary.line()}", file=sys.stderr)
        if remote:
            upload_folder(scratch, out, storage_options)
        part = json.dumps(results_to_json(results))
        _write(_join(_join(out, PARTS_DIR), f"node-{node_rank:05d}.json"), part, storage_options)
        return _merge_if_complete(corpus, tokenizer, out, key, num_nodes, meta, storage_options) or vars(summary)
    finally:
        if remote:
            shutil.rmtree(scratch, ignore_errors=True)


def _read_local(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _write(location: str, text: str, storage_options: dict[str, Any] | None) -> None:
    if is_remote(location):
        write_text(location, text, storage_options)
        return
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _merge_if_complete(
    corpus: TokenCorpus, tokenizer: Tokenizer, out: str, key: str, num_nodes: int, meta: dict, storage_options
) -> dict[str, Any] | None:
    """When every node's part file is present: write the indexes, the tokenizer and ``litliger.json``."""
    names = [f"node-{r:05d}.json" for r in range(num_nodes)]
    parts_at = _join(out, PARTS_DIR)
    if is_remote(out):
        present = set(list_names(parts_at, storage_options))
        if not all(n in present for n in names):
            return None
        texts = [read_text(_join(parts_at, n), storage_options) for n in names]
    else:
        if not all((Path(parts_at) / n).is_file() for n in names):
            return None
        texts = [(Path(parts_at) / n).read_text() for n in names]
    results = [r for text in texts for r in results_from_json(json.loads(text))]
    summary = summarize(results, 0.0)  # each node timed its own share
    corpus._check_summary(summary)
    dtype = token_dtype(tokenizer.vocab_size)
    folder = Path(tempfile.mkdtemp(prefix="litliger-index-")) if is_remote(out) else Path(out)
    try:
        tokenizer.save(folder / TOKENIZER_DIR)
        written = finish(
            folder, results, dtype=dtype, chunk_tokens=CHUNK_TOKENS, key=key, meta={**meta, **vars(summary)}
        )
        if is_remote(out):
            upload_folder(folder, out, storage_options)
    finally:
        if is_remote(out):
            shutil.rmtree(folder, ignore_errors=True)
    print(f"litliger prepare: all {num_nodes} nodes done; {summary.line()} -> {out}", file=sys.stderr)
    return written
