"""``litliger prepare`` and ``TokenShards``: one output for every sequence length, the same shards from 1 or 2 machines,
LitGPT's shards read as they are, and training on prepared shards resumes bitwise."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pretrain import assert_same_weights, losses, tiny_config

from litliger.data import Corpus, Mixture, Tokenizer, TokenShards
from litliger.engine import EvalArgs, OptimizerArgs, TrainArgs
from litliger.recipes.prepare import main as prepare
from litliger.recipes.pretrain import setup

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()  # noqa: SIM905


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rng = random.Random(0)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for f in range(3):
        lines = [json.dumps({"text": f"{f}.{i} " + " ".join(rng.choices(WORDS, k=30))}) for i in range(80)]
        (folder / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def tokenizer_dir(tmp_path: Path, corpus: Path) -> Path:
    texts = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl")) for line in f.read_text().splitlines()]
    tok = Tokenizer.train_bpe([], 300, texts=lambda: iter(texts), identity="prepare-test", use_cache=False)
    tok.save(tmp_path / "tok")
    return tmp_path / "tok"


def stream(folder: Path) -> np.ndarray:
    """The token stream of a prepared split, chunk files in index order (12-byte header, then uint16 ids)."""
    index = json.loads((folder / "index.json").read_text())
    return np.concatenate([np.fromfile(folder / c["filename"], dtype=np.uint16, offset=12) for c in index["chunks"]])


def test_prepare_writes_block_independent_shards_that_litdata_and_token_shards_read(tmp_path, corpus, tokenizer_dir):
    out = tmp_path / "shards"
    meta = prepare(data=Corpus(corpus, val_split_fraction=0.1), out_dir=str(out), tokenizer_dir=tokenizer_dir)
    assert {p.name for p in out.iterdir()} == {"train", "val", "tokenizer", "litliger.json"}
    assert meta["documents"]["train"] + meta["documents"]["val"] == 240 and meta["tokens"]["val"] > 0
    tok = Tokenizer.from_dir(tokenizer_dir)
    for seq in (8, 24):  # one preparation, any block size
        data = TokenShards(str(out))
        data.connect(tok, 2, seq)
        data.setup()
        batch = next(iter(data.train_dataloader()))
        assert batch.shape == (2, seq + 1) and batch.dtype == torch.int64
        assert next(iter(data.val_dataloader())).shape[1] == seq + 1
    again = prepare(data=Corpus(corpus, val_split_fraction=0.1), out_dir=str(out), tokenizer_dir=tokenizer_dir)
    assert again == meta  # already prepared: nothing is redone
    with pytest.raises(ValueError, match=r"output folder .* is not empty"):
        prepare(data=Corpus(corpus, val_split_fraction=0.2), out_dir=str(out), tokenizer_dir=tokenizer_dir)
    assert TokenShards(str(out)).train_tokenizer(0).fingerprint == tok.fingerprint  # the saved tokenizer


def test_two_machines_prepare_the_same_output_as_one(tmp_path, corpus, tokenizer_dir, monkeypatch):
    import litliger.data.shards as shards

    monkeypatch.setattr("litliger.data.corpus.unit_target", lambda total: 4000)  # several units per file
    monkeypatch.setattr("litliger.recipes.prepare.unit_target", lambda total: 4000)
    one = tmp_path / "one"
    prepare(data=Corpus(corpus), out_dir=str(one), tokenizer_dir=tokenizer_dir, num_proc=2)
    two = tmp_path / "two"
    for rank in (1, 0):  # in any order; the one that finds every part written merges
        prepare(data=Corpus(corpus), out_dir=str(two), tokenizer_dir=tokenizer_dir, num_nodes=2, node_rank=rank)
        if rank == 1:
            assert not (two / "train" / "index.json").exists()  # incomplete: no index, nothing reads it
    for split in ("train", "val"):
        assert (one / split / "index.json").read_text() == (two / split / "index.json").read_text()
        assert np.array_equal(stream(one / split), stream(two / split))
    assert len(json.loads((one / "train" / "index.json").read_text())["chunks"]) > 3
    meta = json.loads((two / "litliger.json").read_text())
    assert meta["num_nodes"] == 2 and meta["documents"]["train"] + meta["documents"]["val"] == 240
    assert shards.SHARDS_FORMAT == meta["format"]


def test_prepare_errors(tmp_path, corpus, tokenizer_dir):
    with pytest.raises(ValueError, match=r"no tokenizer, in --tokenizer_dir; .*--vocab_size"):
        prepare(data=Corpus(corpus), out_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"node_rank=2 is not in \[0, 2\)"):
        prepare(data=Corpus(corpus), out_dir=str(tmp_path / "o"), tokenizer_dir=tokenizer_dir, num_nodes=2, node_rank=2)
    with pytest.raises(ValueError, match=r"reads a corpus .* got TokenShards"):
        prepare(data=TokenShards(str(tmp_path)), out_dir=str(tmp_path / "o"), tokenizer_dir=tokenizer_dir)
    with pytest.raises(ValueError, match=r"output folder .* is inside the input"):
        prepare(data=Corpus(corpus), out_dir=str(corpus / "out"), tokenizer_dir=tokenizer_dir)
    with pytest.raises(FileNotFoundError, match=r"no prepared shards in .*: it holds neither index.json"):
        TokenShards(str(corpus)).layout()
    assert not (tmp_path / "o").exists()


def test_token_shards_read_litgpt_prepared_shards(tmp_path, corpus, tokenizer_dir):
    """LitGPT's preparation: litdata optimize over files, a per-document encode with EOS, TokensLoader chunks."""
    from litdata import optimize
    from litdata.streaming.item_loader import TokensLoader

    tok = Tokenizer.from_dir(tokenizer_dir)
    files = sorted(str(f) for f in corpus.glob("*.jsonl"))
    optimize(
        fn=_litgpt_style_tokenize, inputs=[(f, str(tokenizer_dir)) for f in files], output_dir=str(tmp_path / "litgpt"),
        num_workers=1, chunk_size=(17 * 64), item_loader=TokensLoader(), verbose=False,
    )  # fmt: skip
    data = TokenShards(str(tmp_path / "litgpt"))
    data.connect(tok, 4, 16)
    data.setup()
    rows = [r for b in data.train_dataloader() for r in b]
    docs = [json.loads(line)["text"] for f in files for line in Path(f).read_text().splitlines()]
    expected = [i for doc in docs for i in tok.encode(doc, eos=True)]
    windows = {tuple(expected[i : i + 17]) for i in range(len(expected) - 16)}  # blocks restart at every chunk
    assert len(rows) > 40 and all(tuple(r.tolist()) in windows for r in rows)
    assert data.val_dataloader() is None


def _litgpt_style_tokenize(item):
    filename, tokenizer_dir = item
    tok = Tokenizer.from_dir(tokenizer_dir)
    for line in Path(filename).read_text().splitlines():
        yield torch.tensor(tok.encode(json.loads(line)["text"], eos=True), dtype=torch.int)


def run(out: Path, data, *, steps: int, resume=False, save_interval=None, tokenizer_dir=None) -> Path:
    train = TrainArgs(
        global_batch_size=4, micro_batch_size=2, max_seq_length=16, max_steps=steps, lr_warmup_steps=2,
        min_lr=1e-4, save_interval=save_interval, log_interval=1,
    )  # fmt: skip
    return setup(
        model_config=tiny_config(), out_dir=out, accelerator="cpu", data=data, train=train,
        eval=EvalArgs(interval=None, max_iters=2, final_validation=True), optimizer=OptimizerArgs(lr=1e-2),
        resume=resume, seed=1, tokenizer_dir=tokenizer_dir,
    )  # fmt: skip


def test_pretrain_on_prepared_shards_and_resume_bitwise(tmp_path, corpus, tokenizer_dir):
    out = tmp_path / "shards"
    prepare(data=Corpus(corpus, val_split_fraction=0.1), out_dir=str(out), tokenizer_dir=tokenizer_dir)
    run(tmp_path / "s", TokenShards(str(out)), steps=6, save_interval=3)  # the shards' own tokenizer
    run(tmp_path / "r", TokenShards(str(out)), steps=6, resume=tmp_path / "s" / "step-00000003")
    a, b = losses(tmp_path / "s"), losses(tmp_path / "r")
    assert sorted(b) == [4, 5, 6] and all(a[s] == b[s] for s in b)
    assert_same_weights(tmp_path / "s" / "final", tmp_path / "r" / "final")
    # a Mixture source may be prepared shards; another tokenizer than the shards' is refused
    mixed = Mixture(sources=[{"name": "shards", "path": str(out), "weight": 1.0}])
    run(tmp_path / "m", mixed, steps=2)
    other = tmp_path / "other_tok"
    Tokenizer.train_bpe([], 280, texts=lambda: iter(WORDS * 20), identity="other", use_cache=False).save(other)
    with pytest.raises(ValueError, match=r"prepared with another tokenizer"):
        run(tmp_path / "x", TokenShards(str(out)), steps=2, tokenizer_dir=other)
