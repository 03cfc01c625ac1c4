"""Prepared token shards on object storage: ``s3://``, ``r2://``, ``gs://``, ``az://`` ... URLs, through obstore.

``storage_options`` follow litdata's convention for its ``StreamingDataset``, so the same dict serves both:

* ``s3://`` (and ``r2://``): the keyword arguments of a boto3 S3 client (``endpoint_url``, ``aws_access_key_id``,
  ``aws_secret_access_key``, ``aws_session_token``, ``region_name``, ``verify``, ``config``), or litdata's
  ``data_connection_id``. They go through litdata's own ``S3Client``/``R2Client``, exactly as litdata resolves them,
  and the obstore store takes the endpoint, region and (refreshing) credentials from the boto3 client, the way
  litdata builds its own obstore store. With empty options boto3 reads the environment and ``~/.aws``:
  ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``.
  A custom endpoint is addressed path-style. TLS roots: the system's plus ``SSL_CERT_FILE``; a CA bundle named by
  ``verify`` (a path) or ``AWS_CA_BUNDLE`` is added too; ``verify=False`` accepts any certificate.
* other schemes: obstore's own config keys for that store (``obstore.store.from_url``), plus its environment.

obstore's runtime does not survive ``fork``: once a process has used it, a forked child that uses it hangs. So every
store made here is registered with litdata (``obstore_usable``), whose DataLoader workers forked afterwards fall
back to boto3, and a forked child that calls in here gets a ``RuntimeError`` instead of a hang.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import obstore

LAST = ("index.json", "litliger.json")  # uploaded after every other file, in this order
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CLIENT = {"timeout": "200s", "connect_timeout": "10s", "pool_idle_timeout": "90s"}
_QUICK_CLIENT = {"timeout": "5s", "connect_timeout": "3s"}
_QUICK_RETRY = {"max_retries": 1, "retry_timeout": timedelta(seconds=5)}
_stores: dict[tuple, tuple[Any, str]] = {}


def is_remote(location: str | os.PathLike) -> bool:
    """Whether ``location`` is an object-store URL (``s3://``, ``gs://``, ``az://``, ``r2://``, ...), not a path."""
    match = _SCHEME.match(str(location))
    return match is not None and match.group(1).lower() != "file"


def _split(url: str) -> tuple[str, str, str]:
    """``s3://bucket/a/b/`` -> ``("s3", "bucket", "a/b")``."""
    if not is_remote(url):
        raise ValueError(f"not an object-store URL (scheme://bucket/path): {url!r}")
    parsed = urlparse(url)
    if not parsed.netloc:
        raise ValueError(f"no bucket in {url!r}: expected {parsed.scheme}://bucket/path")
    return parsed.scheme.lower(), parsed.netloc, parsed.path.strip("/")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _claim_obstore() -> None:
    """Refuse to use obstore in a child forked after its parent started it; tell litdata this process has."""
    try:
        from litdata.streaming import downloader
    except ImportError:  # pragma: no cover - litdata is a dependency
        return
    if not getattr(downloader, "obstore_usable", lambda: True)():
        raise RuntimeError(
            f"obstore was started in a parent of this forked process (pid {os.getpid()}) and would hang here: "
            "use object storage from the parent, or start this process with 'spawn'"
        )
    getattr(downloader, "_note_obstore_init", lambda: None)()


def _tls_options(options: dict[str, Any]) -> dict[str, Any]:
    verify = options.get("verify")
    if verify is False:
        return {"allow_invalid_certificates": True}
    bundle = verify if isinstance(verify, str) else os.environ.get("AWS_CA_BUNDLE")
    return {"root_certificate": Path(bundle).read_text()} if bundle and Path(bundle).is_file() else {}


def _s3_store(scheme: str, bucket: str, options: dict[str, Any], client: dict, retry: dict | None) -> tuple[Any, str]:
    from litdata.streaming.client import R2Client, S3Client
    from obstore.store import S3Store

    sdk = (R2Client if scheme == "r2" else S3Client)(storage_options=dict(options))
    meta = sdk.client.meta
    endpoint = meta.endpoint_url or "https://s3.amazonaws.com"
    config: dict[str, Any] = {"endpoint": endpoint}
    if meta.region_name:
        config["region"] = meta.region_name
    if "amazonaws.com" not in endpoint:
        config["virtual_hosted_style_request"] = False

    def credentials() -> dict[str, Any]:
        found = sdk.client._get_credentials()  # what litdata's own obstore store uses too
        if found is None:
            raise ValueError(f"no credentials for {scheme}://{bucket}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        frozen = found.get_frozen_credentials()
        refresh = getattr(sdk, "next_refresh_time", None)
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": refresh() if refresh else None,
        }

    client = {**client, **_tls_options(options)}
    store = S3Store(bucket, config=config, credential_provider=credentials, client_options=client, retry_config=retry)
    return store, endpoint


def _store(url: str, storage_options: dict | None, quick: bool = False) -> tuple[Any, str, str]:
    """(obstore store for the bucket of ``url``, its endpoint for messages, the key or prefix inside the bucket)."""
    scheme, bucket, key = _split(url)
    options = dict(storage_options or {})
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "AZURE_", "GOOGLE_", "SSL_CERT")))
    cache_key = (scheme, bucket, repr(sorted(options.items(), key=lambda kv: kv[0])), repr(env), quick, os.getpid())
    if cache_key not in _stores:
        _claim_obstore()
        client, retry = (_QUICK_CLIENT, _QUICK_RETRY) if quick else (_CLIENT, None)
        if scheme in ("s3", "r2"):
            _stores[cache_key] = _s3_store(scheme, bucket, options, client, retry)
        else:
            from obstore.store import from_url

            store = from_url(f"{scheme}://{bucket}", config=options or None, client_options=client, retry_config=retry)
            _stores[cache_key] = store, str(options.get("endpoint") or f"the default {scheme} endpoint")
    store, endpoint = _stores[cache_key]
    return store, endpoint, key


def upload_folder(local: Path, url: str, storage_options: dict | None = None, workers: int = 8) -> None:
    """Upload every file under ``local`` to the ``url`` prefix, keeping relative paths.

    Chunk files go first (``workers`` at a time), then every ``index.json``, then every ``litliger.json``, each
    group only after the one before has finished: a reader that sees an index never finds its chunks missing.
    """
    local = Path(local)
    if not local.is_dir():
        raise NotADirectoryError(f"nothing to upload: {local} is not a folder")
    store, _, prefix = _store(url, storage_options)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    rank = {name: i + 1 for i, name in enumerate(LAST)}
    for group in range(len(LAST) + 1):
        batch = [p for p in files if rank.get(p.name, 0) == group]
        if not batch:
            continue
        put = lambda p: obstore.put(store, _join(prefix, p.relative_to(local).as_posix()), p)
        with ThreadPoolExecutor(max(1, min(workers, len(batch)))) as pool:
            list(pool.map(put, batch))  # list(): re-raises the first failure


def write_text(url: str, text: str, storage_options: dict | None = None) -> None:
    """Write ``text`` (UTF-8) as the object at ``url``, replacing it."""
    store, _, key = _store(url, storage_options)
    obstore.put(store, key, text.encode())


def read_text(url: str, storage_options: dict | None = None) -> str | None:
    """The object at ``url`` as UTF-8 text, or None when it does not exist."""
    store, _, key = _store(url, storage_options)
    try:
        return bytes(obstore.get(store, key).bytes()).decode()
    except FileNotFoundError:
        return None


def list_names(url_prefix: str, storage_options: dict | None = None) -> list[str]:
    """Names of all objects under the ``url_prefix`` folder (recursively), relative to it, sorted."""
    store, _, prefix = _store(url_prefix, storage_options)
    names = []
    for batch in obstore.list(store, prefix=prefix or None):
        for meta in batch:
            path = meta["path"]
            names.append(path[len(prefix) + 1 :] if prefix else path)
    return sorted(names)


def download_file(url: str, local_path: Path, storage_options: dict | None = None) -> None:
    """Download the object at ``url`` to ``local_path`` (atomically: a partial download is never left there).

    Raises ``FileNotFoundError`` when there is no such object.
    """
    store, _, key = _store(url, storage_options)
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = local_path.with_name(f"{local_path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for part in obstore.get(store, key).stream():
                f.write(part)
        os.replace(tmp, local_path)
    finally:
        tmp.unlink(missing_ok=True)


def _reason(error: BaseException) -> str:
    text = str(error)
    for marker, reason in (
        ("NoSuchBucket", "the bucket does not exist"),
        ("ConnectionRefused", "connection refused"),
        ("InvalidCertificate", "TLS certificate not trusted: set SSL_CERT_FILE or AWS_CA_BUNDLE to its CA"),
        ("certificate", "TLS certificate problem"),
        ("dns error", "host name not resolved"),
        ("AccessDenied", "access denied"),
        ("403 Forbidden", "access denied"),
        ("SignatureDoesNotMatch", "credentials rejected"),
        ("InvalidAccessKeyId", "credentials rejected"),
        ("timed out", "timed out"),
    ):
        if marker in text:
            return reason
    if isinstance(error, TimeoutError):
        return "timed out"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first[:200]


def check_reachable(url: str, storage_options: dict | None = None, flag: str = "--data.storage_options") -> None:
    """Fail fast, in a few seconds, when the bucket of ``url`` cannot be listed.

    Raises a one-line ``ConnectionError`` naming the URL, endpoint and bucket: unreachable endpoint, TLS failure,
    missing bucket, denied access. A missing prefix inside an existing bucket is fine (nothing written yet).
    ``storage_options`` that litdata cannot use raise as they are (``TypeError``/``ValueError``), before any I/O.
    """
    _, bucket, _ = _split(url)
    store, endpoint, prefix = _store(url, storage_options, quick=True)
    try:
        next(iter(obstore.list(store, prefix=prefix or None, chunk_size=1)), None)
    except Exception as error:
        raise ConnectionError(
            f"cannot reach {url} at endpoint {endpoint} ({_reason(error)}); check the endpoint_url in "
            f"{flag} / AWS_ENDPOINT_URL, the credentials, and that the bucket {bucket!r} exists"
        ) from error
