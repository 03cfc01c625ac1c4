"""What checkpoint verification costs: seconds per GB to write, record and verify a checkpoint folder's files.

    python -m benchmarks.verify --gb 1 --files 4

Writes ``--files`` safetensors files of ``--gb`` GB in all (deterministic writer), records their checksums,
then times ``verify_checksums`` (the sha256 of every file, a few files at once) and ``tensor_digest`` (a
finetune's base identity). The page cache is warm after the write; ``--drop_caches`` (root) empties it
before each read, so the figure is the disk's. Prints a table and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from litliger.checkpoint.checksums import verify_checksums, write_checksums
from litliger.checkpoint.tensor_files import save_tensors, tensor_digest


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn, cold: bool) -> float:
    if cold:
        drop_caches()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.verify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, default=1.0, help="total size of the tensor files")
    parser.add_argument("--files", type=int, default=4, help="number of files (e.g. model + optimizer shards)")
    parser.add_argument("--drop_caches", action="store_true", help="read from disk, not the page cache (root)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    per_file = int(args.gb * 2**30 / args.files / 4)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        for i in range(args.files):
            save_tensors(folder / f"part{i}.safetensors", {"w": torch.randn(per_file)})
        write_s = time.perf_counter() - start
        record_s = timed(lambda: write_checksums(folder), args.drop_caches)
        verify_s = timed(lambda: verify_checksums(folder, training_state=True), args.drop_caches)
        digest_s = timed(lambda: tensor_digest(folder / "part0.safetensors"), args.drop_caches) * args.files
        gb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30
    figures = {
        "gb": round(gb, 3),
        "files": args.files,
        "cores": os.cpu_count(),
        "cache": "cold" if args.drop_caches else "warm",
        "write_s_per_gb": round(write_s / gb, 3),
        "record_s_per_gb": round(record_s / gb, 3),
        "verify_s_per_gb": round(verify_s / gb, 3),
        "tensor_digest_s_per_gb": round(digest_s / gb, 3),
    }
    print(f"| {'what':<28} | s per GB |\n|{'-' * 30}|----------|")
    for key in ("write_s_per_gb", "record_s_per_gb", "verify_s_per_gb", "tensor_digest_s_per_gb"):
        print(f"| {key.removesuffix('_s_per_gb'):<28} | {figures[key]:>8.2f} |")
    print(f"({figures['gb']} GB in {args.files} files, {figures['cores']} cores, page cache {figures['cache']})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
