"""Activation checkpointing: step time against ``none``, and what every block keeps for backward.

Time: one full-model training step (forward with the mode, backward, AdamW) of ``--model_name`` at
``--micro_batch`` x ``--seq`` on the same batch, median over ``--steps`` steps after ``--warmup``, each mode in its
own subprocess, interleaved (none, full, selective, selective:op, none, ...), glibc's allocator in a training run's
steady state (as ``benchmarks.packing``). The ratios are against ``none`` of the same repetition round.
Criteria: full <= 1.4x none, selective <= 1.15x none.

Memory (traced in this process, on real tensors, with ``litliger.engine.live_bytes.LiveBytes``): the bytes held
at the end of forward (everything backward needs) per mode, the part made inside each block divided by the blocks,
and for ``none`` and ``selective:op`` the bytes block 0 keeps, by the op that made them.

    python -m benchmarks.checkpointing                      # CPU: debug-llama, micro batch 8 x 128
    python -m benchmarks.checkpointing --model_name pythia-160m --seq 512 --micro_batch 2 --threads 2
    python -m benchmarks.checkpointing --device cuda --model_name Llama-3.2-1B --seq 2048 --micro_batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks import argv_as_run, child_env, module_argv
from benchmarks.packing import STEADY_MALLOC

MODES = ("none", "full", "selective", "selective:op")
MIB = 2**20


def _model(args: argparse.Namespace, mode: str) -> tuple[Any, Any, Any]:
    import torch

    from litliger import GPT, Config
    from litliger.engine import OptimizerArgs, build_optimizer
    from litliger.model.checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    with torch.device(args.device):
        model = GPT(Config.from_name(args.model_name))
    model.max_seq_length = args.seq
    apply_activation_checkpointing(model, mode)
    idx = torch.randint(0, model.config.vocab_size, (args.micro_batch, args.seq), device=args.device)
    return model, build_optimizer(model, OptimizerArgs()), idx


def time_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, opt, idx = _model(args, mode)
    times = []
    for i in range(args.warmup + args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = model(idx, targets=idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"mode": mode, "step_s": statistics.median(times)}


def held_bytes(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """What one forward keeps for backward, in total, per block and (block 0) by op."""

    from litliger.engine.live_bytes import LiveBytes, storage_bytes

    model, opt, idx = _model(args, mode)
    held = [*model.parameters(), *model.buffers()]
    live = LiveBytes(storage_bytes(held), held)
    hooks = [b.register_forward_pre_hook(lambda *_, i=i: live.enter(f"block {i}")) for i, b in
             enumerate(model.transformer.h)]  # fmt: skip
    hooks.append(model.transformer.ln_f.register_forward_pre_hook(lambda *_: live.enter("head")))
    with live:
        loss = model(idx, targets=idx)
        held = live.held()
    for h in hooks:
        h.remove()
    del loss
    n = len(model.transformer.h)
    blocks = sum(v for (phase, _), v in held.items() if phase.startswith("block "))
    block0 = {op: v for (phase, op), v in held.items() if phase == "block 0"}
    return {"mode": mode, "total": sum(held.values()), "per_block": blocks / n, "block0_by_op": block0,
            "outside_blocks": sum(held.values()) - blocks}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model_name", default="debug-llama")
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="bench_checkpointing.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(time_mode(args.worker, args)))
        return

    flags = ["--device", args.device, "--model_name", args.model_name, "--micro_batch", str(args.micro_batch),
             "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--threads", str(args.threads)]  # fmt: skip
    rounds = []
    for _ in range(args.repeats):
        row = {}
        for mode in MODES:
            cmd = module_argv("benchmarks.checkpointing", *flags, "--worker", mode)
            done = subprocess.run(cmd, env=child_env() | STEADY_MALLOC, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"worker {mode} failed:\n{done.stderr[-3000:]}")
            row[mode] = json.loads(done.stdout.strip().splitlines()[-1])["step_s"]
        rounds.append(row)
    memory = {mode: held_bytes(mode, args) for mode in MODES}

    import torch

    print(f"{args.model_name}, micro batch {args.micro_batch} x {args.seq}, {args.device}, torch {torch.__version__}, "
          f"threads {args.threads or 'default'}, {args.repeats} rounds x {args.steps} steps")  # fmt: skip
    print(f"{'mode':>13} {'step ms':>9} {'x none':>7} {'held MiB':>9} {'per block':>10} {'outside':>8}")
    verdicts = []
    for mode in MODES:
        ms = statistics.median(r[mode] for r in rounds) * 1e3
        ratio = statistics.median(r[mode] / r["none"] for r in rounds)
        m = memory[mode]
        print(f"{mode:>13} {ms:9.1f} {ratio:7.2f} {m['total'] / MIB:9.2f} {m['per_block'] / MIB:10.2f} "
              f"{m['outside_blocks'] / MIB:8.2f}")  # fmt: skip
        if mode in ("full", "selective"):
            limit = 1.4 if mode == "full" else 1.15
            verdicts.append((mode, ratio, limit, ratio <= limit))
    none = memory["none"]["total"]
    for mode in MODES[1:]:
        print(f"  {mode}: holds {1 - memory[mode]['total'] / none:.0%} less than none")
    for mode in ("none", "selective:op"):
        parts = sorted(memory[mode]["block0_by_op"].items(), key=lambda kv: -kv[1])
        print(f"  block 0 keeps ({mode}): " + ", ".join(f"{op} {v / MIB:.2f}" for op, v in parts) + " MiB")
    for mode, ratio, limit, ok in verdicts:
        print(f"  {mode} / none = {ratio:.2f}x (criterion <= {limit}x): {'PASS' if ok else 'FAIL'}")
    with open(args.out, "w") as f:
        json.dump({"command": argv_as_run("benchmarks.checkpointing"), "rounds": rounds, "memory": memory}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
