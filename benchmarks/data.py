"""Data preparation and loading throughput: `litliger prepare` against the tokenizer's own limit and against
LitGPT's litdata path, on synthetic corpora generated at run time (no download).

Corpora (cached under --work, so a rerun skips generation): English-like text from a fixed seed, words drawn
from a Zipf-distributed vocabulary of 20k pseudo-words (and numbers) with commas, sentences, capitals and
paragraph breaks; documents of 200-5000 words (log-uniform). Written as .jsonl.zst files, as .parquet files
of 4 row groups each (column "text"), both max(8, N) files, and as one plain .jsonl (the scaling row). MB are
MB of document text (UTF-8), whatever a format's size on disk. Tokenizers: "debug BPE" (2,048 ids) and "32k
BPE" (32,768 ids), byte-level BPEs from ``Tokenizer.train_bpe`` on a sample of the text.

Every figure comes from a fresh process (``--child``), timed inside it: start-up, imports and the tokenizer's
load are excluded. Token counts include each document's EOS. Rows (``--only``, comma-separated):

    prepare  per format and tokenizer: the LIMIT (encode_batch_fast over the texts already in memory, batches of
             1000 documents, RAYON_NUM_THREADS=N), OURS (litliger.recipes.prepare.main, num_proc=N) and LitGPT's
             path (litdata.optimize, a per-document tokenizer.encode, N workers: litgpt/data/prepare_*.py)
    scaling  OURS on the single plain .jsonl with num_proc=1 and N (32k BPE)
    loader   tokens/s over OURS's shards: plain litdata StreamingDataset, a litliger Mixture of two shard sources
             (0.7 / 0.3) and litliger TokenShards, batch 8 x 2049 tokens
    rss      peak RSS growth of OURS on 1x and 10x of .jsonl.zst (32k BPE), in the preparing process and in its
             workers (psutil every 0.2 s, and getrusage)

    python -m benchmarks.data --quick                  # smoke test: ~4 MB
    python -m benchmarks.data                          # 100 MB per format, every core: on a quiet machine
    python -m benchmarks.data --mb 1000 --procs 64 --only prepare,scaling   # logs, results.json: in --work
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from benchmarks import child_env, module_argv
from benchmarks.memory import max_rss_bytes, rss_bytes

ROWS = ("prepare", "scaling", "loader", "rss")
VOCABS = {"debug BPE": 2048, "32k BPE": 32768}
FORMATS = ("jsonl.zst", "parquet")
ROW_GROUPS, BATCH_DOCS, BLOCK, BATCH = 4, 1000, 2049, 8
LITGPT_CHUNK = 2049 * 8012
MB, MIB = 1e6, 2**20
_GEN_VERSION = 2  # in the folder of the generated corpora and tokenizers: bump it when they change
# after each word: a space, a comma, a semicolon, or a sentence end (>= _END: the next word is capitalized)
_SUFFIX = np.array([" ", ", ", "; ", ". ", "? ", ".\n\n"], dtype=object)
_SUFFIX_CDF = np.cumsum([0.857, 0.06, 0.005, 0.058, 0.006, 0.014])
_END = 3


# ---------------------------------------------------------------- synthetic corpora


def vocabulary(size: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words, capitalized words, Zipf CDF): pseudo-words from syllables, shorter ones more frequent."""
    rng = random.Random(seed)
    onsets = "b c d f g h j k l m n p r s t v w y z br ch cl cr dr fl gr pl pr sh st th tr wh".split()  # noqa: SIM905
    vowels = "a e i o u y ai ea ee ie oo ou".split()  # noqa: SIM905
    codas = ["", "", "", "n", "s", "t", "r", "l", "nd", "st", "ng", "ck", "rt"]
    words = {str(rng.randint(0, 2100)) for _ in range(300)}
    while len(words) < size:
        n = min(1 + int(rng.expovariate(1.1)), 5)
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(n)) + rng.choice(codas))
    ranked = sorted(words, key=lambda w: len(w) + 4 * rng.random() + 12 * w.isdigit())  # numbers rarer
    weights = 1.0 / (np.arange(len(ranked)) + 2.7) ** 1.05
    caps = np.array([w.capitalize() for w in ranked], dtype=object)
    return np.array(ranked, dtype=object), caps, np.cumsum(weights) / weights.sum()


def document(rng: np.random.Generator, words: np.ndarray, caps: np.ndarray, cdf: np.ndarray) -> str:
    """One document of 200-5000 words (log-uniform), in sentences and paragraphs."""
    n = int(np.exp(rng.uniform(np.log(200), np.log(5000))))
    ids = np.minimum(np.searchsorted(cdf, rng.random(n)), len(words) - 1)
    punct = np.searchsorted(_SUFFIX_CDF, rng.random(n) * _SUFFIX_CDF[-1])
    punct[-1] = _END
    cap = np.empty(n, dtype=bool)
    cap[0], cap[1:] = True, punct[:-1] >= _END
    return "".join((np.where(cap, caps[ids], words[ids]) + _SUFFIX[punct]).tolist()).rstrip()


def write_corpus(root: Path, formats: tuple[str, ...], mb: float, n_files: int, seed: int) -> dict[str, Any]:
    """``mb`` MB of text in ``n_files`` files per format under ``root/<format>/``; skipped when its manifest
    (beside the format folders: a corpus folder reads every file in it) says it is there."""
    manifest = root / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.rmtree(root, ignore_errors=True)
    for fmt in formats:
        (root / fmt).mkdir(parents=True)
    words, caps, cdf = vocabulary()
    rng = np.random.default_rng(seed)
    per_file, docs, total = mb * MB / n_files, 0, 0
    for i in range(n_files):
        sinks = []
        if "jsonl.zst" in formats:
            raw = open(root / "jsonl.zst" / f"part-{i:03d}.jsonl.zst", "wb")  # noqa: SIM115 (closed with the writer)
            sinks.append(zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=True))
        if "jsonl" in formats:
            sinks.append(open(root / "jsonl" / f"part-{i:03d}.jsonl", "wb"))  # noqa: SIM115 (closed below)
        table = None
        if "parquet" in formats:
            table = pq.ParquetWriter(root / "parquet" / f"part-{i:03d}.parquet", pa.schema([("text", pa.string())]))
        group: list[str] = []
        done = group_bytes = 0
        while done < per_file:
            text = document(rng, words, caps, cdf)
            line = (json.dumps({"id": docs, "text": text}) + "\n").encode()
            for sink in sinks:
                sink.write(line)
            size = len(text.encode())
            done, group_bytes, docs, total = done + size, group_bytes + size, docs + 1, total + size
            group.append(text)
            if group_bytes >= per_file / ROW_GROUPS or done >= per_file:
                if table is not None:
                    table.write_table(pa.table({"text": group}))
                group, group_bytes = [], 0
        for sink in sinks:
            sink.close()
        if table is not None:
            table.close()
    meta = {"documents": docs, "text_bytes": total, "files": n_files, "seed": seed, "version": _GEN_VERSION}
    manifest.write_text(json.dumps(meta) + "\n")
    return meta


def repeat_corpus(source: Path, root: Path, times: int) -> Path:
    """``source`` (a .jsonl.zst corpus) ``times`` over: each file's zstd frame repeated (read across frames)."""
    manifest = root / "manifest.json"
    if manifest.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "jsonl.zst").mkdir(parents=True)
    for f in sorted((source / "jsonl.zst").iterdir()):
        data = f.read_bytes()
        with open(root / "jsonl.zst" / f.name, "wb") as out:
            for _ in range(times):
                out.write(data)
    meta = json.loads((source / "manifest.json").read_text())
    meta = {**meta, "documents": meta["documents"] * times, "text_bytes": meta["text_bytes"] * times}
    manifest.write_text(json.dumps(meta) + "\n")
    return root


def file_texts(path: str | Path) -> Iterator[str]:
    """The documents of one corpus file, read as LitGPT's preparation scripts read them."""
    path = str(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
            yield from batch.column(0).to_pylist()
        return
    zst = path.endswith(".zst")
    with zstandard.open(path, "rt", encoding="utf-8") if zst else open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def corpus_files(folder: str | Path) -> list[str]:
    return sorted(str(p) for p in Path(folder).iterdir() if p.is_file())


def train_tokenizers(work: Path, corpus: Path, sample_mb: float) -> dict[str, Path]:
    """The two BPE folders, trained on the first ``sample_mb`` MB of ``corpus`` (cached under ``work``)."""
    folders = {}
    for name, vocab in VOCABS.items():
        folder = work / "tokenizers" / f"bpe-{vocab}-{corpus.name}-{sample_mb:g}MB"
        if not (folder / "tokenizer.json").is_file():
            from litliger.data import Tokenizer

            sample, size = [], 0
            for text in (t for f in corpus_files(corpus / "jsonl.zst") for t in file_texts(f)):
                if size >= sample_mb * MB:
                    break
                sample.append(text)
                size += len(text)
            identity = f"benchmarks.data:{_GEN_VERSION}:{corpus.name}:{sample_mb}"
            tokenizer = Tokenizer.train_bpe(
                [], vocab, cache_dir=work / "tokenizers" / "cache", texts=lambda s=sample: iter(s), identity=identity
            )
            tokenizer.save(folder)
        folders[name] = folder
    return folders


# ---------------------------------------------------------------- what a fresh process measures


def litgpt_tokenize(filepath: str, tokenizer: Any) -> Iterator[Any]:
    """LitGPT's ``fn`` for litdata.optimize (prepare_slimpajama.py): one int32 tensor per document, EOS last."""
    for text in file_texts(filepath):
        yield tokenizer.encode(text, bos=False, eos=True)  # litgpt's encode returns torch.tensor(ids, dtype=torch.int)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in this (fresh) process; times only the work itself."""
    kind, procs = spec["kind"], spec.get("procs", 1)
    from litliger.data import Tokenizer

    tokenizer = Tokenizer.from_dir(spec["tokenizer"])
    if kind == "limit":
        texts = [t for f in corpus_files(spec["corpus"]) for t in file_texts(f)]
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(texts), BATCH_DOCS):
            encodings = tokenizer.backend.encode_batch_fast(texts[i : i + BATCH_DOCS], add_special_tokens=False)
            tokens += sum(map(len, encodings))
        return {"seconds": time.perf_counter() - start, "tokens": tokens + len(texts), "documents": len(texts)}
    if kind == "ours":
        from litliger.data import Corpus
        from litliger.recipes.prepare import main as prepare

        with contextlib.suppress(OSError):  # reset the peak RSS (ru_maxrss, VmHWM): count the preparation's alone
            Path("/proc/self/clear_refs").write_text("5")
        rss0, start = rss_bytes(), time.perf_counter()
        data = Corpus(path=spec["corpus"], text_key="text", val_split_fraction=0.0, num_proc=procs)
        result = prepare(data=data, out_dir=spec["out"], tokenizer_dir=Path(spec["tokenizer"]))
        seconds = time.perf_counter() - start
        meta = result if "tokens" in result else next(iter(result.values()))  # older main(): {out_dir: meta}
        return {
            "seconds": seconds, "tokens": sum(meta["tokens"].values()), "documents": sum(meta["documents"].values()),
            "units": meta["units"], "rss0": rss0, "peak": max_rss_bytes(),
            "workers_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        }  # fmt: skip
    if kind == "litgpt":
        from functools import partial

        from litdata import optimize
        from litdata.streaming import TokensLoader
        from litgpt.tokenizer import Tokenizer as LitGPTTokenizer

        from benchmarks.data import litgpt_tokenize as fn  # by module name: litdata's spawned workers import it

        lit = LitGPTTokenizer(spec["tokenizer"])
        start = time.perf_counter()
        optimize(
            fn=partial(fn, tokenizer=lit), inputs=corpus_files(spec["corpus"]), output_dir=spec["out"],
            num_workers=procs, chunk_size=LITGPT_CHUNK, item_loader=TokensLoader(),
        )  # fmt: skip
        seconds = time.perf_counter() - start
        chunks = json.loads((Path(spec["out"]) / "index.json").read_text())["chunks"]
        return {"seconds": seconds, "tokens": sum(c["dim"] for c in chunks)}
    if kind == "loader":
        return measure_loader(spec, tokenizer)
    raise ValueError(f"unknown measurement {kind!r}")


def measure_loader(spec: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    from litliger.data import Mixture, Source, TokenShards

    variant, (first, second) = spec["variant"], spec["shards"]
    start = time.perf_counter()
    if variant == "litdata":
        from litdata import StreamingDataLoader, StreamingDataset
        from litdata.streaming import TokensLoader

        dataset = StreamingDataset(f"{first}/train", item_loader=TokensLoader(block_size=BLOCK), shuffle=True)
        batches = iter(StreamingDataLoader(dataset, batch_size=BATCH))
    else:
        if variant == "mixture":
            data: Any = Mixture(sources=[Source("zst", first, 0.7), Source("parquet", second, 0.3)])
        else:
            data = TokenShards(first)
        data.connect(tokenizer, BATCH, BLOCK - 1)
        data.setup()
        batches = iter(data.train_dataloader())
    tokens = sum(next(batches).numel() for _ in range(spec["batches"]))
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


# ---------------------------------------------------------------- the parent: fresh processes, rows, tables


def table(head: list[str], rows: list[list[Any]], text_columns: int = 2) -> None:
    """A markdown table: the first ``text_columns`` columns left-aligned, the figures right-aligned."""
    rule = ["---" if i < text_columns else "---:" for i in range(len(head))]
    for row in [head, rule, *rows]:
        print("| " + " | ".join(map(str, row)) + " |")


def rate(r: dict[str, Any]) -> float:
    return r["tokens"] / r["seconds"]


def k(value: float) -> str:
    return f"{value / 1e3:,.0f}k"


class Bench:
    """The rows: every figure from a fresh ``python -m benchmarks.data --child SPEC`` (its log under --work)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.work, self.n = args, Path(args.work), args.procs
        lit = self.work / "litdata"
        self.env = {"LITLIGER_CACHE": str(self.work / "litliger"), "DATA_OPTIMIZER_CACHE_FOLDER": str(lit / "chunks"),
                    "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(lit / "data")}  # fmt: skip
        self.files = max(8, self.n)
        tag = f"{args.mb:g}MB-{self.files}f"
        self.gen = self.work / f"generated-v{_GEN_VERSION}"  # corpora and tokenizers, reused by reruns
        self.corpus, self.out = self.gen / "corpus" / tag, self.work / "out" / tag
        print(f"corpora and tokenizers: generated or reused under {self.work}", file=sys.stderr)
        self.manifest = write_corpus(self.corpus, FORMATS, args.mb, self.files, seed=1)
        self.mb = self.manifest["text_bytes"] / MB
        self.toks = train_tokenizers(self.gen, self.corpus, args.sample_mb)
        self.results: dict[str, Any] = {"args": vars(args), "manifest": self.manifest}

    def run(self, name: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
        """``spec`` measured in a fresh process, the RSS of its descendants sampled every 0.2 s meanwhile."""
        import psutil

        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        base = {n: v for n, v in os.environ.items() if n not in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
        seen: dict[int, list[int]] = {}  # worker pid -> [first sampled RSS, max sampled RSS]
        argv = module_argv("benchmarks.data", "--child", json.dumps(spec, default=str))
        print(f"  {name} ...", file=sys.stderr, flush=True)
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, env=child_env({**base, **self.env, **(env or {})}), stdout=out, stderr=out)
            parent = psutil.Process(proc.pid)
            while proc.poll() is None:
                with contextlib.suppress(psutil.Error):
                    for worker in parent.children(recursive=True):
                        with contextlib.suppress(psutil.Error):
                            rss = worker.memory_info().rss
                            entry = seen.setdefault(worker.pid, [rss, rss])
                            entry[1] = max(entry[1], rss)
                time.sleep(0.2)
        lines = log.read_text(errors="replace").splitlines()
        found = [line for line in lines if line.startswith("RESULT ")]
        if proc.returncode or not found:
            raise SystemExit(f"{name} failed (exit {proc.returncode}); the end of {log}:\n" + "\n".join(lines[-40:]))
        peaks = {"workers_sampled": max((top for _, top in seen.values()), default=0)}
        peaks["workers_growth"] = max((top - first for first, top in seen.values()), default=0)
        return {**json.loads(found[-1][len("RESULT ") :]), **peaks}

    def ours(
        self, name: str, corpus: Path, tokenizer: Path, out: Path, procs: int, keep: bool = False, kind: str = "ours"
    ) -> dict:
        """OURS (or ``kind`` "litgpt") into a fresh ``out``, removed afterwards unless ``keep``."""
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        result = self.run(name, {"kind": kind, "corpus": corpus, "tokenizer": tokenizer, "out": out, "procs": procs})
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
        return result

    def prepare(self) -> None:
        rows, notes, found, n = [], [], [], self.n
        for fmt in FORMATS:
            for tname, tok in self.toks.items():
                key, folder = f"{fmt}-{VOCABS[tname]}", self.corpus / fmt
                threads = {"RAYON_NUM_THREADS": str(n), "TOKENIZERS_PARALLELISM": "true"}
                limit = self.run(f"limit-{key}", {"kind": "limit", "corpus": folder, "tokenizer": tok}, threads)
                ours = self.ours(f"ours-{key}", folder, tok, self.out / key, n, keep=tname == "debug BPE")
                lit = self.ours(f"litgpt-{key}", folder, tok, self.out / f"litgpt-{key}", n, kind="litgpt")
                if not limit["tokens"] == ours["tokens"] == lit["tokens"]:
                    notes.append(f"{key}: token counts differ: {limit['tokens']} / {ours['tokens']} / {lit['tokens']}")
                rows.append([fmt, tname, f"{ours['tokens']:,}", k(rate(limit)), k(rate(ours)),
                             f"{self.mb / ours['seconds']:.1f}", f"{rate(ours) / rate(limit):.2f}x", k(rate(lit)),
                             f"{rate(ours) / rate(lit):.2f}x"])  # fmt: skip
                found.append({"format": fmt, "tokenizer": tname, "limit": limit, "ours": ours, "litgpt": lit})
        head = ["format", "tokenizer", "tokens", "LIMIT tok/s", "OURS tok/s", "OURS MB/s", "OURS / LIMIT"]
        table([*head, "LitGPT tok/s", "OURS / LitGPT"], rows)
        print(
            f"\nLIMIT:  Tokenizer.from_dir(TOK).backend.encode_batch_fast(texts[i:i+{BATCH_DOCS}], "
            f"add_special_tokens=False) over the texts in memory; RAYON_NUM_THREADS={n} TOKENIZERS_PARALLELISM=true"
        )
        print(f"OURS:   litliger prepare --data litliger.data.Corpus --data.path {self.corpus}/FORMAT --data.text_key "
              f"text --data.val_split_fraction 0 --data.num_proc {n} --tokenizer_dir TOK --out_dir OUT")  # fmt: skip
        print(f"LitGPT: litdata.optimize(fn=partial(litgpt_tokenize, tokenizer=litgpt.tokenizer.Tokenizer(TOK)), "
              f"inputs=FILES, output_dir=OUT, num_workers={n}, chunk_size=2049*8012, item_loader=TokensLoader()); "
              "fn yields tokenizer.encode(text, bos=False, eos=True) per document, read line by line with json.loads "
              "(zstd) or with pyarrow iter_batches (parquet); litgpt's own Tokenizer loads our folder; litdata's "
              "default (spawn) workers")  # fmt: skip
        for note in notes:
            print(f"NOTE (LIMIT / OURS / LitGPT): {note}")
        zst = next(r["ours"] for r in found if r["format"] == "jsonl.zst" and r["tokenizer"] == "32k BPE")
        per_core = rate(zst) / n
        self.results |= {"prepare": found, "per_core_tokens_per_s": per_core}
        print(f"\nOURS per process (32k BPE, jsonl.zst, {n} processes on {n} cores): {k(per_core)} tokens/s -> 20B "
              f"tokens on a 64-core node in {20e9 / (per_core * 64) / 3600:.1f} h (linear scaling)\n")  # fmt: skip

    def scaling(self) -> None:
        plain = self.gen / "corpus" / f"{self.args.mb:g}MB-single"
        mb = write_corpus(plain, ("jsonl",), self.args.mb, 1, seed=2)["text_bytes"] / MB
        found, rows = [], []
        for procs in dict.fromkeys((1, self.n)):
            r = self.ours(f"scaling-{procs}", plain / "jsonl", self.toks["32k BPE"], self.out / "single", procs)
            found.append(r)
            rows.append([f"1 x {mb:,.0f} MB .jsonl", "32k BPE", procs, f"{r['seconds']:.1f}", k(rate(r)),
                         f"{mb / r['seconds']:.1f}", f"{found[0]['seconds'] / r['seconds']:.2f}x"])  # fmt: skip
        table(["corpus", "tokenizer", "num_proc", "seconds", "tokens/s", "MB/s", "speed-up"], rows)
        print(f"\nOURS as above on --data.path {plain / 'jsonl'} with --data.num_proc 1 and {self.n}\n")
        self.results["scaling"] = found

    def loader(self) -> None:
        shards = []
        for fmt in FORMATS:
            folder, tok = self.out / f"{fmt}-{VOCABS['debug BPE']}", self.toks["debug BPE"]
            if not (folder / "litliger.json").is_file():
                self.ours(f"ours-{fmt}-for-loader", self.corpus / fmt, tok, folder, self.n, keep=True)
            shards.append(str(folder))
        chunks = json.loads((Path(shards[0]) / "train" / "index.json").read_text())["chunks"]
        batches = min(self.args.batches, sum(c["dim"] // BLOCK for c in chunks) // BATCH)
        found = {}
        for variant in ("tokenshards", "mixture", "litdata"):  # plain litdata last: it may evict "cached" chunks
            spec = {"kind": "loader", "variant": variant, "shards": shards, "batches": batches}
            found[variant] = self.run(f"loader-{variant}", {**spec, "tokenizer": self.toks["debug BPE"]})
        labels = {"litdata": "plain litdata StreamingDataset + StreamingDataLoader", "mixture":
                  "litliger Mixture (jsonl.zst 0.7 + parquet 0.3)", "tokenshards": "litliger TokenShards"}  # fmt: skip
        rows = [[labels[v], batches, f"{found[v]['seconds']:.2f}", k(rate(found[v])),
                 f"{rate(found[v]) / rate(found['litdata']):.2f}x"] for v in labels]  # fmt: skip
        table(["loader (shards: OURS, jsonl.zst, debug BPE)", "batches", "seconds", "tokens/s", "vs plain"], rows, 1)
        print(f"\nplain: StreamingDataset(SHARDS/train, item_loader=TokensLoader(block_size={BLOCK}), shuffle=True) in "
              f"StreamingDataLoader(batch_size={BATCH}); litliger: connect(tokenizer, {BATCH}, {BLOCK - 1}), setup(), "
              "iter(train_dataloader()); timed from the dataset's construction (first batches included)")  # fmt: skip
        from litliger.data.shards import split_complete

        if not all(split_complete(Path(s) / "train") for s in shards):
            print("NOTE: chunk files of the shards went missing while the loaders ran (evicted by litdata?)")
        print()
        self.results["loader"] = found

    def rss(self) -> None:
        one = self.gen / "corpus" / f"rss-{self.args.rss_mb:g}MB"
        write_corpus(one, ("jsonl.zst",), self.args.rss_mb, 4, seed=3)
        ten = repeat_corpus(one, self.gen / "corpus" / f"rss-{self.args.rss_mb:g}MB-x10", 10)
        found, rows = {}, []
        for label, root in (("1x", one), ("10x", ten)):
            mb = json.loads((root / "manifest.json").read_text())["text_bytes"] / MB
            r = self.ours(f"rss-{label}", root / "jsonl.zst", self.toks["32k BPE"], self.out / "rss", self.n)
            workers = max(r["workers_peak"], r["workers_sampled"])
            figures = (r["rss0"], r["peak"] - r["rss0"], workers, r["workers_growth"])
            rows.append([label, f"{mb:,.1f}", self.n, r["units"], *(f"{x / MIB:,.0f}" for x in figures)])  # fmt: skip
            found[label] = r
        head = ["corpus (jsonl.zst, 32k BPE)", "MB", "num_proc", "units", "baseline MiB", "parent: peak - baseline MiB"]
        table([*head, "worker peak MiB", "worker growth MiB"], rows, 1)
        print(f"\nOURS as above on --data.path {one}/jsonl.zst and {ten}/jsonl.zst, --data.num_proc {self.n}")
        print("baseline: the preparing process's RSS after imports and the tokenizer's load; parent peak: its "
              "ru_maxrss, reset at the baseline; worker peak: max of psutil samples (every 0.2 s) and getrusage("
              "RUSAGE_CHILDREN); worker growth: a worker's max sample minus its first (forked workers share the "
              "parent's pages, count only those they touch). 10x: each 1x file's zstd frame 10 times\n")  # fmt: skip
        self.results["rss"] = found


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--mb", type=float, default=100, help="MB of text per format, and of the single .jsonl")
    parser.add_argument("--procs", type=int, default=cores, help="processes / threads N (default: every core)")
    parser.add_argument("--work", default="/tmp/litliger-bench-data", help="corpora, tokenizers, outputs, logs")
    parser.add_argument("--rss_mb", type=float, default=20, help="MB of the rss row's 1x corpus (10x: ten times it)")
    parser.add_argument("--sample_mb", type=float, default=8, help="MB of text the tokenizers are trained on")
    parser.add_argument("--batches", type=int, default=2000, help="loader row: batches (at most one epoch)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (~4 MB): a smoke test")
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma list of rows: {', '.join(ROWS)}")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print("\nRESULT " + json.dumps(measure(json.loads(args.child))), flush=True)
        return
    if args.quick:
        args.mb, args.rss_mb, args.sample_mb, args.batches = 4, 1, 1, 100
    rows = [r.strip() for r in args.only.split(",") if r.strip()]
    if unknown := sorted(set(rows) - set(ROWS)):
        parser.error(f"unknown row {unknown[0]!r} in --only; choose from {', '.join(ROWS)}")
    bench = Bench(args)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    libs = ", ".join(f"{p} {version(p)}" for p in ("tokenizers", "litdata", "pyarrow", "zstandard", "litgpt"))
    print(f"\nMachine: {cpu}, {os.cpu_count()} cores ({cores} usable), N = {args.procs}; Python "
          f"{sys.version.split()[0]}, {libs}")  # fmt: skip
    print(f"Corpus: {bench.mb:,.1f} MB of text (MB below: of text), {bench.manifest['documents']:,} documents, "
          f"{bench.files} files per format, in {bench.corpus}\n")  # fmt: skip
    for row in (r for r in ROWS if r in rows):
        getattr(bench, row)()
    (bench.work / "results.json").write_text(json.dumps(bench.results, indent=2, default=str) + "\n")
    print(f"wrote {bench.work / 'results.json'} (the logs of every measurement in {bench.work / 'logs'})")


if __name__ == "__main__":
    main()
