"""``litliger serve`` under concurrent clients: total tokens/s and time to first token for 1, 4 and 8 clients.

Starts ``litliger serve CHECKPOINT --port 0`` in its own process, then for each concurrency level runs that many
client threads with the official ``openai`` client; each sends ``--requests`` streaming completions one after the
other (greedy, ``--max-tokens`` each, prompts taken in turn from a fixed list), so the server always has that many
requests in flight. Tokens are the completion tokens the server reports (``usage``, streamed with
``include_usage``); tokens/s is their total over the level's wall time; TTFT is the time from sending a request to
its first text chunk (median and 90th percentile). Also checks that every answer equals the same prompt's answer
at concurrency 1 (greedy: batching must not change a row). Prints a table and the 8-vs-1 speedup.

    python -m benchmarks.serve [--checkpoint out/pretrain/debug/final] [--levels 1 4 8] [--requests 6]
                               [--max-tokens 128] [--device cpu|cuda] [--out bench_serve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time

import torch

PROMPTS = [
    "def fibonacci(n):",
    "import os\n",
    "class Stack:\n    def __init__(self):",
    "# Read a file and count its lines\n",
    "for i in range(10):",
    '"""Utilities for parsing dates.',
    "def main():\n    args = ",
    "try:\n    import json\nexcept ImportError:",
]


def start_server(checkpoint: str, device: str, max_batch_size: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "litliger", "serve", checkpoint, "--port", "0", "--device", device,
           "--max_batch_size", str(max_batch_size)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        print(line, end="")
        if "listening on " in line:
            return proc, line.split("listening on ")[1].split()[0]
    raise SystemExit("the server did not start")


def one_request(client, prompt: str, max_tokens: int) -> tuple[str, int, float, float]:
    """(text, completion tokens, time to first chunk, total time) of one streamed greedy completion."""
    start = time.perf_counter()
    first, text, tokens = None, [], 0
    stream = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if chunk.choices:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].text)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return "".join(text), tokens, (first or end) - start, end - start


def level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    results: list[tuple[str, str, int, float, float]] = []
    lock = threading.Lock()

    def client_loop(c: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        for r in range(requests):
            prompt = PROMPTS[(c * requests + r) % len(PROMPTS)]
            out = one_request(client, prompt, max_tokens)
            with lock:
                results.append((prompt, *out))

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    ttft = sorted(r[3] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(ttft),
        "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "answers": {p: t for p, t, *_ in results},
        "all_answers": [(p, t) for p, t, *_ in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="out/pretrain/debug/final")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=6, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    proc, url = start_server(args.checkpoint, args.device, max(args.levels))
    try:
        level(url, 1, 1, 8)  # warm-up
        rows = [level(url, n, args.requests, args.max_tokens) for n in args.levels]
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    alone = rows[0]["answers"]
    mismatched = sum(alone.get(p, t) != t for row in rows for p, t in row["all_answers"])
    where = f"{args.device} ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__})"
    print(
        f"\nlitliger serve {args.checkpoint} on {where}: {args.requests} requests per client, {args.max_tokens} "
        "tokens each"
    )
    print("| clients | requests | tokens | wall s | total tokens/s | vs 1 client | TTFT median s | TTFT p90 s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = rows[0]["tokens_per_s"]
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / base:.2f}x | {r['ttft_median_s']:.3f} | {r['ttft_p90_s']:.3f} |")  # fmt: skip
    print(f"answers that differ from the same prompt's answer at {rows[0]['clients']} client(s): {mismatched}")
    print(f"server exit code after SIGINT: {code}")
    if args.out:
        for r in rows:
            r.pop("all_answers")
        with open(args.out, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "device": args.device, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
