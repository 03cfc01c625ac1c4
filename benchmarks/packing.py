"""Packed against padded finetuning, and document-masked against plain pretraining: throughput and memory.

Finetuning (``--part finetune``): the debug finetune's data and model (``PythonDocstrings(max_examples=3000)``,
``debug-llama`` with LoRA r=8 on qkv, proj and the MLP, micro batch 8, max_seq_length 256; the model is randomly
initialised, which changes nothing about the work a step does). Both modes train on the same ``--examples``
training examples for one pass: unpacked, batches of 8 examples padded to their longest; packed, the same examples
packed into rows of 256 positions (``litliger.data.packing.pack``), batches of 8 rows with document ids. A step
is the recipe's: summed loss over the target tokens / their count, backward, AdamW.

- target tok/s: response tokens trained on (targets != -100, the same in both modes up to the few examples of a
  last incomplete batch) over the wall time of the pass, after ``--warmup`` untimed steps.
- padding: the share of the batches' positions that are padding (``ExampleLoader.padding_fraction``).
- the criterion: packed target tok/s >= 0.9 x 1 / (1 - p) x unpacked, p the unpacked padding share (removing the
  padding can at best divide the work by 1 / (1 - p)); printed PASS/FAIL.

Pretraining (``--part pretrain``): the debug pretraining run (``PythonStdlib(max_bytes=4e6)``, ``debug-llama``,
micro batch 8, max_seq_length 128), ``--steps`` full-model AdamW steps on the same batches with and without
``document_mask``; tokens/s and the ratio (criterion: masked >= 0.9 x plain). Documents per row are printed: the
mask is doing work only when rows span several documents.

Peak memory: the worker's peak RSS (``ru_maxrss``) minus its RSS before the model is built (CPU), or
``torch.cuda.max_memory_allocated`` (CUDA). Every (mode, repetition) runs in a fresh subprocess, interleaved.
glibc's allocator runs as in a long training run's steady state (``STEADY_MALLOC``: tensors below 32 MiB from the
heap, freed memory kept), the same for every worker. Left to glibc's dynamic threshold, a short fresh process
serves some tensor sizes by mmap with page faults on every step and others from the heap, depending on what was
freed first: ``benchmarks.finetune``'s fixed 1 MiB threshold doubled the time of a (8, 256) debug-llama step,
and the dynamic one charged packed rows 18% more per position than in one warmed-up process, where packed and
unpacked positions cost the same (96 us each).

    python -m benchmarks.packing                         # both parts, CPU
    python -m benchmarks.packing --part finetune --threads 1 --repeats 3
    python -m benchmarks.packing --part pretrain --seq 512 --micro_batch 2   # rows of several documents
    python -m benchmarks.packing --part pretrain --device cuda --model_name Llama-3.2-1B --seq 2048 --micro_batch 4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks import argv_as_run, child_env, module_argv
from benchmarks.memory import MIB, max_rss_bytes, rss_bytes

MODES = {"finetune": ("unpacked", "packed"), "pretrain": ("plain", "masked")}
_STEADY = {"mmap_threshold": 32 << 20, "trim_threshold": 1 << 30}
STEADY_MALLOC = {
    "GLIBC_TUNABLES": ":".join(f"glibc.malloc.{k}={v}" for k, v in _STEADY.items()),
    "MALLOC_MMAP_THRESHOLD_": str(_STEADY["mmap_threshold"]),
    "MALLOC_TRIM_THRESHOLD_": str(_STEADY["trim_threshold"]),
}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _model(args: argparse.Namespace, method: str) -> tuple[Any, Any]:
    import torch

    from litliger.engine import OptimizerArgs, build_optimizer
    from litliger.model.config import Config
    from litliger.model.lora import LoRAArgs
    from litliger.recipes.finetune import build_finetune_model

    torch.manual_seed(0)
    config = Config.from_name(args.model_name)
    with torch.device(args.device):
        lora = LoRAArgs(r=8, alpha=16, dropout=0.05, targets=("qkv", "proj", "mlp")) if method == "lora" else None
        model, _ = build_finetune_model(config, method, lora)
    model.max_seq_length = args.seq
    return model, build_optimizer(model, OptimizerArgs(name="AdamW", lr=3e-3, weight_decay=0.0))


def _tokenizer(args: argparse.Namespace) -> Any:
    from litliger.data import PythonStdlib
    from litliger.model.config import Config

    return PythonStdlib(max_bytes=4_000_000).train_tokenizer(Config.from_name(args.model_name).vocab_size)


def _batches_finetune(args: argparse.Namespace, mode: str) -> tuple[list, dict[str, Any]]:
    from litliger.data import PythonDocstrings
    from litliger.data.example_loader import ExampleLoader
    from litliger.data.packing import pack

    data = PythonDocstrings(max_examples=3000, val_split_fraction=0.05)
    data.connect(_tokenizer(args), batch_size=args.micro_batch, max_seq_length=args.seq)
    data.prepare_data()
    data.setup()
    examples = data.examples("train")[: args.examples]
    rows = pack([len(e.ids) - 1 for e in examples], args.seq) if mode == "packed" else None
    loader = ExampleLoader(
        examples, args.micro_batch, data._pad_id(), seed=42, rows=rows, rank=0, world_size=1, row_width=args.seq
    )  # fmt: skip (as Instructions(packing=True) builds it)
    unpacked = ExampleLoader(examples, args.micro_batch, data._pad_id(), seed=42, rank=0, world_size=1)
    info = {"examples": len(examples), "padding": loader.padding_fraction(), "p_unpacked": unpacked.padding_fraction()}
    if rows is not None:
        info["rows"] = len(rows)
    return list(loader), info


def _batches_pretrain(args: argparse.Namespace, mode: str) -> tuple[list, dict[str, Any]]:
    import itertools

    from litliger.data import PythonStdlib

    data = PythonStdlib(max_bytes=4_000_000, document_mask=mode == "masked", seed=42)
    data.connect(_tokenizer(args), batch_size=args.micro_batch, max_seq_length=args.seq)
    data.prepare_data()
    data.setup()
    batches = list(itertools.islice(iter(data.train_dataloader()), args.warmup + args.steps))
    info = {}
    if mode == "masked":
        docs = [int(row.max()) + 1 for b in batches for row in b["document_ids"]]
        info["documents_per_row"] = sum(docs) / len(docs)
    return batches, info


def run_mode(part: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One worker: build the batches and the model, train, measure."""
    import torch

    from litliger.engine import next_token_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    make = _batches_finetune if part == "finetune" else _batches_pretrain
    batches, info = make(args, mode)
    base_rss = rss_bytes()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    model, optimizer = _model(args, "lora" if part == "finetune" else "full")

    def step(batch: Any) -> int:
        batch = {k: v.to(args.device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(args.device)
        targets = batch["targets"] if isinstance(batch, dict) and "targets" in batch else None
        count = int((targets != -100).sum()) if targets is not None else None
        if count is None:
            tokens = batch["tokens"] if isinstance(batch, dict) else batch
            count = tokens[:, 1:].numel()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = next_token_loss(model, batch) / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return count

    warm = batches[: args.warmup]
    timed = batches[args.warmup :] if part == "pretrain" else batches
    for batch in warm:
        step(batch)
    _sync(args.device)
    start, targets = time.perf_counter(), 0
    for batch in timed:
        targets += step(batch)
    _sync(args.device)
    seconds = time.perf_counter() - start
    if args.device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / MIB
    else:
        peak = (max_rss_bytes() - base_rss) / MIB
    return {"part": part, "mode": mode, "targets": targets, "seconds": seconds, "batches": len(timed),
            "tokens_per_sec": targets / seconds, "peak_mib": peak, **info}  # fmt: skip


def _worker_argv(part: str, mode: str, args: argparse.Namespace) -> list[str]:
    flags = ["--worker", f"{part}:{mode}", "--device", args.device, "--model_name", args.model_name,
             "--micro_batch", str(args.micro_batch), "--examples", str(args.examples), "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--threads", str(args.threads or 0)]  # fmt: skip
    if args.seq_given:
        flags += ["--seq", str(args.seq)]
    return module_argv("benchmarks.packing", *flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("finetune", "pretrain", "both"), default="both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model_name", default="debug-llama")
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=None, help="max_seq_length (finetune 256, pretrain 128)")
    parser.add_argument("--examples", type=int, default=480, help="finetune: training examples per pass")
    parser.add_argument("--steps", type=int, default=30, help="pretrain: timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="bench_packing.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seq_given = args.seq is not None
    if args.worker:
        part, mode = args.worker.split(":")
        args.seq = args.seq or (256 if part == "finetune" else 128)
        print(json.dumps(run_mode(part, mode, args)))
        return

    parts = ("finetune", "pretrain") if args.part == "both" else (args.part,)
    results: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        for _ in range(args.repeats):
            for mode in MODES[part]:
                env = child_env() | STEADY_MALLOC
                done = subprocess.run(_worker_argv(part, mode, args), env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"worker {part}:{mode} failed:\n{done.stderr[-3000:]}")
                results.setdefault(f"{part}:{mode}", []).append(json.loads(done.stdout.strip().splitlines()[-1]))

    import torch

    print(f"device {args.device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads {args.threads or 'default'}, repeats {args.repeats}")  # fmt: skip
    verdicts = []
    for part in parts:
        base, other = MODES[part]
        med = {m: statistics.median(r["tokens_per_sec"] for r in results[f"{part}:{m}"]) for m in (base, other)}
        peak = {m: max(r["peak_mib"] for r in results[f"{part}:{m}"]) for m in (base, other)}
        first = {m: results[f"{part}:{m}"][0] for m in (base, other)}
        unit = "target tok/s" if part == "finetune" else "tok/s"
        print(f"\n{part}: {'mode':>9} {unit:>14} {'peak MiB':>9}  extra")
        for m in (base, other):
            extra = {k: round(v, 4) if isinstance(v, float) else v for k, v in first[m].items()
                     if k in ("padding", "rows", "examples", "documents_per_row")}  # fmt: skip
            print(f"{'':10}{m:>9} {med[m]:14.1f} {peak[m]:9.1f}  {extra}")
        ratio = med[other] / med[base]
        if part == "finetune":
            p = first[base]["p_unpacked"]
            need = 0.9 / (1 - p)
            ok = ratio >= need
            print(f"  packed / unpacked = {ratio:.2f}x; padding p = {p:.1%} -> 0.9 / (1 - p) = {need:.2f}x: "
                  f"{'PASS' if ok else 'FAIL'}")  # fmt: skip
        else:
            ok = ratio >= 0.9
            print(f"  masked / plain = {ratio:.2f}x (criterion >= 0.90x): {'PASS' if ok else 'FAIL'}")
        verdicts.append(ok)
    record = {"command": argv_as_run("benchmarks.packing"), "device": args.device, "torch": torch.__version__,
              "results": results}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\nwrote {args.out}")
    sys.exit(0 if all(verdicts) else 1)


if __name__ == "__main__":
    main()
