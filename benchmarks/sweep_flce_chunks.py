"""Timing sweep of the fused linear cross-entropy over chunk sizes, against the naive loss.

For each vocabulary size, fwd + bwd of ``fused_linear_cross_entropy(h, W, t, chunk_size=c)`` for c in powers of
two up to the token count, and of ``F.cross_entropy(h @ W.T, t)``, medians of ``--repeats`` interleaved runs.
The chunk rule in litliger/kernels/fused_linear_cross_entropy.py (``default_chunk_size``) was chosen from it;
tutorials/kernels.md shows the table.

    python -m benchmarks.sweep_flce_chunks                          # CPU: the PyTorch twin, H 256, 2048 tokens
    python -m benchmarks.sweep_flce_chunks --device cuda --hidden 2048 --tokens 8192 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks import argv_as_run
from litliger.kernels import fused_linear_cross_entropy
from litliger.kernels.fused_linear_cross_entropy import default_chunk_size


def time_once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep_flce_chunks", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--min_chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench_flce_chunks.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}, H {args.hidden}, "
          f"{args.tokens} tokens; command: {' '.join(argv_as_run('benchmarks.sweep_flce_chunks'))}")  # fmt: skip
    results = []
    for vocab in args.vocabs:
        gen = torch.Generator().manual_seed(0)
        h = (torch.randn(args.tokens, args.hidden, generator=gen)).to(device, dtype).requires_grad_()
        w = (torch.randn(vocab, args.hidden, generator=gen) * 0.02).to(device, dtype).requires_grad_()
        t = torch.randint(0, vocab, (args.tokens,), generator=gen).to(device)
        chunks = []
        c = args.min_chunk
        while c < args.tokens:
            chunks.append(c)
            c *= 2
        chunks.append(args.tokens)

        def fused(c: int, h: torch.Tensor = h, w: torch.Tensor = w, t: torch.Tensor = t) -> None:
            fused_linear_cross_entropy(h, w, t, chunk_size=c).backward()
            h.grad = w.grad = None

        def naive(h: torch.Tensor = h, w: torch.Tensor = w, t: torch.Tensor = t) -> None:
            F.cross_entropy((h @ w.T).float(), t).backward()
            h.grad = w.grad = None

        runs: dict[str, list[float]] = {"naive": [], **{str(c): [] for c in chunks}}
        naive()  # warm-up
        for _ in range(args.repeats):
            runs["naive"].append(time_once(naive, device))
            for c in chunks:
                runs[str(c)].append(time_once(lambda c=c: fused(c), device))
        med = {k: statistics.median(v) for k, v in runs.items()}
        rule = default_chunk_size(args.tokens, args.hidden, vocab, h.element_size(), device.type == "cuda")
        print(f"\nvocab {vocab}: naive {med['naive'] * 1e3:.0f} ms; default_chunk_size -> {rule} rows")
        print(f"{'chunk':>8} {'ms':>9} {'vs naive':>9} {'logits MiB':>11}")
        for c in chunks:
            mib = c * vocab * 4 / 2**20
            mark = "  <- rule" if c == rule else ""
            print(f"{c:>8} {med[str(c)] * 1e3:>9.0f} {med[str(c)] / med['naive']:>8.2f}x {mib:>11.0f}{mark}")
        results.append({"vocab": vocab, "median_s": med, "rule": rule})
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "results": results}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
