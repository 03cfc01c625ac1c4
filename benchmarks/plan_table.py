"""The memory-plan table of tutorials/pretrain.md: per-GPU memory by part, from ``litliger plan``'s tracer.

For each model at each sequence length, on 1 GPU and on 8 (FSDP2), with no, selective (every second block) and
full activation checkpointing: micro batch 1, bf16-mixed, AdamW. Every number is a trace of one training step on
fake tensors (``litliger.engine.memory_plan``); nothing runs on a GPU.

    python -m benchmarks.plan_table                      # the tutorial's table (a few minutes on a CPU)
    python -m benchmarks.plan_table --models Llama-3.2-1B --seqs 2048
"""

from __future__ import annotations

import argparse
import json

from litliger import GPT, Config
from litliger.engine.memory_plan import per_device, trace_step

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["Llama-3.2-1B", "TinyLlama-1.1B-intermediate-step-1431k-3T",
                                                        "Llama-3.1-8B"])  # fmt: skip
    parser.add_argument("--seqs", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--out", default="bench_plan_table.json")
    args = parser.parse_args()
    rows = []
    print("| model | seq | GPUs | checkpointing | params | grads | optimizer | activations | peak |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        config = Config.from_name(name)
        for seq in args.seqs:
            if seq > config.block_size:
                print(f"| {name} | {seq} | | | longer than its block_size {config.block_size} | | | | |")
                continue
            for mode in ("none", "selective", "full"):
                trace = trace_step(
                    lambda c=config: GPT(c),
                    micro_batch_size=1,
                    seq_len=seq,
                    vocab_size=config.padded_vocab_size,
                    precision="bf16-mixed",
                    checkpointing=mode,
                )
                for gpus in args.gpus:
                    strategy = "fsdp" if gpus > 1 else "ddp"
                    parts = per_device(trace, strategy=strategy, world_size=gpus)[0]
                    rows.append({"model": name, "seq": seq, "gpus": gpus, "checkpointing": mode, **parts})
                    cells = [parts[k] / GIB for k in ("parameters", "gradients", "optimizer", "activations", "peak")]
                    label = "FSDP2 x 8" if gpus > 1 else "1"
                    print(f"| {name} | {seq} | {label} | {mode} | " + " | ".join(f"{c:.1f}" for c in cells) + " |",
                          flush=True)  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
