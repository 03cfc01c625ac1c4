"""Prepared shards in object storage, end to end against a real S3-protocol server (moto over TLS): ``litliger
prepare`` to ``s3://``, pretraining that streams from it and resumes bitwise, a server restart in the middle of an
epoch, and an unreachable remote as one line."""

import json
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from s3_server import s3_server_fixture  # noqa: F401  (the fixture named "s3_server")
from test_prepare import WORDS, run
from test_pretrain import assert_same_weights, losses

from litliger.cli import main as cli_main
from litliger.data import Corpus, Tokenizer, TokenShards
from litliger.recipes.prepare import main as prepare

pytestmark = pytest.mark.slow


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))
    rng = random.Random(1)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for f in range(2):
        lines = [json.dumps({"text": f"{f}.{i} " + " ".join(rng.choices(WORDS, k=30))}) for i in range(120)]
        (folder / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def bucket(server, name: str) -> str:
    if name not in {b["Name"] for b in server.client().list_buckets()["Buckets"]}:
        server.make_bucket(name)
    return name


def tokenizer_dir(tmp_path: Path, corpus: Path) -> Path:
    texts = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl")) for line in f.read_text().splitlines()]
    Tokenizer.train_bpe([], 300, texts=lambda: iter(texts), identity="remote", use_cache=False).save(tmp_path / "tok")
    return tmp_path / "tok"


def test_prepare_to_s3_then_train_streaming_and_resume_bitwise(s3_server, tmp_path, corpus):
    url = f"s3://{bucket(s3_server, 'corpus')}/x"
    meta = prepare(
        data=Corpus(corpus, val_split_fraction=0.1), out_dir=url, tokenizer_dir=tokenizer_dir(tmp_path, corpus)
    )
    names = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket="corpus", Prefix="x/")["Contents"]}
    assert {"x/litliger.json", "x/train/index.json", "x/val/index.json", "x/tokenizer/tokenizer.json"} <= names
    assert meta["documents"]["train"] + meta["documents"]["val"] == 240

    def shards(cache: str) -> TokenShards:
        return TokenShards(url, cache_dir=str(tmp_path / cache), max_cache_size="1GB")

    run(tmp_path / "s", shards("cache-s"), steps=5, save_interval=2)  # the tokenizer saved with the shards
    run(tmp_path / "r", shards("cache-r"), steps=5, resume=tmp_path / "s" / "step-00000002")
    a, b = losses(tmp_path / "s"), losses(tmp_path / "r")
    assert sorted(a) == [1, 2, 3, 4, 5] and sorted(b) == [3, 4, 5] and all(a[s] == b[s] for s in b)
    assert_same_weights(tmp_path / "s" / "final", tmp_path / "r" / "final")
    assert list((tmp_path / "cache-s").rglob("chunk-*.bin"))  # streamed through the local cache


def test_training_stream_survives_a_server_restart_mid_epoch(s3_server, tmp_path, corpus, monkeypatch):
    monkeypatch.setattr("litliger.data.shards.CHUNK_TOKENS", 64)  # many small chunks: some are fetched after the outage
    monkeypatch.setattr("litliger.recipes.prepare.CHUNK_TOKENS", 64)
    local = tmp_path / "local"
    tok_dir = tokenizer_dir(tmp_path, corpus)
    prepare(data=Corpus(corpus, val_split_fraction=0.0), out_dir=str(local), tokenizer_dir=tok_dir)
    url = f"s3://{bucket(s3_server, 'restart')}/x"
    prepare(data=Corpus(corpus, val_split_fraction=0.0), out_dir=url, tokenizer_dir=tok_dir)
    tok = Tokenizer.from_dir(tok_dir)

    def come_back(prepared) -> None:
        back_at.append(time.monotonic())
        s3_server.start(prepared=prepared)

    def batches(path: str, cache: str, restart_after: int | None = None) -> list[torch.Tensor]:
        """One epoch of batches (the whole epoch is read: the test compares it with the local one)."""
        data = TokenShards(path, cache_dir=str(tmp_path / cache))
        data.connect(tok, 2, 16)
        data.setup()
        out = []
        for i, batch in enumerate(data.train_dataloader()):
            out.append(batch)
            if i == restart_after:  # down for 1.5 s while batches are read: the chunks they need wait for it
                prepared = s3_server.prepare(preload=s3_server.snapshot())  # a new server holding the same objects
                s3_server.stop()
                down_at.append(time.monotonic())
                threading.Timer(1.5, come_back, args=(prepared,)).start()
        return out

    down_at, back_at = [], []
    expected = batches(str(local), "cache-local")
    chunks = len(json.loads((local / "train" / "index.json").read_text())["chunks"])
    assert chunks > 40  # litdata prefetches at most 32 chunks ahead: later ones are fetched after the restart
    got = batches(url, "cache-remote", restart_after=2)
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert back_at and back_at[0] - down_at[0] >= 1.5  # it really was down, and the epoch finished after it came back


def test_an_unreachable_remote_is_one_line(s3_server, tmp_path, corpus, capsys):
    endpoint = s3_server.endpoint.rsplit(":", 1)[0] + ":1"  # nothing listens on port 1
    argv = [
        "prepare", "--data", "litliger.data.Corpus", "--data.path", str(corpus), "--out_dir", "s3://nowhere/x",
        "--tokenizer_dir", str(tokenizer_dir(tmp_path, corpus)),
        "--storage_options", json.dumps({"endpoint_url": endpoint}),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("litliger: error: cannot reach s3://nowhere/x at endpoint "), err
    assert endpoint in err[0] and "'nowhere'" in err[0]
