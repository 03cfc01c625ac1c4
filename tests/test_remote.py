"""litliger.data.remote against a real S3-protocol server (moto over TLS, see s3_server.py)."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import obstore
import pytest
from litdata import StreamingDataset, optimize
from litdata.streaming.item_loader import TokensLoader
from s3_server import S3Server, _free_port, s3_server_fixture  # noqa: F401  (the fixture named "s3_server")

from litliger.data import remote

BLOCK = 8
TOKENS_PER_CHUNK = 40  # 5 samples of BLOCK tokens per chunk


def _tokens(i: int):
    yield np.random.default_rng(i).integers(0, 60000, size=TOKENS_PER_CHUNK, dtype=np.uint16)


def _make_dataset(folder: Path, chunks: int) -> list[list[int]]:
    """A TokensLoader dataset of ``chunks`` one-item chunks written by litdata; returns its samples, read locally."""
    optimize(
        fn=_tokens,
        inputs=list(range(chunks)),
        output_dir=str(folder),
        chunk_size=TOKENS_PER_CHUNK,
        item_loader=TokensLoader(),
        num_workers=1,
        verbose=False,
        start_method="fork",
    )
    samples = [x.tolist() for x in StreamingDataset(str(folder), item_loader=TokensLoader(block_size=BLOCK))]
    assert len(samples) == chunks * TOKENS_PER_CHUNK // BLOCK
    return samples


def _bucket(server: S3Server, name: str) -> str:
    if name not in {b["Name"] for b in server.client().list_buckets()["Buckets"]}:
        server.make_bucket(name)
    return name


def test_is_remote():
    for url in ("s3://b/x", "gs://b", "az://c/p", "r2://b/p", "abfs://c@acct.dfs.core.windows.net/p"):
        assert remote.is_remote(url)
    for path in ("/data/x", "data/s3:/x", "file:///data/x", "C:\\data", Path("/x")):
        assert not remote.is_remote(path)


def test_upload_list_read_back(s3_server, tmp_path):
    bucket = _bucket(s3_server, "roundtrip")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "chunk-0.bin").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "train" / "index.json").write_text('{"chunks": []}')
    (tmp_path / "litliger.json").write_text('{"fingerprint": "abc"}')
    url = f"s3://{bucket}/runs/one"
    remote.upload_folder(tmp_path, url)

    assert remote.list_names(url) == ["litliger.json", "train/chunk-0.bin", "train/index.json"]
    assert remote.list_names(f"{url}/train") == ["chunk-0.bin", "index.json"]
    assert remote.list_names(f"s3://{bucket}/runs/none") == []
    remote.write_text(f"s3://{bucket}/runs/one2/x.txt", "sibling")  # shares the string prefix, not the folder
    assert "x.txt" not in remote.list_names(url) and remote.list_names(f"s3://{bucket}/runs/one2") == ["x.txt"]
    assert remote.read_text(f"{url}/litliger.json") == '{"fingerprint": "abc"}'
    assert remote.read_text(f"{url}/missing.json") is None
    # what boto3 sees is what was uploaded
    body = s3_server.client().get_object(Bucket=bucket, Key="runs/one/train/chunk-0.bin")["Body"].read()
    assert body == bytes(range(256)) * 40

    remote.write_text(f"{url}/note.txt", "héllo\n")
    assert remote.read_text(f"{url}/note.txt") == "héllo\n"
    remote.download_file(f"{url}/train/chunk-0.bin", tmp_path / "down" / "c.bin")
    assert (tmp_path / "down" / "c.bin").read_bytes() == bytes(range(256)) * 40
    with pytest.raises(FileNotFoundError):
        remote.download_file(f"{url}/nope.bin", tmp_path / "down" / "nope.bin")
    assert sorted(p.name for p in (tmp_path / "down").iterdir()) == ["c.bin"]  # no partial file left


def test_index_and_metadata_uploaded_last(s3_server, tmp_path, monkeypatch):
    bucket = _bucket(s3_server, "order")
    for split in ("train", "val"):
        for i in range(6):
            (tmp_path / split).mkdir(exist_ok=True)
            (tmp_path / split / f"chunk-{i}.bin").write_bytes(os.urandom(1000))
        (tmp_path / split / "index.json").write_text("{}")
    (tmp_path / "litliger.json").write_text("{}")

    events: list[tuple[str, float, float]] = []
    lock = threading.Lock()
    real_put = obstore.put

    def put(store, key, data, **kwargs):
        start = time.monotonic()
        time.sleep(0.01 if key.endswith(".bin") else 0)  # give a wrong order a chance to show
        result = real_put(store, key, data, **kwargs)
        with lock:
            events.append((key, start, time.monotonic()))
        return result

    monkeypatch.setattr(obstore, "put", put)
    remote.upload_folder(tmp_path, f"s3://{bucket}/ds", workers=4)

    assert len(events) == 15
    chunks = [e for e in events if e[0].endswith(".bin")]
    indexes = [e for e in events if e[0].endswith("index.json")]
    meta = [e for e in events if e[0].endswith("litliger.json")]
    assert len(chunks) == 12 and len(indexes) == 2 and len(meta) == 1
    assert max(end for _, _, end in chunks) <= min(start for _, start, _ in indexes)
    assert max(end for _, _, end in indexes) <= meta[0][1]
    assert len(remote.list_names(f"s3://{bucket}/ds")) == 15


def test_check_reachable(s3_server, monkeypatch):
    bucket = _bucket(s3_server, "reach")
    remote.check_reachable(f"s3://{bucket}/not/written/yet")  # an existing bucket is enough

    dead = f"https://127.0.0.1:{_free_port()}"
    for options in ({"endpoint_url": dead}, None):
        if options is None:  # the same endpoint through the environment only
            monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
        start = time.monotonic()
        with pytest.raises(ConnectionError) as info:
            remote.check_reachable(f"s3://{bucket}/x", options)
        message = str(info.value)
        assert time.monotonic() - start < 10
        assert "\n" not in message
        assert dead in message and f"'{bucket}'" in message and "connection refused" in message
        assert "AWS_ENDPOINT_URL" in message
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    with pytest.raises(TypeError):  # a key boto3 (so litdata) does not take is a configuration error, not a network one
        remote.check_reachable(f"s3://{bucket}/x", {"endpoint": s3_server.endpoint})

    with pytest.raises(ConnectionError) as info:
        remote.check_reachable("s3://no-such-bucket/x")
    message = str(info.value)
    assert s3_server.endpoint in message and "'no-such-bucket'" in message and "does not exist" in message


def test_explicit_storage_options_without_environment(s3_server, tmp_path, monkeypatch):
    """litdata's keys (boto3 client arguments) alone are enough: endpoint, credentials, region and CA bundle."""
    bucket = _bucket(s3_server, "explicit")
    for key in s3_server.env:
        monkeypatch.delenv(key)
    options = {
        "endpoint_url": s3_server.endpoint,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "region_name": "us-east-1",
        "verify": str(s3_server.ca_file),
    }
    (tmp_path / "a.txt").write_text("a")
    remote.check_reachable(f"s3://{bucket}/p", options)
    remote.upload_folder(tmp_path, f"s3://{bucket}/p", options)
    assert remote.list_names(f"s3://{bucket}/p", options) == ["a.txt"]
    assert remote.read_text(f"s3://{bucket}/p/a.txt", options) == "a"
    with pytest.raises(ConnectionError, match="TLS certificate"):  # without the CA the server is not trusted
        remote.check_reachable(f"s3://{bucket}/p", {k: v for k, v in options.items() if k != "verify"})


@pytest.mark.parametrize("explicit", [False, True], ids=["env", "storage_options"])
def test_stream_tokens_from_s3(s3_server, tmp_path, monkeypatch, explicit):
    bucket = _bucket(s3_server, "stream")
    options = {}
    if explicit:  # litdata's storage_options instead of the environment (its obstore still reads SSL_CERT_FILE)
        for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            monkeypatch.delenv(key)
        options = {
            "endpoint_url": s3_server.endpoint,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        }
    local = _make_dataset(tmp_path / "data", chunks=6)
    url = f"s3://{bucket}/{'opts' if explicit else 'env'}/train"
    remote.upload_folder(tmp_path / "data", url, options)
    assert remote.list_names(url, options)[-1] == "index.json"
    dataset = StreamingDataset(
        input_dir=url,
        item_loader=TokensLoader(block_size=BLOCK),
        storage_options=options,
        cache_dir=str(tmp_path / "cache"),
    )
    assert [x.tolist() for x in dataset] == local


def test_stream_survives_server_restart(s3_server, tmp_path):
    """Stop the server mid-epoch and start it again on the same port, with its objects (moto keeps them in memory,
    so the restart preloads a snapshot). Chunks not yet cached are fetched after the restart: obstore's retries
    (10, exponential backoff, a few seconds in all) ride out the outage and the epoch ends with the same samples."""
    bucket = _bucket(s3_server, "restart")
    chunks = 48  # litdata prefetches at most 32 chunks ahead: the rest must come after the outage
    local = _make_dataset(tmp_path / "data", chunks=chunks)
    remote.upload_folder(tmp_path / "data", f"s3://{bucket}/train")
    dataset = StreamingDataset(
        input_dir=f"s3://{bucket}/train", item_loader=TokensLoader(block_size=BLOCK), cache_dir=str(tmp_path / "cache")
    )
    it = iter(dataset)
    got = [next(it).tolist()]

    prepared = s3_server.prepare(preload=s3_server.snapshot())
    s3_server.stop()
    time.sleep(0.2)  # a download that was already in flight lands before the count
    cached = len(list((tmp_path / "cache").rglob("chunk-*.bin")))
    assert cached < chunks, "every chunk was cached before the outage: the test would not exercise it"
    back_at: list[float] = []

    def restart():
        time.sleep(0.5)
        back_at.append(time.monotonic())  # from here on the port may answer
        s3_server.start(prepared=prepared)

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        times = []
        for _ in range(len(local) - 1):
            got.append(next(it).tolist())
            times.append(time.monotonic())
    finally:
        thread.join()
    assert got == local
    first_uncached = cached * TOKENS_PER_CHUNK // BLOCK - 1  # index into `times` of the first sample needing the server
    assert times[first_uncached] >= back_at[0], "a sample that needed the server arrived while it was down"
    assert len(list((tmp_path / "cache").rglob("chunk-*.bin"))) == chunks


_FORKED_WORKER = """
import os, sys
from pathlib import Path
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.item_loader import TokensLoader
from litliger.data import remote

data, url, cache = sys.argv[1:4]
remote.upload_folder(Path(data), url)  # starts obstore in this (parent) process
loader = StreamingDataLoader(
    StreamingDataset(url, item_loader=TokensLoader(block_size=8), cache_dir=cache), batch_size=5, num_workers=1
)
print(sum(len(batch) for batch in loader))
"""


def test_forked_loader_worker_after_upload(s3_server, tmp_path):
    """obstore hangs in a child forked after its parent used it; litdata's fork-started workers must not."""
    bucket = _bucket(s3_server, "fork")
    local = _make_dataset(tmp_path / "data", chunks=4)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_FORKED_WORKER))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    args = [sys.executable, str(script), str(tmp_path / "data"), f"s3://{bucket}/train", str(tmp_path / "cache")]
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the loader's worker too
        out, err = proc.communicate()
        pytest.fail(f"the loader hung (obstore used after fork?): {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    assert out.split()[-1] == str(len(local))


def test_server_restart_helpers(s3_server, tmp_path):
    """The helper itself: a plain restart (same port) comes back empty; ``restart_keeping`` keeps every object."""
    with S3Server(tmp_path) as server:
        server.start()
        assert server.port != s3_server.port
        server.make_bucket("keep")
        server.client().put_object(Bucket="keep", Key="a/b.bin", Body=b"\x00\x01")
        port = server.port
        server.restart_keeping(down_for=0.1)
        assert server.port == port and server.snapshot() == {"keep": {"a/b.bin": b"\x00\x01"}}
        server.stop()
        server.start()
        assert server.snapshot() == {}
    assert not server.running
