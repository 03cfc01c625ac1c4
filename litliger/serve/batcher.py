"""The decoding thread of ``litliger serve``: continuous batching over one left-padded KV cache.

One thread owns the model. Its batch is a KV cache of ``max_seq_length`` slots per row, the rows' padding
(``left_pad``) and ``pos``, the next slot every row writes. Each turn of its loop:

1. drops the rows whose client went away;
2. admits waiting requests (first come, first served, up to ``max_batch_size`` rows): their prompts are
   prefilled together in a cache of their own, right-aligned so that they end at the batch's ``pos`` (the
   running rows shift right when a prompt is longer than ``pos``), and joined to the batch;
3. feeds every row's last token in one forward (``GPT.forward(input_pos=pos, left_pad=...)``), samples each
   row with its own settings and generator, and hands each request its new text;
4. removes the rows that finished, and shifts the rest left over padding they no longer need.

A row's slots and positions are those of ``litliger generate``'s left-padded batches (``model/kv_cache.py``):
padding is never attended to, so a row's tokens do not depend on the other rows. A request is admitted only
when every row still fits the cache to its last token, so no row is cut short by another.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..inference.answer import AnswerText
from ..inference.sampling import next_token
from ..model.kv_cache import KVCache


@dataclass
class TokenInfo:
    """A generated token, its log-probability and the most likely alternatives (OpenAI's ``logprobs``)."""

    id: int
    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Piece:
    """What a request receives: new text, the tokens behind it (with ``logprobs``), and at the end the
    ``finish_reason`` (``stop`` or ``length``) or an ``error``."""

    text: str
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    generated: int = 0  # with the finish_reason: tokens sampled for the request (a stop id included)


class Job:
    """One request: prompt ids, sampling settings, where its pieces go (``emit``, called from the decoding thread)."""

    def __init__(
        self,
        ids: list[int],
        max_new_tokens: int,
        emit: Callable[[Piece], None],
        answer: AnswerText,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        logprobs: int | None = None,
    ) -> None:
        self.ids, self.max_new_tokens, self.emit, self.answer = list(ids), max_new_tokens, emit, answer
        self.temperature, self.top_k, self.top_p, self.logprobs = temperature, top_k, top_p, logprobs
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.generated = 0  # tokens sampled so far
        self.pending = 0  # the last sampled token, fed at the next step
        self.cancelled = False  # set by the client's side when it goes away
        self.finished = False
        self.infos: list[TokenInfo] = []  # tokens not handed out yet (held back with their text)

    def cancel(self) -> None:
        self.cancelled = True


class Batcher:
    """The decoding thread (see the module docstring). ``submit`` a :class:`Job`; ``close`` ends the thread
    after the running rows (waiting ones get an error)."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_seq_length: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_length = min(max_seq_length or model.config.block_size, model.config.block_size)
        self.vocab_size = tokenizer.vocab_size
        weight = model.transformer.wte.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.waiting: deque[Job] = deque()
        self.rows: list[Job] = []
        self.caches: list[KVCache] = []
        self.left_pad = torch.zeros(0, dtype=torch.long, device=self.device)
        self.pos = 0
        self.cv = threading.Condition()
        self.closing = False
        self.steps = 0  # forwards run (prefills and decode steps): for tests and the benchmark
        self.largest_batch = 0
        self.cancelled = 0  # rows dropped because their client went away
        self.thread = threading.Thread(target=self._run, name="litliger-batcher", daemon=True)
        self.thread.start()

    # --- the client's side --------------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if not job.ids or job.max_new_tokens < 1 or len(job.ids) + job.max_new_tokens - 1 > self.max_seq_length:
            raise ValueError(
                f"a job needs 1 to {self.max_seq_length} slots: {len(job.ids)} prompt tokens, "
                f"{job.max_new_tokens} new tokens"
            )
        with self.cv:
            if self.closing:
                raise RuntimeError("the server is shutting down")
            self.waiting.append(job)
            self.cv.notify()

    def close(self, timeout: float | None = None) -> None:
        with self.cv:
            self.closing = True
            self.cv.notify()
        self.thread.join(timeout)

    def stats(self) -> dict[str, int]:
        """What ``/health`` reports: rows decoding and waiting, the largest batch so far, forwards, cancelled rows."""
        return {"decoding": len(self.rows), "waiting": len(self.waiting), "largest_batch": self.largest_batch,
                "forwards": self.steps, "cancelled": self.cancelled}  # fmt: skip

    # --- the decoding thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.waiting and not self.rows and not self.closing:
                    self.cv.wait()
                if self.closing:
                    for job in self.waiting:
                        self._fail(job, "the server is shutting down")
                    self.waiting.clear()
                    if not self.rows:
                        return
                self.waiting = deque(j for j in self.waiting if not j.cancelled)
                new = self._choose()
            try:
                with torch.inference_mode():
                    self.cancelled += sum(job.cancelled for job in self.rows)
                    self._drop(lambda job: job.cancelled)
                    if new:
                        self._admit(new)
                    if self.rows:
                        self._decode()
            except Exception as e:  # a failed forward fails its rows, never the server
                for job in {id(j): j for j in self.rows + new}.values():
                    self._fail(job, f"generation failed: {type(e).__name__}: {e}")
                self._reset()

    def _choose(self) -> list[Job]:
        """Waiting jobs that join now: in order, while the batch has room and every row still fits the cache."""
        new: list[Job] = []
        rows = [j for j in self.rows if not j.cancelled]
        while self.waiting and len(rows) + len(new) < self.max_batch_size:
            candidates = [*new, self.waiting[0]]
            pos = max([self.pos if rows else 0] + [len(j.ids) for j in candidates])
            need = [pos + j.max_new_tokens - j.generated for j in rows]  # slots to the last token fed
            need += [pos + j.max_new_tokens - 1 for j in candidates]
            if max(need) > self.max_seq_length:
                break
            new.append(self.waiting.popleft())
        return new

    def _admit(self, new: list[Job]) -> None:
        """Prefill ``new`` prompts right-aligned at the batch's ``pos`` and join them to the batch."""
        longest = max(len(j.ids) for j in new)
        pos = max(self.pos if self.rows else 0, longest)
        if self.rows and pos > self.pos:
            self._shift(pos - self.pos)
        pad = [pos - len(j.ids) for j in new]
        idx = torch.tensor([[0] * (longest - len(j.ids)) + j.ids for j in new], device=self.device)
        own = self._new_caches(len(new))
        self._use(own)
        start = pos - longest
        # a row's padding: its slots before its prompt (the cache's slots before ``start`` included)
        row_pad = torch.tensor(pad, device=self.device)
        plain = start == 0 and not any(pad)
        logits = self.model(idx, input_pos=start, left_pad=None if plain else row_pad, last_only=True)[:, -1]
        self.steps += 1
        if self.rows:
            for mine, theirs in zip(self.caches, own, strict=True):
                mine.k = torch.cat((mine.k, theirs.k))
                mine.v = torch.cat((mine.v, theirs.v))
            self.left_pad = torch.cat((self.left_pad, row_pad))
        else:
            self.caches, self.left_pad = own, row_pad
        self._use(self.caches)
        self.rows += new
        self.pos = pos
        self.largest_batch = max(self.largest_batch, len(self.rows))
        self._take(new, logits)

    def _decode(self) -> None:
        """One token for every row."""
        x = torch.tensor([[j.pending] for j in self.rows], device=self.device)
        left_pad = self.left_pad if bool(self.left_pad.any()) else None
        logits = self.model(x, input_pos=self.pos, left_pad=left_pad, last_only=True)[:, -1]
        self.steps += 1
        self.pos += 1
        self._take(self.rows, logits)

    def _take(self, jobs: list[Job], logits: torch.Tensor) -> None:
        """Sample each job's next token from its row of ``logits``, hand out its text, drop finished rows."""
        logits = logits[:, : self.vocab_size].float()
        greedy = logits.argmax(dim=-1).tolist()
        for row, job in enumerate(jobs):
            if job.temperature == 0:
                token = greedy[row]
            else:
                token = int(next_token(logits[row : row + 1], temperature=job.temperature, top_k=job.top_k,
                                       top_p=job.top_p, generator=job.generator)[0])  # fmt: skip
            job.generated += 1
            job.pending = token
            if job.logprobs is not None:
                job.infos.append(self._info(token, logits[row], job.logprobs))
            text, done = job.answer.add(token)
            if done:
                self._finish(job, text, "stop")
            elif job.generated >= job.max_new_tokens:
                self._finish(job, text + job.answer.finish(), "length")
            elif text:
                self._send(job, Piece(text, job.infos))
                job.infos = []
        self._drop(lambda job: job.finished)
        if self.rows and self.pos >= self.max_seq_length:  # cannot happen after _choose; kept as a guard
            for job in self.rows:
                self._finish(job, job.answer.finish(), "length")
            self._drop(lambda job: job.finished)

    def _info(self, token: int, logits: torch.Tensor, k: int) -> TokenInfo:
        logp = torch.log_softmax(logits, dim=-1)
        top = torch.topk(logp, k) if k else None
        alternatives = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        decode = lambda i: self.tokenizer.decode([i])
        return TokenInfo(token, decode(token), float(logp[token]), [(decode(i), v) for i, v in alternatives])

    def _finish(self, job: Job, text: str, reason: str) -> None:
        job.finished = True
        self._send(job, Piece(text, job.infos, finish_reason=reason, generated=job.generated))
        job.infos = []

    def _fail(self, job: Job, message: str) -> None:
        job.finished = True
        self._send(job, Piece("", error=message))

    def _send(self, job: Job, piece: Piece) -> None:
        try:
            job.emit(piece)
        except Exception:  # the client's event loop is gone: nobody reads this job any more
            job.cancelled = True

    # --- the cache ----------------------------------------------------------------------------------------------

    def _new_caches(self, rows: int) -> list[KVCache]:
        return [
            KVCache(rows, b.attn.n_kv, self.max_seq_length, b.attn.head_size, device=self.device, dtype=self.dtype)
            for b in self.model.transformer.h
        ]

    def _use(self, caches: list[KVCache]) -> None:
        for block, cache in zip(self.model.transformer.h, caches, strict=True):
            block.attn.kv_cache = cache

    def _drop(self, gone: Callable[[Job], bool]) -> None:
        """Remove the rows ``gone`` picks, then the padding every remaining row starts with."""
        keep = [i for i, job in enumerate(self.rows) if not gone(job)]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self.device)
        for cache in self.caches:
            cache.k, cache.v = cache.k.index_select(0, index), cache.v.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]
        self.left_pad = self.left_pad.index_select(0, index)
        common = int(self.left_pad.min())
        if common:
            self._shift(-common)

    def _shift(self, by: int) -> None:
        """Move every row's slots ``by`` to the right (left when negative); positions do not change."""
        for cache in self.caches:
            for t in (cache.k, cache.v):
                if by > 0:
                    t[:, :, by : self.pos + by] = t[:, :, : self.pos].clone()
                else:
                    t[:, :, : self.pos + by] = t[:, :, -by : self.pos].clone()
        self.left_pad = self.left_pad + by
        self.pos += by

    def _reset(self) -> None:
        self.rows, self.caches, self.pos = [], [], 0
        self.left_pad = torch.zeros(0, dtype=torch.long, device=self.device)
        self.model.clear_kv_cache()
