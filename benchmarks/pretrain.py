"""Training-step throughput and peak memory of `litliger pretrain`, fused kernels against the PyTorch twins.

Each backend runs the real recipe (`python -m litliger pretrain ...`) in its own process with
LITLIGER_KERNELS set, on a synthetic corpus (random words, no download). tokens/s is the median of the
logged intervals after the first (compilation / warm-up); MFU comes from the engine's metrics where the
device's peak is known (GPUs). Peak memory is torch.cuda.max_memory_allocated on GPU (logged by the
engine) and the process's peak RSS on CPU (also logged by the engine).

    python -m benchmarks.pretrain --model_name debug-llama --steps 30 --seq 256 --micro_batch 8
    python -m benchmarks.pretrain --model_name Llama-3.2-1B --steps 40 --seq 2048 --micro_batch 4  # GPU

On a CPU, ``auto`` resolves to the twins too (Triton kernels are GPU code), so both rows measure the same
path; the comparison is meaningful on a GPU. ``auto+compile`` runs the recipe with ``--compile true``
(torch.compile through litliger's custom ops); its first interval, which holds the compilation, is skipped
like every backend's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import REPO, child_env


def write_corpus(root: Path, n_files: int = 64, words: int = 4000) -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(words)))


def run_backend(backend: str, args: argparse.Namespace, corpus: Path, work: Path) -> dict:
    """``backend``: ``auto``, ``triton`` or ``torch``, with ``+compile`` for a run under ``--compile true``."""
    kernels, _, compiled = backend.partition("+")
    out = work / f"out-{kernels}-{compiled or 'eager'}"
    cmd = [
        sys.executable, "-m", "litliger", "pretrain",
        "--model_name", args.model_name,
        "--out_dir", str(out),
        "--data", "litliger.data.TextFiles",
        "--data.train_data_path", str(corpus),
        "--train.micro_batch_size", str(args.micro_batch),
        "--train.global_batch_size", str(args.micro_batch * args.accum),
        "--train.max_seq_length", str(args.seq),
        "--train.max_steps", str(args.steps),
        "--train.lr_warmup_steps", "2",
        "--train.log_interval", str(args.log_interval),
        "--train.save_interval", "null",
        "--eval.interval", "null",
        "--eval.final_validation", "false",
    ]  # fmt: skip
    if args.precision:
        cmd += ["--precision", args.precision]
    if compiled:
        cmd += ["--compile", "true"]
    env = child_env({**os.environ, "LITLIGER_KERNELS": kernels, "LITLIGER_CACHE": str(work / "cache")})
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"{backend} run failed:\n{result.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "tokens_per_sec" in m][1:] or [m for m in lines if "tokens_per_sec" in m]
    return {
        "backend": backend,
        "tokens_per_sec": statistics.median(m["tokens_per_sec"] for m in steps),
        "mfu": statistics.median(m["mfu"] for m in steps) if all("mfu" in m for m in steps) else None,
        "peak_mem_mib": max(m.get("max_memory_mib", m.get("max_rss_mib", 0)) for m in steps),
        "memory_kind": "cuda max allocated" if "max_memory_mib" in steps[-1] else "process peak RSS",
        "final_loss": steps[-1]["loss"],
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_name", default="debug-llama")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--log_interval", type=int, default=5)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--backends", default="auto,torch,auto+compile", help="+compile: under --compile true")
    parser.add_argument("--out", default="bench_pretrain.json")
    args = parser.parse_args()

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_corpus(work / "corpus")
        rows = [run_backend(b, args, work / "corpus", work) for b in args.backends.split(",")]
    print(
        f"{args.model_name}, seq {args.seq}, micro batch {args.micro_batch}, {args.steps} steps on {device}, "
        f"torch {torch.__version__}"
    )
    print(f"{'backend':13s} {'tokens/s':>10s} {'MFU':>6s} {'peak MiB':>9s}  memory")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        print(f"{r['backend']:13s} {r['tokens_per_sec']:10.0f} {mfu:>6s} {r['peak_mem_mib']:9.0f}  {r['memory_kind']}")
    Path(args.out).write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
