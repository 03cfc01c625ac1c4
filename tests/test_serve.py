"""``litliger serve`` through the official ``openai`` client and raw HTTP, against a real server process.

Greedy answers equal ``generate``'s (completions) and ``LLM.chat``'s (chat), streamed or not; 16 concurrent
streams each equal their own single run and were decoded in shared batches; stop strings, usage, logprobs and
seeds behave as OpenAI's API says; bad requests get 400/401/404/405 with OpenAI's error body and the server keeps
serving; a client that goes away frees its row; SIGTERM lets a running stream finish and exits 0. The batcher's
joining paths (a longer prompt shifting the running rows, rows leaving) are checked in-process too.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_finetune import make_base, tiny_config  # noqa: E402
from test_llm import greedy_text  # noqa: E402

from litliger import LLM, generate  # noqa: E402
from litliger.inference.answer import AnswerText  # noqa: E402
from litliger.serve.batcher import Batcher, Job  # noqa: E402

KEY = "test-key"
BODY_LIMIT = 20_000
PROMPTS = ["alpha beta gamma", "delta", "epsilon zeta eta theta iota", "kappa lambda", "mu nu xi omicron pi rho"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("serve"), tiny_config())


@pytest.fixture(scope="module")
def llm(base: Path) -> LLM:
    return LLM.load(base, device="cpu")


@pytest.fixture(scope="module")
def greedy(llm: LLM):
    """``greedy(prompt, n)``: test_llm's ``greedy_text`` (``litliger generate``'s loop by hand) on the loaded model."""
    cache: dict[tuple[str, int], str] = {}

    def text(prompt: str, n: int) -> str:
        if (prompt, n) not in cache:
            tok, ids = llm.tokenizer, llm.prompt_tokens(prompt)
            out = generate(llm.model, torch.tensor([ids]), n, temperature=0.0, eos_id=tok.eos_id,
                           vocab_size=tok.vocab_size)  # fmt: skip
            cache[prompt, n] = tok.decode([t for t in out[0, len(ids) :].tolist() if t != tok.eos_id])
        return cache[prompt, n]

    return text


class Server:
    def __init__(self, checkpoint: Path, *flags: str) -> None:
        cmd = [sys.executable, "-m", "litliger", "serve", str(checkpoint), "--port", "0", "--device", "cpu", *flags]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.startup = []
        for line in self.proc.stdout:
            self.startup.append(line)
            if "listening on" in line:
                self.url = line.split("listening on ")[1].split()[0]
                return
        raise AssertionError(f"the server did not start: {''.join(self.startup)}{self.proc.stderr.read()}")

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
        headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
        content = body if isinstance(body, str | bytes) else json.dumps(body)
        return httpx.post(f"{self.url}{path}", content=content, headers=headers, timeout=60, **kw)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", headers={"authorization": f"Bearer {KEY}"}).json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(base: Path):
    s = Server(base, "--api_key", KEY, "--max_batch_size", "8", "--max_body_bytes", str(BODY_LIMIT))
    yield s
    s.stop()


def test_startup_names_the_url_model_cache_and_batch_limit(server: Server, base: Path) -> None:
    text = "".join(server.startup)
    assert server.url.startswith("http://127.0.0.1:")  # binds this machine only unless --host says otherwise
    assert "64 tokens per request" in text and "batch limit: 8" in text and "API key: required" in text
    models = server.client().models.list().data
    assert [m.id for m in models] == ["base/final"] and server.health()["status"] == "ok"  # run/checkpoint


def test_greedy_completion_equals_generate_streamed_or_not(server: Server, base: Path, llm: LLM, greedy) -> None:
    client = server.client()
    for prompt in PROMPTS[:3]:
        expected = greedy_text(base, prompt, 20)  # from the checkpoint, as litliger generate loads it
        r = client.completions.create(model="any", prompt=prompt, max_tokens=20, temperature=0)
        assert r.choices[0].text == expected and r.model == "base/final"
        ids = llm.prompt_tokens(prompt)
        assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
        assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 20 else "stop")
        chunks = list(client.completions.create(model="any", prompt=prompt, max_tokens=20, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))  # fmt: skip
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices
    by_ids = client.completions.create(model="any", prompt=llm.prompt_tokens(PROMPTS[0]), max_tokens=20,
                                       temperature=0)  # fmt: skip
    assert by_ids.choices[0].text == greedy(PROMPTS[0], 20)


def test_chat_equals_llm_chat_streamed_or_not(server: Server, llm: LLM) -> None:
    messages = [{"role": "user", "content": "alpha beta"}]
    expected = llm.chat(messages, max_new_tokens=16)
    client = server.client()
    r = client.chat.completions.create(model="any", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(llm.chat_ids(messages))
    chunks = list(client.chat.completions.create(model="any", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_seeds_and_logprobs(server: Server, llm: LLM, greedy) -> None:
    client = server.client()
    full = greedy(PROMPTS[0], 20)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    r = client.completions.create(model="any", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(model="any", prompt=PROMPTS[1], max_tokens=12, temperature=1.0, seed=s)
        .choices[0]
        .text
        for s in (3, 3, 4)
    ]
    assert sampled[0] == sampled[1] == llm.generate(PROMPTS[1], 12, temperature=1.0, seed=3)
    r = client.completions.create(model="any", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 6
    if "\ufffd" not in "".join(lp.tokens):  # a byte token alone decodes to U+FFFD
        assert "".join(lp.tokens) == r.choices[0].text
    for top, value in zip(lp.top_logprobs, lp.token_logprobs, strict=True):
        # greedy: the chosen token is the most likely one; tokens whose text is the same share a key
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(value) and value < 0


def stream_text(server: Server, prompt: str, n: int, out: dict, key: str) -> None:
    chunks = server.client().completions.create(model="any", prompt=prompt, max_tokens=n, temperature=0, stream=True)
    out[key] = "".join(c.choices[0].text for c in chunks)


def test_16_concurrent_streams_each_equal_their_single_run_and_share_batches(server: Server, greedy) -> None:
    jobs = [(PROMPTS[i % len(PROMPTS)], 8 + 3 * (i % 5)) for i in range(16)]
    expected = {f"{i}": greedy(p, n) for i, (p, n) in enumerate(jobs)}
    before = server.health()
    out: dict[str, str] = {}
    threads = [threading.Thread(target=stream_text, args=(server, p, n, out, f"{i}")) for i, (p, n) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert out == expected
    after = server.health()
    assert after["largest_batch"] > 1 and after["decoding"] == after["waiting"] == 0
    tokens = sum(n for _, n in jobs)
    assert after["forwards"] - before["forwards"] < tokens  # shared forwards: fewer than one per token


def test_a_client_that_goes_away_frees_its_row(server: Server) -> None:
    before = server.health()["cancelled"]
    body = {"prompt": PROMPTS[0], "max_tokens": 58, "temperature": 0.5, "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, headers=headers, json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.time() + 30
    while time.time() < deadline and (server.health()["decoding"] or server.health()["cancelled"] == before):
        time.sleep(0.05)
    health = server.health()
    assert health["decoding"] == 0 and health["cancelled"] == before + 1
    assert server.client().completions.create(model="any", prompt="delta", max_tokens=4, temperature=0).choices


BAD_REQUESTS = [
    ("/v1/completions", '{"prompt": ', 400, "not valid JSON"),
    ("/v1/completions", "[1, 2]", 400, "dictionary"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt is empty"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1000}, 400, "context is 64 tokens"),
    ("/v1/completions", {"prompt": list(range(64))}, 400, "context is 64 tokens"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "not in the vocabulary"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n=2"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x" * (BODY_LIMIT + 1)}, 400, f"over {BODY_LIMIT} bytes"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "end with a user"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/nothing", {}, 404, "this server has"),
]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server: Server) -> None:
    for path, body, status, words in BAD_REQUESTS:
        r = server.post(path, body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert words in error["message"] and error["type"], (body, error)
    assert httpx.get(f"{server.url}/v1/completions", headers={"authorization": f"Bearer {KEY}"}).status_code == 405
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model="any", prompt="delta", max_tokens=2)
    for key in (None, "wrong"):
        assert server.post("/v1/completions", {"prompt": "x"}, key=key).status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 401  # every endpoint needs the key
    assert server.client().completions.create(model="any", prompt="delta", max_tokens=2, temperature=0).choices


def test_sigterm_lets_a_running_stream_finish_and_exits_0(server: Server, greedy) -> None:
    """The module's server, stopped last (the in-process tests below need none)."""
    got: dict[str, str] = {}
    t = threading.Thread(target=stream_text, args=(server, PROMPTS[2], 40, got, "text"))
    t.start()
    while not server.health().get("decoding") and t.is_alive():
        time.sleep(0.01)
    assert server.stop() == 0
    t.join(timeout=60)
    assert got["text"] == greedy(PROMPTS[2], 40)
    assert "litliger serve: stopped" in server.proc.stderr.read()


# --- the batcher, in-process -------------------------------------------------------------------------------------


def run_jobs(batcher: Batcher, llm: LLM, specs: list[tuple[str, int]], wait_first: bool) -> list[str]:
    """Submit ``specs`` (prompt, new tokens) greedily; with ``wait_first`` each after the previous one's first
    piece, so that it joins a running batch."""
    outs = []
    for prompt, n in specs:
        q: queue.Queue = queue.Queue()
        batcher.submit(Job(llm.prompt_tokens(prompt), n, q.put, AnswerText(llm.tokenizer, [llm.tokenizer.eos_id]),
                           temperature=0))  # fmt: skip
        outs.append(q)
        if wait_first:
            outs[-1] = (q, q.get())
    texts = []
    for item in outs:
        q, first = item if isinstance(item, tuple) else (item, None)
        pieces = [first] if first else []
        while not pieces or not (pieces[-1].finish_reason or pieces[-1].error):
            pieces.append(q.get(timeout=60))
        assert not pieces[-1].error
        texts.append("".join(p.text for p in pieces))
    return texts


def test_joining_a_running_batch_shifts_it_and_changes_no_row(base: Path, greedy) -> None:
    llm = LLM.load(base, device="cpu")  # its own model: the batcher's thread owns it
    batcher = Batcher(llm.model, llm.tokenizer, max_batch_size=4)
    try:
        # a short prompt decoding long, then longer prompts that join it (the running row shifts right), then rows
        # that finish early (the batch shrinks and its common padding goes)
        specs = [("delta", 40), (PROMPTS[4], 10), (PROMPTS[2], 5), ("kappa", 20), (PROMPTS[0], 12)]
        expected = [greedy(p, n) for p, n in specs]
        assert run_jobs(batcher, llm, specs, wait_first=True) == expected
        batcher.close()
        assert batcher.largest_batch > 1 and not batcher.rows and batcher.model.kv_cache_length is None
    finally:
        batcher.close()


def test_without_the_serve_extra_the_error_says_how_to_install(base: Path, monkeypatch) -> None:
    from litliger.serve.server import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    with pytest.raises(ValueError, match=r'^litliger serve needs uvicorn \(fastapi and uvicorn\), in the installation; '
                       r'pip install "litliger\[serve\]"$'):  # fmt: skip
        main(base, port=0, device="cpu")
