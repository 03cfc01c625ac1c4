"""Peak memory of fused_linear_cross_entropy (forward + backward) against the naive
``F.cross_entropy(hidden @ weight.T, targets)`` (+ backward).

CPU (default): every variant runs in its own fresh subprocess, and its peak is the process's peak RSS
(``ru_maxrss``) minus its RSS just before the loss call (``/proc/self/statm``), with the inputs already allocated
(and glibc's mmap threshold fixed so that freed tensors leave RSS, see ``benchmarks.memory.fix_mmap_threshold``).
The fused variant runs the default backend ("auto": the chunked twin on CPU) and, with ``--include-interpreter``,
the Triton kernels through the interpreter too (TRITON_INTERPRET=1 is set for that subprocess; slow).
CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` minus what was allocated before the call, for vocab
65536 in fp32 and vocab 128256 in bf16.

    python -m benchmarks.flce_memory [--device cpu|cuda] [--include-interpreter] [--out bench_flce_memory.json]

Other benchmarks can import :func:`peak_memory_mib` to measure their own callables the same way.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from benchmarks import argv_as_run
from benchmarks.memory import MIB, fix_mmap_threshold, rss_bytes


def _measure_rss(setup: Callable[..., Any], run: Callable[[Any], None], args: tuple, env: dict[str, str]) -> dict:
    os.environ.update(env)  # before ``setup`` imports anything that reads it (e.g. TRITON_INTERPRET)
    fix_mmap_threshold()
    inputs = setup(*args)
    gc.collect()
    before = rss_bytes()
    high_water_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    start = time.perf_counter()
    run(inputs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # If the process had been bigger before the call than at any point during it, peak - before understates.
    return {"peak_mib": (peak - before) / MIB, "exact": peak > high_water_before, "seconds": seconds}


def peak_memory_mib(
    setup: Callable[..., Any],
    run: Callable[[Any], None],
    *args: Any,
    device: str = "cpu",
    env: dict[str, str] | None = None,
) -> dict:
    """Peak memory (MiB) that ``run(setup(*args))`` adds on top of its already allocated inputs.

    CPU: ``setup`` and ``run`` execute in a fresh spawned subprocess (with ``env`` added to its environment), so
    earlier work cannot hide or inflate the figure; they must be picklable (module-level functions).
    Returns ``{"peak_mib", "exact", "seconds"}``; ``exact`` is False when the process's earlier RSS high-water
    mark exceeded the call's peak (then the figure is an upper bound: that earlier mark minus the baseline).
    CUDA: in-process, from the caching allocator's peak after one warm-up call (``env`` is ignored).
    """
    if device == "cpu":
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_measure_rss, setup, run, args, env or {}).result()
    run(setup(*args))  # warm-up: Triton compilation, cuBLAS workspaces and the like are not the op's memory
    inputs = setup(*args)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run(inputs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - before
    del inputs
    return {"peak_mib": peak / MIB, "exact": True, "seconds": seconds}


def make_inputs(tokens: int, hidden: int, vocab: int, dtype: str, device: str, backend: str, chunk_size: int | None):
    """Inputs allocated in place (no temporaries that would raise the RSS high-water mark before the call)."""
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h = torch.randn(tokens, hidden, dtype=dt, device=device).requires_grad_()
    w = torch.randn(vocab, hidden, dtype=dt, device=device).mul_(hidden**-0.5).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device=device)
    return h, w, t, backend, chunk_size


def run_naive(inputs) -> None:
    h, w, t, _, _ = inputs
    torch.nn.functional.cross_entropy(h @ w.T, t).backward()


def run_fused(inputs) -> None:
    from litliger.kernels import fused_linear_cross_entropy, use_backend

    h, w, t, backend, chunk_size = inputs
    with use_backend(backend):
        fused_linear_cross_entropy(h, w, t, chunk_size=chunk_size).backward()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flce_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--include-interpreter", action="store_true", help="CPU: also the Triton path (slow)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the op's own rule")
    parser.add_argument("--out", default="bench_flce_memory.json")
    args = parser.parse_args()

    cases = [(65536, "float32")] + ([(128256, "bfloat16")] if args.device == "cuda" else [])
    # (name, run, backend, extra environment, runs what the op does by default on this device)
    variants = [("naive F.cross_entropy(h @ W.T)", run_naive, "auto", {}, False)]
    if args.device == "cuda":
        variants += [("fused (auto: triton)", run_fused, "auto", {}, True)]
        variants += [("fused (torch twin)", run_fused, "torch", {}, False)]
    else:
        variants += [("fused (auto: torch twin)", run_fused, "auto", {}, True)]
        if args.include_interpreter:
            variants += [("fused (triton interpreter)", run_fused, "triton", {"TRITON_INTERPRET": "1"}, False)]

    results = []
    for vocab, dtype in cases:
        naive_mib = None
        for name, run, backend, env, default in variants:
            setup_args = (args.tokens, args.hidden, vocab, dtype, args.device, backend, args.chunk_size)
            r = peak_memory_mib(make_inputs, run, *setup_args, device=args.device, env=env)
            naive_mib = naive_mib or r["peak_mib"]
            r.update(variant=name, default_backend=default, tokens=args.tokens, hidden=args.hidden)
            r.update(vocab=vocab, dtype=dtype, ratio_vs_naive=r["peak_mib"] / naive_mib)
            results.append(r)

    print(f"device={args.device} torch={torch.__version__} python={platform.python_version()}")
    header = ("tokens", "hidden", "vocab", "dtype", "variant", "peak MiB", "vs naive", "s")
    print("{:>6} {:>6} {:>6} {:>8}  {:<30} {:>9} {:>8} {:>6}".format(*header))
    for r in results:
        flag = "" if r["exact"] else "  (upper bound)"
        print(
            f"{r['tokens']:>6} {r['hidden']:>6} {r['vocab']:>6} {r['dtype']:>8}  {r['variant']:<30} "
            f"{r['peak_mib']:>9.1f} {r['ratio_vs_naive']:>8.1%} {r['seconds']:>6.1f}{flag}"
        )
    if any("interpreter" in r["variant"] for r in results):
        print(
            "note: Triton's interpreter keeps each launch's tensor arguments in a reference cycle until Python's GC "
            "runs (GridExecutor._init_args_hst), so its row also holds one freed logits chunk; on a GPU it would not."
        )
    ok = all(r["ratio_vs_naive"] <= 0.25 for r in results if r["default_backend"] and r["dtype"] == "float32")
    print(f"fused (default backend, fp32) peaks at <= 25% of naive: {'yes' if ok else 'NO'}")
    meta = {
        "device": args.device,
        "torch": torch.__version__,
        "command": " ".join(argv_as_run("benchmarks.flce_memory")),
    }
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    with open(args.out, "w") as f:
        json.dump({**meta, "results": results, "fused_within_25_percent": ok}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
