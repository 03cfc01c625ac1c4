"""Training-step throughput, peak memory and optimizer state of LoRA against full finetuning.

Both methods train the same model (``Config.from_name(--model_name)``, random init: ``build_finetune_model``
on the meta device, ``to_empty``, ``litliger.init.init_weights(seed=0)``; bf16-true casts it first, as the
engine does) on the same batch: ``--micro_batch`` random sequences of ``--seq`` tokens from a fixed seed, the
first half of every sequence a prompt (targets -100) and the second half the response, as an instruction
batch. One step is what the finetune recipe does: ``model(input_ids, targets=targets, reduction="sum") /
response tokens``, backward, gradient clipping to ``--max_norm`` (the recipe's default 1.0), the optimizer
from ``litliger.engine.build_optimizer`` (AdamW with the recipe's lr 2e-4 and no weight decay; torch picks
its foreach/fused implementation for the device), ``zero_grad(set_to_none=True)``.

Every (method, repetition) runs in its own fresh subprocess, interleaved (lora, full, lora, full, ...), so
a run's peak memory is its own and drift of the machine affects both methods alike.

- tokens/s: micro_batch * seq over each timed step's wall time (CUDA-synchronised), median over the
  ``--steps`` timed steps that follow ``--warmup`` untimed ones; the table shows the median over repetitions.
  Every position counts (the forward runs over all of them), not only the response tokens.
- peak memory: what the finetune holds at its highest, weights + gradients + optimizer state + activations.
  CPU: the process's peak RSS (``ru_maxrss``) at the end of the run minus its RSS (``/proc/self/statm``) just
  before the model is built, with glibc's mmap threshold fixed at 1 MiB so that freed tensors leave RSS (as
  ``benchmarks.flce_memory``). Before that baseline the worker has imported everything, made the batch and run
  two steps of a one-layer copy of the model (same method, precision and batch; then freed, and the heap
  trimmed with ``malloc_trim``): otherwise the library code and kernel caches that the first step pages in
  (~40-80 MiB, shared pages included) would count as the finetune's memory. A run whose peak stays below
  that warm-up's high-water mark is flagged as an upper bound (``peak_exact`` False).
  CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` just before the model is built
  (the peak statistics are reset there; the batch is already on the device).
  ``model MiB`` is the same measure right after initialisation (the weights alone).
- optimizer state: the bytes of every tensor in ``optimizer.state`` after the first step (AdamW: exp_avg,
  exp_avg_sq and the step counter of each trainable parameter). For LoRA the script checks that every state
  entry belongs to a ``lora_a``/``lora_b`` parameter (and that no frozen parameter got a gradient) and prints
  PASS/FAIL; the exit status is 1 on FAIL.
- MFU (where the device's peak is known, GPUs): the FLOPs each method performs per token, against the peak.
  Full: 6 N + attention (``litliger.model.config.flops_per_token``). LoRA: frozen weights get no weight gradient,
  so 4 N + 6 N_adapters + attention.

    python -m benchmarks.finetune                                  # CPU: debug-llama, seq 256, micro batch 4
    python -m benchmarks.finetune --model_name pythia-70m --seq 256 --micro_batch 2
    python -m benchmarks.finetune --model_name Llama-3.2-1B --seq 2048 --micro_batch 4 --device cuda \\
        --precision bf16-true --steps 10 --warmup 3

The results go to ``--out`` (bench_finetune.json) with the device, versions and the command line.
On a CPU shared with other work pass ``--threads 1``: with more threads than free cores, OpenMP threads
spin waiting for a descheduled peer (on 2 cores at load ~6, debug-llama ran ~10x slower with 2 threads).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import REPO, argv_as_run, child_env, module_argv
from benchmarks.memory import MIB, fix_mmap_threshold, max_rss_bytes, rss_bytes, trim_heap

METHODS = ("lora", "full")
PRECISIONS = ("32-true", "bf16-true", "bf16-mixed")


# --- one run (in its own subprocess) -------------------------------------------------------------------


def run_method(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build, train ``args.warmup + args.steps`` steps of ``method`` and measure; the worker's whole job."""
    if args.device == "cpu":
        fix_mmap_threshold()
    import torch

    from litliger.engine import build_optimizer
    from litliger.engine.args import OptimizerArgs
    from litliger.engine.metrics import peak_flops
    from litliger.model.config import Config, flops_per_token
    from litliger.model.lora import LoRAArgs, lora_parameter_names
    from litliger.nn.init import init_weights
    from litliger.recipes.finetune import build_finetune_model

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"n_layer": args.n_layer} if args.n_layer else {}
    config = Config.from_name(args.model_name, **overrides)
    lora_targets = tuple(args.lora_targets.split(","))
    lora = LoRAArgs(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=lora_targets)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq + 1), generator=gen)
    input_ids, targets = ids[:, :-1].contiguous(), ids[:, 1:].clone()
    targets[:, : args.seq // 2] = -100  # the prompt half: no loss, as an instruction batch
    input_ids, targets = input_ids.to(device), targets.to(device)
    n_targets = int((targets != -100).sum())

    def autocast() -> contextlib.AbstractContextManager:
        if args.precision == "bf16-mixed":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def build(cfg: Config) -> tuple[torch.nn.Module, list[str]]:
        with torch.device("meta"):
            model, trainable = build_finetune_model(cfg, method, lora if method == "lora" else None)
        if args.precision == "bf16-true":
            model.to(torch.bfloat16)
        model.to_empty(device=device)
        init_weights(model, seed=0)
        return model, trainable

    if not cuda:
        # Page in the library code, thread pools and kernel caches that the first steps touch (shared and
        # anonymous pages that RSS counts, tens of MiB): two steps of a one-layer copy on the same batch.
        warm, _ = build(Config.from_name(args.model_name, **{**overrides, "n_layer": 1}))
        warm_optimizer = build_optimizer(warm, OptimizerArgs(lr=2e-4, weight_decay=0.0))
        for _ in range(2):
            with autocast():
                loss = warm(input_ids, targets=targets, reduction="sum") / n_targets
            loss.backward()
            warm_optimizer.step()
            warm_optimizer.zero_grad(set_to_none=True)
        del warm, warm_optimizer

    gc.collect()
    trim_heap()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, high_water_before = rss_bytes(), max_rss_bytes()

    def held_mib() -> float:
        return ((torch.cuda.memory_allocated() if cuda else rss_bytes()) - base) / MIB

    model, trainable = build(config)
    model.train()
    model_mib = held_mib()
    names = {id(p): n for n, p in model.named_parameters()}
    lora_names = set(lora_parameter_names(model))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, OptimizerArgs(lr=2e-4, weight_decay=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    chosen = set(trainable)

    def step() -> torch.Tensor:
        with autocast():
            loss = model(input_ids, targets=targets, reduction="sum") / n_targets
        loss.backward()
        if args.max_norm:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], error_if_nonfinite=False)
            torch.nn.utils.clip_grads_with_norm_(params, args.max_norm, norm)
        optimizer.step()
        return loss.detach()

    seconds, losses, checks = [], [], {}
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
        if i == 0:  # before zero_grad: which parameters got a gradient
            checks["frozen_with_grad"] = [
                n for n, p in model.named_parameters() if p.grad is not None and n not in chosen
            ]
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
        if i == 0:
            state = [(names[id(p)], s) for p, s in optimizer.state.items()]
            tensors = [(n, k, t) for n, s in state for k, t in s.items() if torch.is_tensor(t)]
            checks["state_params"] = len(state)
            checks["state_tensors"] = len(tensors)
            checks["state_bytes"] = sum(t.numel() * t.element_size() for _, _, t in tensors)
            checks["state_not_lora"] = sorted({n for n, _, _ in tensors if n not in lora_names})
            checks["state_kinds"] = sorted({k for _, k, _ in tensors})
        losses.append(float(loss))

    if cuda:
        peak_mib, exact = (torch.cuda.max_memory_allocated() - base) / MIB, True
    else:
        peak = max_rss_bytes()
        peak_mib, exact = (peak - base) / MIB, peak > high_water_before
    tokens = args.micro_batch * args.seq
    per_step = [tokens / s for s in seconds]
    n_lora = sum(p.numel() for n, p in model.named_parameters() if n in lora_names)
    full_flops = flops_per_token(config, args.seq)
    attention = 12 * config.n_layer * config.n_head * config.head_size * args.seq
    n_matmul = (full_flops - attention) / 6
    flops = full_flops if method == "full" else 4 * n_matmul + 6 * n_lora + attention
    peak_device = peak_flops(device, args.precision)
    tokens_per_sec = statistics.median(per_step)
    lora_ok = method != "lora" or (
        not checks["state_not_lora"]
        and checks["state_params"] == len(trainable)
        and set(trainable) <= lora_names
        and not checks["frozen_with_grad"]
    )
    return {
        "method": method,
        "params": n_total,
        "trainable_params": n_trainable,
        "trainable_tensors": len(trainable),
        "lora_params": n_lora,
        "optimizer": type(optimizer).__name__,
        "optimizer_impl": {k: optimizer.defaults.get(k) for k in ("foreach", "fused")},
        "optimizer_state_mib": checks["state_bytes"] / MIB,
        "optimizer_state": checks,
        "state_only_lora": lora_ok if method == "lora" else None,
        "tokens_per_step": tokens,
        "response_tokens_per_step": n_targets,
        "tokens_per_sec": tokens_per_sec,
        "tokens_per_sec_steps": per_step,
        "flops_per_token": flops,
        "mfu": tokens_per_sec * flops / peak_device if peak_device else None,
        "model_mib": model_mib,
        "peak_mib": peak_mib,
        "peak_exact": exact,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }


# --- the driver -----------------------------------------------------------------------------------------


def spawn(method: str, argv: list[str], work: Path, index: int) -> dict[str, Any]:
    out = work / f"{index}-{method}.json"
    cmd = module_argv("benchmarks.finetune", *argv, "--worker", method, "--worker_out", str(out))
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=child_env())
    if result.returncode:
        raise SystemExit(f"{method} run failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(out.read_text())


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per method: medians over repetitions (state and parameter counts are the same in each)."""
    first = runs[0]
    row = {k: first[k] for k in ("method", "params", "trainable_params", "lora_params", "optimizer_state_mib")}
    row["tokens_per_sec"] = statistics.median(r["tokens_per_sec"] for r in runs)
    row["peak_mib"] = statistics.median(r["peak_mib"] for r in runs)
    row["model_mib"] = statistics.median(r["model_mib"] for r in runs)
    row["peak_exact"] = all(r["peak_exact"] for r in runs)
    mfus = [r["mfu"] for r in runs if r["mfu"] is not None]
    row["mfu"] = statistics.median(mfus) if mfus else None
    row["state_only_lora"] = None if first["method"] != "lora" else all(r["state_only_lora"] for r in runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_name", default="debug-llama")
    parser.add_argument("--n_layer", type=int, default=None, help="override the config's layer count")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (>= 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method, interleaved")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--precision", choices=PRECISIONS, default="32-true")
    parser.add_argument("--max_norm", type=float, default=1.0, help="gradient clipping as the recipe; 0: off")
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=16.0)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--lora_targets", default="qkv,proj,mlp", help="the LoRAArgs defaults, as the recipe")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="bench_finetune.json")
    parser.add_argument("--worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first step allocates the optimizer state)")

    if args.worker:
        Path(args.worker_out).write_text(json.dumps(run_method(args.worker, args)))
        return

    import torch

    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods has unknown {unknown}; choose from {METHODS}")
    command = shlex.join(argv_as_run("benchmarks.finetune"))
    if args.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    argv = list(sys.argv[1:])
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for method in methods:
                r = spawn(method, argv, Path(tmp), rep)
                runs[method].append(r)
                print(
                    f"  run {rep + 1}/{args.repeats} {method:4s}: {r['tokens_per_sec']:10.0f} tokens/s, "
                    f"peak {r['peak_mib']:8.1f} MiB",
                    flush=True,
                )
    wall = time.perf_counter() - start
    rows = [summarise(runs[m]) for m in methods]

    layers = f", n_layer {args.n_layer}" if args.n_layer else ""
    print(
        f"{args.model_name}{layers}, seq {args.seq}, micro batch {args.micro_batch}, {args.precision}, "
        f"{args.warmup} warm-up + {args.steps} timed steps x {args.repeats} runs per method, "
        f"threads {runs[methods[0]][0]['threads']}"
    )
    print(f"device: {device}; torch {torch.__version__}, python {platform.python_version()}")
    print(f"command: {command}")
    memory = "cuda max allocated" if args.device == "cuda" else "peak RSS growth from before the model is built"
    print(
        f"{'method':6s} {'trainable':>12s} {'of params':>9s} {'optim MiB':>10s} {'tokens/s':>10s} {'MFU':>6s} "
        f"{'model MiB':>10s} {'peak MiB':>10s}  ({memory})"
    )
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        flag = "" if r["peak_exact"] else "  (upper bound)"
        print(
            f"{r['method']:6s} {r['trainable_params']:12,d} {r['trainable_params'] / r['params']:9.2%} "
            f"{r['optimizer_state_mib']:10.2f} {r['tokens_per_sec']:10.0f} {mfu:>6s} {r['model_mib']:10.1f} "
            f"{r['peak_mib']:10.1f}{flag}"
        )
    by = {r["method"]: r for r in rows}
    ratios = None
    if "lora" in by and "full" in by:
        lo, fu = by["lora"], by["full"]
        ratios = {
            "tokens_per_sec": lo["tokens_per_sec"] / fu["tokens_per_sec"],
            "peak_mib": lo["peak_mib"] / fu["peak_mib"],
            "optimizer_state_mib": lo["optimizer_state_mib"] / fu["optimizer_state_mib"],
        }
        print(
            f"LoRA / full: tokens/s {ratios['tokens_per_sec']:.2f}x, peak memory {ratios['peak_mib']:.2f}x, "
            f"optimizer state {ratios['optimizer_state_mib']:.4f}x"
        )
    passed = None
    if "lora" in by:
        lora_runs = runs["lora"]
        passed = bool(by["lora"]["state_only_lora"])
        state = lora_runs[0]["optimizer_state"]
        detail = (
            f"{state['state_tensors']} state tensors ({', '.join(state['state_kinds'])}) over "
            f"{state['state_params']} parameters, all lora_a/lora_b"
        )
        if not passed:
            bad = {k: state[k] for k in ("state_not_lora", "frozen_with_grad")}
            detail = f"{state['state_params']} parameters with state; offending: {bad}"
        print(f"LoRA optimizer state only the adapters': {'PASS' if passed else 'FAIL'} ({detail})")
    result = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": command,
        "args": vars(args),
        "memory_measure": memory,
        "wall_s": wall,
        "rows": rows,
        "lora_over_full": ratios,
        "lora_state_only_adapters": passed,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if passed is False:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
