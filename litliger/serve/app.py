"""The FastAPI application of ``litliger serve``: OpenAI's routes over the :class:`~.batcher.Batcher`.

``POST /v1/completions`` continues a text (or token ids); ``POST /v1/chat/completions`` answers a conversation
formatted as ``litliger chat`` formats it (``LLM.chat_ids``). Both stream as server-sent events ending in
``data: [DONE]`` when ``stream`` is true. ``GET /v1/models`` and ``GET /health`` describe the server.

Every error has OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: 401 without the API key,
400 for a body that is not JSON, a field of the wrong type or range, a request this server does not serve, or
one that does not fit the model's context (the message names the limit), 404/405 for unknown routes. A failed
generation fails its request (500), never the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..inference.answer import AnswerText
from ..inference.generate import stop_ids
from .batcher import Batcher, Job, Piece, TokenInfo
from .schemas import ChatRequest, CompletionRequest, Refused, Sampling


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, **fields) -> JSONResponse:
    return JSONResponse(error_body(message, **fields), status_code=status)


class Guard:
    """ASGI middleware: the API key (401) and the body limit (400), before anything reads the request."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        reject = None
        if self.api_key is not None:
            given = headers.get(b"authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                message = "Incorrect or missing API key: send the header 'Authorization: Bearer <key>' with the key "
                reject = error_response(401, message + "the server was started with", code="invalid_api_key")
        limit = self.max_body_bytes
        body, more = b"", True
        while reject is None and more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                reject = error_response(400, f"the request body is over {limit} bytes, this server's limit (set by "
                                        "--max_body_bytes); send a shorter prompt", code="body_too_large")  # fmt: skip
        if reject is not None:
            return await reject(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as streaming responses need

        await self.app(scope, replay, send)


def create_app(llm, batcher: Batcher, *, model_id: str, api_key: str | None = None, max_body_bytes: int) -> Any:
    """The ASGI application serving ``llm`` (a ``litliger.LLM``) through ``batcher``."""
    app = FastAPI(title="litliger", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer, limit = llm.tokenizer, batcher.max_seq_length
    created = int(time.time())
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        first = problems[0] if problems else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON ({first.get('msg', '')}); send a JSON object")
        where = lambda e: ".".join(str(x) for x in e.get("loc", ())[1:]) or "body"  # drop the leading "body"
        message = "; ".join(f"{where(e)}: {e.get('msg')}" for e in problems[:3])
        return error_response(400, f"invalid request: {message}", param=where(first) if first else None)

    @app.exception_handler(Refused)
    async def _refused(_, exc: Refused) -> JSONResponse:
        return error_response(400, str(exc), param=exc.param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        routes = "GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions"
        message = f"{exc.detail}: {request.method} {request.url.path}; this server has {routes}"
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, message, kind=kind)

    @app.exception_handler(Exception)
    async def _failed(_, exc: Exception) -> JSONResponse:
        traceback.print_exception(exc, file=sys.stderr)  # for the operator; the client gets one line
        return error_response(500, f"the server failed: {type(exc).__name__}: {exc}", kind="server_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, **batcher.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "litliger", "max_model_len": limit}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.refuse_unsupported()
        if isinstance(body.prompt, str) or isinstance(body.prompt[0], str):
            text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
            ids = llm.prompt_tokens(text)
        else:
            ids = list(body.prompt)
            bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
            if bad:
                raise Refused(f"token id {bad[0]} is not in the vocabulary (0..{tokenizer.vocab_size - 1})", "prompt")
            text = tokenizer.decode(ids)
        max_new = _room(ids, body.max_tokens)
        answer = AnswerText(tokenizer, [tokenizer.eos_id], body.stop)
        run = _Run("text_completion", ids, max_new, answer, body, logprobs=body.logprobs)
        echo = text if body.echo else ""
        if body.stream:
            return _sse(run.stream(request, lambda p, first: _completion_chunk(run, p, echo if first else "")))
        pieces = await run.collect(request)
        choice = {"index": 0, "text": echo + "".join(p.text for p in pieces), "finish_reason": pieces[-1].finish_reason}
        infos = [i for p in pieces for i in p.tokens]
        choice["logprobs"] = _completion_logprobs(infos, len(echo)) if body.logprobs is not None else None
        return {**run.head(), "choices": [choice], "usage": run.usage(pieces[-1])}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        body.refuse_unsupported()
        try:
            ids = llm.chat_ids(body.conversation)
        except ValueError as e:
            raise Refused(str(e), "messages") from None
        max_new = _room(ids, body.answer_tokens)
        answer = AnswerText(tokenizer, stop_ids(tokenizer, llm.style), body.stop)
        top = (body.top_logprobs or 0) if body.logprobs else None
        run = _Run("chat.completion", ids, max_new, answer, body, logprobs=top)
        if body.stream:
            return _sse(run.stream(request, lambda p, first: _chat_chunk(run, p, first)))
        pieces = await run.collect(request)
        message = {"role": "assistant", "content": "".join(p.text for p in pieces)}
        infos = [i for p in pieces for i in p.tokens]
        choice = {"index": 0, "message": message, "finish_reason": pieces[-1].finish_reason}
        choice["logprobs"] = {"content": [_chat_logprob(i) for i in infos]} if body.logprobs else None
        return {**run.head(), "choices": [choice], "usage": run.usage(pieces[-1])}

    def _room(ids: list[int], requested: int | None) -> int:
        """New tokens to generate: ``requested``, or what the context leaves; refused when it does not fit."""
        if len(ids) >= limit:
            raise Refused(
                f"the prompt is {len(ids)} tokens; this model's context is {limit} tokens (prompt and answer "
                "together): shorten the prompt", "prompt"
            )  # fmt: skip
        if requested is None:
            return limit - len(ids)
        if len(ids) + requested > limit:
            raise Refused(
                f"this model's context is {limit} tokens; the request needs {len(ids) + requested} ({len(ids)} in "
                f"the prompt, {requested} for the answer): lower max_tokens to at most {limit - len(ids)} or shorten "
                "the prompt", "max_tokens"
            )  # fmt: skip
        return requested

    class _Run:
        """One request's job on the batcher, and its pieces read back on this event loop."""

        def __init__(self, kind: str, ids, max_new, answer, body: Sampling, logprobs) -> None:
            self.kind, self.prompt_tokens = kind, len(ids)  # kind: "text_completion" or "chat.completion"
            self.include_usage = body.include_usage
            self.id, self.created = uuid.uuid4().hex[:24], int(time.time())
            self.queue: asyncio.Queue[Piece] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            emit = lambda piece: loop.call_soon_threadsafe(self.queue.put_nowait, piece)
            self.job = Job(ids, max_new, emit, answer, temperature=body.temperature, top_k=body.top_k,
                           top_p=body.top_p, seed=body.seed, logprobs=logprobs)  # fmt: skip
            if max_new == 0:
                emit(Piece("", finish_reason="length"))
                self.job.finished = True
            else:
                batcher.submit(self.job)

        def head(self, chunk: bool = False) -> dict:
            """A response's (or a stream chunk's) id, object, created and model fields."""
            chat = self.kind == "chat.completion"
            kind = f"{self.kind}.chunk" if chunk and chat else self.kind
            prefix = "chatcmpl" if chat else "cmpl"
            return {"id": f"{prefix}-{self.id}", "object": kind, "created": self.created, "model": model_id}

        def usage(self, last: Piece) -> dict:
            n = last.generated
            return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

        async def pieces(self, request: Request) -> AsyncIterator[Piece]:
            try:
                while True:
                    try:
                        piece = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                    if piece.error:
                        raise RuntimeError(piece.error)
                    yield piece
                    if piece.finish_reason:
                        return
            finally:
                if not self.job.finished:
                    self.job.cancel()  # the client went away: its row leaves the batch at the next step

        async def collect(self, request: Request) -> list[Piece]:
            return [p async for p in self.pieces(request)]

        async def stream(self, request: Request, chunk: Callable[[Piece, bool], list[dict]]) -> AsyncIterator[str]:
            first, last = True, None
            try:
                async for piece in self.pieces(request):
                    for c in chunk(piece, first):
                        yield f"data: {json.dumps(c)}\n\n"
                    first, last = False, piece
            except RuntimeError as e:
                yield f"data: {json.dumps(error_body(str(e), kind='server_error'))}\n\n"
            if last is not None and self.include_usage:  # OpenAI's usage chunk: no choices
                yield f"data: {json.dumps({**self.head(chunk=True), 'choices': [], 'usage': self.usage(last)})}\n\n"
            yield "data: [DONE]\n\n"

    def _completion_chunk(run: _Run, piece: Piece, echo: str) -> list[dict]:
        choice = {"index": 0, "text": echo + piece.text, "finish_reason": piece.finish_reason}
        choice["logprobs"] = _completion_logprobs(piece.tokens, 0) if run.job.logprobs is not None else None
        return [{**run.head(chunk=True), "choices": [choice]}]

    def _chat_chunk(run: _Run, piece: Piece, first: bool) -> list[dict]:
        head, chunks = run.head(chunk=True), []
        if first:
            delta = {"role": "assistant", "content": ""}
            chunks.append({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        choice = {"index": 0, "delta": {"content": piece.text} if piece.text else {}}
        choice["finish_reason"] = piece.finish_reason
        if run.job.logprobs is not None:
            choice["logprobs"] = {"content": [_chat_logprob(i) for i in piece.tokens]}
        chunks.append({**head, "choices": [choice]})
        return chunks

    return app


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _completion_logprobs(infos: list[TokenInfo], offset: int) -> dict:
    offsets, at = [], offset
    for info in infos:
        offsets.append(at)
        at += len(info.text)
    return {
        "tokens": [i.text for i in infos],
        "token_logprobs": [i.logprob for i in infos],
        "top_logprobs": [dict(reversed(i.top)) for i in infos],  # tokens of the same text: the likeliest's value
        "text_offset": offsets,
    }


def _chat_logprob(info: TokenInfo) -> dict:
    entry = lambda text, logprob: {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {**entry(info.text, info.logprob), "top_logprobs": [entry(t, v) for t, v in info.top]}
