"""``litliger serve``: load a checkpoint, bind the address, serve until Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from ..checkpoint.layout import run_name
from ..inference.loading import Precision, resolve_device
from ..util.checks import check_positive

API_KEY_ENV = "LITLIGER_API_KEY"
MIN_BODY_BYTES = 1 << 20  # the body limit's floor: long chat histories are JSON, not tokens
BODY_BYTES_PER_SLOT = 64  # a cache slot's worth of request body, escapes and chat formatting included
SHUTDOWN_GRACE_S = 10  # in-flight requests get this long to finish after Ctrl-C / SIGTERM, then are cancelled


class MissingServeExtra(ValueError):
    """fastapi or uvicorn is not installed: a one-line user error (cli.py), not a traceback."""


def main(
    checkpoint_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_seq_length: int | None = None,
    model_name: str | None = None,
    max_body_bytes: int | None = None,
    precision: Precision = "auto",
    device: str = "auto",
) -> None:
    """``litliger serve``: an OpenAI-compatible server (``/v1/completions``, ``/v1/chat/completions``,
    ``/v1/models``, ``/health``) for a checkpoint folder or a finetuning step folder.

    Requests that arrive together are decoded together: one forward per token for up to ``max_batch_size``
    requests, each with its own sampling settings. Greedy answers (``temperature: 0``) are those of ``litliger
    generate``. Stops cleanly on Ctrl-C or SIGTERM (running requests get 10 s to finish) and exits 0.

    Args:
        checkpoint_dir: a checkpoint folder (model.safetensors, model_config.yaml, tokenizer.json) or a
            finetuning step folder.
        host: the address to listen on; 127.0.0.1 (this machine only) unless you mean to expose the model
            (0.0.0.0: every interface; then set an API key).
        port: the TCP port (0: any free port; the URL printed at startup says which).
        api_key: when set (or the LITLIGER_API_KEY environment variable), every request must send
            ``Authorization: Bearer <key>`` (401 otherwise).
        max_batch_size: the most requests decoded together; more wait for a free row.
        max_seq_length: the KV cache's slots per request, prompt and answer together (default: the model's
            block size, the most it allows).
        model_name: the model id of responses and ``/v1/models`` (default: the checkpoint's folder name, or its
            run's folder for step-XXXXXXXX/ and final/).
        max_body_bytes: the largest request body (default: 64 bytes per cache slot, at least 1 MiB).
        precision: the weights' dtype (auto: bf16-true on GPUs that support it, else 32-true).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    """
    check_positive("max_batch_size", max_batch_size, "set how many requests may be decoded together")
    check_positive("max_seq_length", max_seq_length, "set the cache's slots per request, or null", optional=True)
    check_positive("max_body_bytes", max_body_bytes, "set the largest request body in bytes, or null", optional=True)
    if api_key is not None and (not api_key.strip() or api_key != api_key.strip()):
        raise ValueError("the API key is empty or padded with spaces, in --api_key; give the key clients will send")
    if model_name is not None and not model_name.strip():
        raise ValueError("model_name is empty, in --model_name; give the id clients see, or leave it out")
    resolve_device(device)
    if not 0 <= port <= 65535:
        raise ValueError(f"port={port} is not a TCP port, in --port; use 1..65535, or 0 for any free port")
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise MissingServeExtra(
            f'litliger serve needs {e.name} (fastapi and uvicorn), in the installation; pip install "litliger[serve]"'
        ) from None
    from ..inference.llm import LLM
    from .batcher import Batcher

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    sock = _bind(host, port)  # before loading: a taken port fails at once
    llm = LLM.load(checkpoint_dir, device=device, precision=precision)
    batcher = Batcher(llm.model, llm.tokenizer, max_batch_size=max_batch_size, max_seq_length=max_seq_length)
    slots = batcher.max_seq_length
    body_limit = max_body_bytes or max(MIN_BODY_BYTES, BODY_BYTES_PER_SLOT * slots)
    model_id = model_name or run_name(Path(checkpoint_dir))
    app = create_app(llm, batcher, model_id=model_id, api_key=api_key, max_body_bytes=body_limit)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}"
    dtype = str(llm.model.transformer.wte.weight.dtype).removeprefix("torch.")
    print(f"litliger serve: {model_id} ({checkpoint_dir}) on {llm.device}, {dtype}", flush=True)
    print(
        f"  KV cache: {slots} tokens per request (prompt + answer); batch limit: {max_batch_size} requests", flush=True
    )
    print(f"  API key: {'required' if api_key else 'none (anyone who reaches the port may use it)'}", flush=True)
    print(f"  listening on {url} (OpenAI base_url: {url}/v1); Ctrl-C to stop", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)  # fmt: skip
    try:
        _quiet_exit(uvicorn.Server)(config).run(sockets=[sock])
    finally:
        batcher.close(timeout=SHUTDOWN_GRACE_S)
        sock.close()
    print("litliger serve: stopped", file=sys.stderr, flush=True)


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; a taken port or an unknown host is a one-line error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}), in --host/--port; choose another port "
                      "(0: any free one) or a host of this machine") from None  # fmt: skip
    sock.listen(128)
    return sock


def _quiet_exit(server: type) -> type:
    """uvicorn's server class, for which Ctrl-C and SIGTERM are the normal way to stop: after its graceful shutdown
    it does not raise the signal again (uvicorn does, which would exit 130 or -15 instead of 0)."""

    class Server(server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return Server
