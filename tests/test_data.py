"""Data modules: tokenized batches, splits, the hash-keyed cache, exact resume, the stdlib corpus, errors."""

import ast
import json
import multiprocessing
import os
import random
import shutil
import socket
from pathlib import Path

import pytest
import torch

import litliger.data.corpus as corpus
from litliger.data import PythonStdlib, TextFiles, Tokenizer, infinite_batches

DATA_DIR = Path(__file__).resolve().parents[1] / "litliger" / "data"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))


def write_corpus(folder: Path, n: int, seed: int = 0, words: tuple[int, int] = (20, 60)) -> list[Path]:
    """`n` distinct documents of random words (some non-ASCII), one per file, in nested folders."""
    rng = random.Random(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "ēta", "θeta", "iota", "kappa", "lambda", "mu"]
    files = []
    for i in range(n):
        f = folder / f"part{i % 3}" / f"doc{i:02d}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"doc {i}: " + " ".join(rng.choices(vocab, k=rng.randint(*words))) + "\n", encoding="utf-8")
        files.append(f)
    return sorted(files, key=lambda f: f.relative_to(folder).as_posix())


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.train_bpe(write_corpus(tmp_path_factory.mktemp("tok"), 12), 300, use_cache=False)


def prepared(tok: Tokenizer, root: Path, batch_size: int = 3, max_seq_length: int = 16, **kwargs) -> TextFiles:
    data = TextFiles(root, **kwargs)
    data.connect(tok, batch_size, max_seq_length)
    data.prepare_data()
    data.setup()
    return data


def entries(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "data").iterdir())


def test_batches_are_blocks_of_the_eos_separated_documents(tok: Tokenizer, tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "c", 40, words=(2, 6))
    data = prepared(tok, tmp_path / "c", batch_size=4, max_seq_length=32, val_split_fraction=0.0)
    batches = list(data.train_dataloader())  # one epoch
    assert len(batches) >= 3 and all(b.shape == (4, 33) and b.dtype == torch.int64 for b in batches)

    # The corpus is one stream: each file's ids, then EOS, in path order; samples are its 33-token blocks.
    stream = [i for f in files for i in tok.encode(f.read_text(encoding="utf-8"), eos=True)]
    blocks = [tuple(stream[i : i + 33]) for i in range(0, len(stream) - 32, 33)]
    rows = [tuple(r.tolist()) for b in batches for r in b]
    assert len(set(rows)) == len(rows) == len(blocks) // 4 * 4  # each block at most once, only full batches
    assert set(rows) <= set(blocks)
    assert rows != blocks[: len(rows)]  # shuffled

    texts = {f.read_text(encoding="utf-8") for f in files}
    whole = [p for row in rows for p in tok.decode(list(row)).split("<|endoftext|>")[1:-1]]
    assert whole and all(p in texts for p in whole)  # text between two EOS is exactly one document
    (meta,) = (tmp_path / "cache" / "data").glob("corpus-*/litliger.json")
    assert json.loads(meta.read_text())["dtype"] == "uint16"


def test_held_out_files_are_deterministic_and_disjoint(tok: Tokenizer, tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", 20)
    a = TextFiles(tmp_path / "c", val_split_fraction=0.2).documents()
    b = TextFiles(tmp_path / "c", val_split_fraction=0.2).documents()
    train, val = [d.name for d in a["train"]], [d.name for d in a["val"]]
    assert val == [d.name for d in b["val"]] and len(val) == 4
    assert not set(train) & set(val) and len(train) + len(val) == 20
    assert len(TextFiles(tmp_path / "c", val_split_fraction=0.001).documents()["val"]) == 1  # at least one
    assert TextFiles(tmp_path / "c", val_split_fraction=0.2).training_files() == [tmp_path / "c" / n for n in train]

    data = prepared(tok, tmp_path / "c", batch_size=2, val_split_fraction=0.2)
    val_loader = data.val_dataloader()
    first = list(val_loader)
    next(iter(val_loader))  # an evaluation cut short (eval.max_iters) must not shift the next one
    again = list(val_loader)
    assert first and all(torch.equal(x, y) for x, y in zip(first, again, strict=True))  # not shuffled
    assert first[0].dtype == torch.int64 and first[0].shape[1] == 17
    train_rows = {tuple(r.tolist()) for b in data.train_dataloader() for r in b}
    assert not train_rows & {tuple(r.tolist()) for b in first for r in b}


def test_single_file_splits_at_a_line_boundary(tok: Tokenizer, tmp_path: Path) -> None:
    lines = [f"line {i} " + "kappa lambda " * (i % 7) for i in range(200)]
    corpus = tmp_path / "one.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = prepared(tok, corpus, val_split_fraction=0.25)
    (train,), (val,) = data.documents()["train"], data.documents()["val"]
    raw = corpus.read_bytes()
    assert (train.start, train.end, val.start, val.end) == (0, val.start, train.end, len(raw))
    assert raw[val.start - 1 : val.start] == b"\n" and 0.7 < train.end / len(raw) < 0.8
    assert raw[train.start : train.end] + raw[val.start : val.end] == raw
    assert next(iter(data.train_dataloader())).shape == (3, 17) and next(iter(data.val_dataloader())).shape[1] == 17


def test_explicit_val_folder(tok: Tokenizer, tmp_path: Path) -> None:
    write_corpus(tmp_path / "train", 6)
    write_corpus(tmp_path / "val", 3, seed=1)
    data = TextFiles(tmp_path / "train", val_data_path=tmp_path / "val")
    assert [d.path.parent.parent for d in data.documents()["val"]] == [tmp_path / "val"] * 3
    assert len(data.documents()["train"]) == 6


def test_cache_is_reused_and_keyed_by_content(tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_run_units = corpus.run_units
    monkeypatch.setattr(corpus, "run_units", lambda *a, **kw: (calls.append(1), real_run_units(*a, **kw))[1])
    files = write_corpus(tmp_path / "c", 6)
    prepared(tok, tmp_path / "c", val_split_fraction=0.0)
    (entry,) = entries(tmp_path)
    mtime = (entry / "train" / "index.json").stat().st_mtime_ns
    prepared(tok, tmp_path / "c", val_split_fraction=0.0)
    assert len(calls) == 1 and (entry / "train" / "index.json").stat().st_mtime_ns == mtime  # reused

    shutil.copytree(tmp_path / "c", tmp_path / "moved")
    prepared(tok, tmp_path / "moved", val_split_fraction=0.0)
    assert len(calls) == 1  # same names and contents elsewhere: same entry

    prepared(tok, tmp_path / "c", max_seq_length=8, val_split_fraction=0.0)
    assert len(calls) == 1  # one token stream serves every sample length
    files[0].write_text("doc 0: changed content\n", encoding="utf-8")
    prepared(tok, tmp_path / "c", val_split_fraction=0.0)
    assert len(calls) == 2  # content is in the key
    other = Tokenizer.train_bpe(files, 280, use_cache=False)
    data = TextFiles(tmp_path / "c", val_split_fraction=0.0)
    data.connect(other, 3, 16)
    data.prepare_data()
    assert len(calls) == 3  # the tokenizer is in the key
    assert len(entries(tmp_path)) == 3

    # An entry that lost a chunk file is rebuilt rather than trusted.
    next((entry / "train").glob("chunk-*.bin")).unlink()
    prepared(tok, tmp_path / "moved", val_split_fraction=0.0)
    assert len(calls) == 4 and len(list((entry / "train").glob("chunk-*.bin"))) > 0


def test_interrupted_preparation_leaves_no_entry(
    tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_corpus(tmp_path / "c", 6)

    def killed(units, out_dir: Path, **kw) -> None:
        (out_dir / "train").mkdir()
        (out_dir / "train" / "index.json").write_text("{}")  # half-written output
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus, "run_units", killed)
    data = TextFiles(tmp_path / "c", val_split_fraction=0.0)
    data.connect(tok, 3, 16)
    with pytest.raises(KeyboardInterrupt):
        data.prepare_data()
    assert entries(tmp_path) == []  # neither an entry nor a temporary folder
    with pytest.raises(FileNotFoundError, match=r"call prepare_data\(\)"):
        data.setup()
    monkeypatch.undo()
    data.prepare_data()
    data.setup()
    assert next(iter(data.train_dataloader())).shape == (3, 17)


def run(make_data, steps: int, cuts: set[int] = frozenset()) -> list[torch.Tensor]:
    """`steps` batches, rebuilding data module and loader from a (JSON round-tripped) state at each cut.

    Each cut restores twice, saving again before the first batch, as a run that resumes and checkpoints
    at once would: the state must survive that unchanged.
    """
    loader = make_data().train_dataloader()
    batches = infinite_batches(loader)
    out = []
    for step in range(steps):
        if step in cuts:
            batches.close()
            for _ in range(2):
                state = json.loads(json.dumps(loader.state_dict()))
                loader = make_data().train_dataloader()
                loader.load_state_dict(state)
            batches = infinite_batches(loader)
        out.append(next(batches))
    batches.close()
    return out


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_exact_resume_across_epochs(tok: Tokenizer, tmp_path: Path, num_workers: int) -> None:
    write_corpus(tmp_path / "c", 12)

    def make_data() -> TextFiles:
        return prepared(tok, tmp_path / "c", val_split_fraction=0.0, num_workers=num_workers)

    per_epoch = len(make_data().train_dataloader())
    assert 8 <= per_epoch <= 30
    steps = 2 * per_epoch + 3
    straight = run(make_data, steps)
    epochs = [torch.cat(straight[e * per_epoch : (e + 1) * per_epoch]) for e in range(2)]
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch...
    assert sorted(epochs[0].tolist()) == sorted(epochs[1].tolist())  # ...over the same samples

    e = per_epoch
    if num_workers == 0:  # cheap: every single cut, plus repeated cuts
        cut_sets = [{c} for c in range(1, steps)] + [{2, e + 1, e + 2}, {e - 1, e, e + 4, 2 * e}]
    else:  # each epoch forks workers: both worker parities, the epoch boundary, a second resume in a resumed epoch
        cut_sets = [{2}, {3}, {e - 1}, {e}, {e + 1, e + 4}, {2 * e}]
    for cuts in cut_sets:
        resumed = run(make_data, steps, cuts)
        same = [torch.equal(a, b) for a, b in zip(straight, resumed, strict=True)]
        assert all(same), f"cuts {sorted(cuts)}: first differing step {same.index(False)}"


def test_resume_checks_settings(tok: Tokenizer, tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", 12)
    loader = prepared(tok, tmp_path / "c", val_split_fraction=0.0).train_dataloader()
    batches = infinite_batches(loader)
    for _ in range(3):
        next(batches)
    state = loader.state_dict()
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 3)
    with pytest.raises(ValueError, match="batch_size=3, this run 2"):
        prepared(tok, tmp_path / "c", batch_size=2, val_split_fraction=0.0).train_dataloader().load_state_dict(state)
    with pytest.warns(UserWarning, match="seed"):
        prepared(tok, tmp_path / "c", seed=7, val_split_fraction=0.0).train_dataloader().load_state_dict(state)
    with pytest.raises(ValueError, match="Not a litliger loader state"):
        loader.load_state_dict({"current_epoch": 1})


def _rank_main(rank: int, port: int, root: Path, tok: Tokenizer, results: multiprocessing.Queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:

        def make_data() -> TextFiles:
            data = TextFiles(root, val_split_fraction=0.1)
            data.connect(tok, 3, 16)
            if rank == 0:
                data.prepare_data()
            dist.barrier()
            data.setup()
            return data

        per_epoch = len(make_data().train_dataloader())
        straight = run(make_data, per_epoch + 2)
        exact = all(torch.equal(a, b) for a, b in zip(straight, run(make_data, per_epoch + 2, {3}), strict=True))
        rows = {tuple(r.tolist()) for b in straight[:per_epoch] for r in b}
        results.put((rank, per_epoch, len(make_data().val_dataloader()), exact, rows))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_get_equal_disjoint_shares(tok: Tokenizer, tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", 30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, tmp_path / "c", tok, results)) for r in range(2)]
    for p in procs:
        p.start()
    out = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    (_, n0, v0, exact0, rows0), (_, n1, v1, exact1, rows1) = out
    assert n0 == n1 > 0 and v0 == v1 > 0  # the same number of batches on every rank: no rank waits forever
    assert exact0 and exact1
    assert not rows0 & rows1  # each rank reads its own share


def test_infinite_batches_refuses_an_empty_loader() -> None:
    with pytest.raises(ValueError, match="no batch"):
        next(infinite_batches([]))


def test_errors_name_the_problem(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train_data_path: .*missing does not exist"):
        TextFiles(tmp_path / "missing").training_files()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("text, but not matching the glob")
    with pytest.raises(ValueError, match=r"No files matching '\*\*/\*\.txt' in .*empty"):
        TextFiles(tmp_path / "empty").training_files()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.txt").write_bytes(b"")
    (tmp_path / "bad" / "b.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"No text in .*bad.*empty or not UTF-8"):
        TextFiles(tmp_path / "bad").training_files()
    with pytest.raises(ValueError, match=r"val_split_fraction must be in \[0, 1\]"):
        TextFiles(tmp_path, val_split_fraction=1.5)  # 1.0 is allowed: all validation (for evaluate)
    with pytest.raises(RuntimeError, match=r"connect\(tokenizer"):
        TextFiles(tmp_path / "empty", glob="*.md").prepare_data()

    write_corpus(tmp_path / "small", 2, words=(3, 5))
    with pytest.raises(ValueError, match="shorter than one sample of max_seq_length \\+ 1 = 1025 tokens"):
        prepared(tok, tmp_path / "small", max_seq_length=1024, val_split_fraction=0.0)
    with pytest.raises(ValueError, match="no full batch of 64"):
        prepared(tok, tmp_path / "small", batch_size=64, max_seq_length=4, val_split_fraction=0.0).train_dataloader()
    with pytest.raises(ValueError, match="no line break"):
        (tmp_path / "line.txt").write_text("one long line without a break")
        TextFiles(tmp_path / "line.txt").training_files()


def test_python_stdlib_corpus(tok: Tokenizer) -> None:
    capped = PythonStdlib(max_bytes=150_000)
    docs = capped.documents()
    names = [d.name for split in ("train", "val") for d in docs[split]]
    assert names and all(n.endswith(".py") and "/" not in n for n in names)  # top-level modules come first
    assert sum(d.size for split in docs.values() for d in split) <= 150_000
    assert [d.name for d in PythonStdlib(max_bytes=150_000).documents()["val"]] == [d.name for d in docs["val"]]
    assert docs["val"] and not {d.name for d in docs["train"]} & {d.name for d in docs["val"]}

    full = [d.name for d in PythonStdlib().documents()["train"]]
    assert len(full) > 100 and any("/" in n for n in full)
    assert not [n for n in full if {"site-packages", "test", "tests"} & set(n.split("/")[:-1])]

    capped.connect(tok, batch_size=2, max_seq_length=32)
    capped.prepare_data()
    capped.setup()
    assert next(iter(capped.train_dataloader())).shape == (2, 33)


def test_data_layer_imports_no_model_engine_or_fabric() -> None:
    forbidden = ("litliger.model.gpt", "litliger.engine", "litliger.nn", "litliger.kernels", "lightning")
    for file in DATA_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not [m for m in modules if m.startswith(forbidden)], f"{file.name} imports {modules}"
