"""A stand-in for the Hugging Face Hub with no network: its cache layout, and a tiny HTTP server speaking enough
of its API for ``huggingface_hub.snapshot_download`` (the target of ``HF_ENDPOINT``, as a mirror is).

``add_to_cache(cache, repo_id, files)`` lays files out as huggingface_hub does under ``HF_HUB_CACHE``::

    models--ORG--NAME/blobs/<sha256 of an LFS file, git's sha1 of a small one>
    models--ORG--NAME/snapshots/<40-hex commit>/<file>  ->  ../../blobs/<id>   (relative symbolic links)
    models--ORG--NAME/refs/main                         the commit, no newline

``HubServer({repo_id: files}, gated={...})`` serves the same files: the revision and tree APIs, and HEAD/GET of
``/<repo>/resolve/<revision>/<file>`` with the headers the client reads (X-Repo-Commit, ETag, X-Linked-Etag,
X-Linked-Size); a missing repo, a gated one and an unknown revision answer as the Hub does (X-Error-Code).
``server.requests`` records every request, so a test can tell which files were fetched (``server.tokens``: the
Authorization header each carried).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".model", ".gguf"}


def is_lfs(name: str) -> bool:
    return Path(name).suffix in LFS_SUFFIXES


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def blob_id(name: str, data: bytes) -> str:
    """The name of a file's blob in the cache (its ETag): sha256 of an LFS file, git's blob sha1 of another."""
    return hashlib.sha256(data).hexdigest() if is_lfs(name) else git_sha1(data)


def commit_of(files: dict[str, bytes]) -> str:
    """A 40-hex commit id that depends on the files (what a real commit hash is, for the cache)."""
    return hashlib.sha1(json.dumps(sorted((n, blob_id(n, d)) for n, d in files.items())).encode()).hexdigest()


def add_to_cache(
    cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "main", commit: str | None = None
) -> str:
    """Put ``files`` into the Hugging Face cache ``cache`` as one commit of model repo ``repo_id`` (default: the
    commit of exactly these files); its hash."""
    commit = commit or commit_of(files)
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / blob_id(name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


class HubServer:
    """``with HubServer(repos) as hub:`` serves ``repos`` (repo id -> {file: bytes}) at ``hub.endpoint``."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: set[str] = frozenset()) -> None:
        self.repos, self.gated = repos, set(gated)
        self.requests: list[str] = []  # "GET /path", in order
        self.tokens: list[str | None] = []  # the Authorization header of each request
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def fetched(self) -> set[str]:
        """The files whose bytes were sent (GET of /<repo>/resolve/...)."""
        return {
            r.split("/resolve/", 1)[1].split("/", 1)[1]
            for r in self.requests
            if r.startswith("GET /") and "/resolve/" in r
        }

    def __enter__(self) -> HubServer:
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()  # quick stop
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(data)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _error(self, status: int, code: str, body: bool) -> None:
            data = json.dumps({"error": code}).encode()
            self._send(status, data, {"X-Error-Code": code, "Content-Type": "application/json"}, body)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(f"{self.command} {path}")
            hub.tokens.append(self.headers.get("Authorization"))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"]:  # /api/models/ORG/NAME/{revision,tree}/REVISION[/...]
                api, repo_id, kind, tail = True, "/".join(parts[2:4]), (parts[4:5] or [""])[0], parts[5:]
            else:  # /ORG/NAME/resolve/REVISION/FILE
                api, repo_id, kind, tail = False, "/".join(parts[:2]), (parts[2:3] or [""])[0], parts[3:]
            revision, rest = (tail[0] if tail else None), tail[1:]
            files = hub.repos.get(repo_id)
            if files is None:
                return self._error(401, "RepoNotFound", body)
            if repo_id in hub.gated:
                return self._error(403, "GatedRepo", body)
            commit = commit_of(files)
            if revision not in ("main", commit):
                return self._error(404, "RevisionNotFound", body)
            if api and kind == "revision":
                info = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": n} for n in sorted(files)]}
                return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
            if api and kind == "tree":
                tree = [_tree_entry(n, d) for n, d in sorted(files.items())]
                return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
            name = "/".join(rest)
            if kind != "resolve" or name not in files:
                return self._error(404, "EntryNotFound", body)
            data = files[name]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{git_sha1(data)}"'}
            if is_lfs(name):
                headers.update({"X-Linked-Etag": f'"{blob_id(name, data)}"', "X-Linked-Size": str(len(data))})
            self._send(200, data, headers, body)

    return Handler


def _tree_entry(name: str, data: bytes) -> dict:
    entry = {"type": "file", "oid": git_sha1(data), "size": len(data), "path": name}
    if is_lfs(name):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry
