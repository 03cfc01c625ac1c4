"""A real S3-protocol server for tests: moto's server mode over TLS, with a throwaway CA.

Not a test file. Tests use the session fixture::

    from s3_server import s3_server_fixture  # noqa: F401  (the fixture named "s3_server")

    def test_x(s3_server):
        s3_server.make_bucket("b")  # then s3://b/... works with no storage_options

While the fixture is active, ``os.environ`` holds ``s3_server.env``: ``AWS_ENDPOINT_URL`` (= ``.endpoint``,
``https://127.0.0.1:<port>``), ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (``testing``), ``AWS_DEFAULT_REGION``
(``us-east-1``), and ``SSL_CERT_FILE``/``AWS_CA_BUNDLE`` (= ``.ca_file``, the CA that signed the server's certificate:
boto3 reads ``AWS_CA_BUNDLE``, obstore's rustls client reads ``SSL_CERT_FILE``). TLS is needed because litdata's
obstore client refuses plain http, and a real CA because it refuses self-signed certificates.

Server state lives in the moto process's memory: ``stop()`` then ``start()`` (same port) gives an EMPTY server.
To keep the data across an outage use ``restart_keeping(down_for)``, or by hand ``p = prepare(preload=snapshot())``,
``stop()``, ``start(prepared=p)``: the new process loads the objects into moto's backends *before* it opens the port,
so a client retrying through the outage never sees a half-restored bucket, and the outage lasts as long as the test
waits between ``stop()`` and ``start()`` (the new process has already started up).
"""

from __future__ import annotations

import atexit
import os
import pickle
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

Snapshot = dict[str, dict[str, bytes]]  # bucket -> key -> object bytes

_ISOLATED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT", "REQUESTS_CA_BUNDLE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA (key + self-signed cert) and a leaf for 127.0.0.1/localhost signed by it: (ca.crt, leaf.crt, leaf.key)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    leaf_key, leaf_csr, leaf_crt, ext = (
        folder / "leaf.key",
        folder / "leaf.csr",
        folder / "leaf.crt",
        folder / "leaf.ext",
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    run("req", "-x509", *ec, "-keyout", ca_key, "-out", ca_crt, "-days", "2", "-subj", "/CN=litliger test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    run("req", *ec, "-keyout", leaf_key, "-out", leaf_csr, "-subj", "/CN=localhost")
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    run("x509", "-req", "-in", leaf_csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial", "-out", leaf_crt,
        "-days", "2", "-extfile", ext)  # fmt: skip
    return ca_crt, leaf_crt, leaf_key


class S3Server:
    """One moto server process over TLS on a fixed port (kept across ``stop``/``start``)."""

    def __init__(self, tmp_dir: Path, port: int | None = None) -> None:
        self.dir = Path(tmp_dir)
        self.ca_file, self.cert_file, self.key_file = _make_certificates(self.dir / "tls")
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "moto.log"

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment that points boto3, litdata and obstore at this server."""
        ca = str(self.ca_file)
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "SSL_CERT_FILE": ca,
            "AWS_CA_BUNDLE": ca,
        }

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def prepare(self, preload: Snapshot | None = None, timeout: float = 30.0) -> subprocess.Popen:
        """A server process with moto imported and ``preload`` loaded, waiting for ``start(prepared=...)`` to listen.

        Preparing while the old server still runs makes an outage exactly as long as the test wants: ``stop()``,
        then ``start(prepared=p)`` opens the port again in milliseconds, not after Python's start-up.
        """
        ready = self.dir / f"ready.{time.monotonic_ns()}"
        argv = [sys.executable, __file__, "--ready", str(ready)]
        if preload:
            snap = self.dir / "preload.pkl"
            snap.write_bytes(pickle.dumps(preload))
            argv += ["--preload", str(snap)]
        argv += ["-H", "127.0.0.1", "-p", str(self.port), "-c", str(self.cert_file), "-k", str(self.key_file)]
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )
        atexit.register(lambda: proc.poll() is None and proc.kill())  # no stray server when a test run dies
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not get ready: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        return proc

    def start(
        self, preload: Snapshot | None = None, prepared: subprocess.Popen | None = None, timeout: float = 30.0
    ) -> None:
        """Start the server (on ``self.port``) and wait until it answers; ``preload`` objects exist from the start."""
        if self.running:
            raise RuntimeError(f"moto server already running at {self.endpoint}")
        self.proc = prepared or self.prepare(preload, timeout)
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()
        context = ssl.create_default_context(cafile=str(self.ca_file))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", context=context, timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer means it is serving
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"moto server at {self.endpoint} did not answer in {timeout}s") from None
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server. Its objects are lost (they live in the process's memory)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> Any:
        """A boto3 S3 client for this server (verifying its certificate against ``ca_file``)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
            verify=str(self.ca_file),
        )

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def snapshot(self) -> Snapshot:
        """Every bucket and object on the server, read back into memory (test data is small)."""
        client = self.client()
        out: Snapshot = {}
        for bucket in client.list_buckets()["Buckets"]:
            name = bucket["Name"]
            out[name] = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    out[name][obj["Key"]] = client.get_object(Bucket=name, Key=obj["Key"])["Body"].read()
        return out

    def restart_keeping(self, down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds, start again on the same port with the same buckets and objects."""
        prepared = self.prepare(preload=self.snapshot())
        self.stop()
        time.sleep(down_for)
        self.start(prepared=prepared)


def start_s3_server(tmp_dir: Path) -> S3Server:
    """Make a CA and a leaf certificate under ``tmp_dir`` and start moto over TLS on a free port.

    Also a context manager: ``with start_s3_server(tmp) as server: ...`` stops it at the end. It does not touch
    ``os.environ``; pass ``server.env`` to subprocesses or use the ``s3_server`` fixture.
    """
    server = S3Server(tmp_dir)
    server.start()
    return server


def missing_tools() -> str | None:
    """Why this machine cannot run the server, or None."""
    missing = [tool for tool in ("moto_server", "openssl") if shutil.which(tool) is None]
    return f"needs {' and '.join(missing)} on PATH (pip install 'moto[server]'; openssl)" if missing else None


@pytest.fixture(scope="session", name="s3_server")
def s3_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One TLS moto server for the session, with ``os.environ`` pointing at it (restored afterwards).

    Import it as ``from s3_server import s3_server_fixture  # noqa: F401`` and take a ``s3_server`` argument
    (``from s3_server import s3_server`` works too, but ruff then flags every test argument as F811).
    """
    reason = missing_tools()
    if reason:  # a test dependency (pyproject's "test" extra), not an optional one: fail, never skip silently
        pytest.fail(reason)
    server = start_s3_server(tmp_path_factory.mktemp("s3_server"))
    saved = {k: os.environ.get(k) for k in (*server.env, *_ISOLATED)}
    for key in _ISOLATED:
        os.environ.pop(key, None)
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _serve(argv: list[str]) -> None:
    """``python s3_server.py --ready FILE [--preload FILE] <moto_server args>``: moto's server, objects loaded,
    FILE created when ready, listening once a line arrives on stdin."""
    from moto.server import main

    ready = Path(argv[1])
    argv = argv[2:]
    if argv[:1] == ["--preload"]:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for bucket, objects in pickle.loads(Path(argv[1]).read_bytes()).items():
            backend.create_bucket(bucket, "us-east-1")
            for key, value in objects.items():
                backend.put_object(bucket, key, value)
        argv = argv[2:]
    ready.touch()
    sys.stdin.readline()
    main(argv)


s3_server = s3_server_fixture  # the fixture under its own name too


if __name__ == "__main__":
    _serve(sys.argv[1:])
