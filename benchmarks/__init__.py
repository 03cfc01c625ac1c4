"""Benchmarks and measurements of litliger: not part of the installed package, run from the repository root.

Every module is run as ``python -m benchmarks.<name> [flags]`` from the root of a checkout (``--help`` lists
its flags); the root on ``sys.path`` is what makes ``benchmarks`` importable, and ``litliger`` comes from
the environment (``pip install -e .``) or from the same root. Each prints a table and most write JSON.

    python -m benchmarks.kernels             every fused kernel forward + backward against its twin, compiled
                                             twin, liger-kernel and LitGPT: time, GB/s, FLCE memory (+ PASS/FAIL)
    python -m benchmarks.flce_memory         peak memory of the fused linear cross-entropy against the naive loss
    python -m benchmarks.sweep_flce_chunks   FLCE time over chunk sizes (where default_chunk_size comes from)
    python -m benchmarks.pretrain            `litliger pretrain` throughput and memory per kernel backend
    python -m benchmarks.data                `litliger prepare` against the tokenizer's limit and LitGPT's litdata
                                             path, loaders (litdata, Mixture, TokenShards), preparation RSS
    python -m benchmarks.finetune            LoRA against full finetuning: tokens/s, memory, optimizer state
    python -m benchmarks.checkpointing       activation checkpointing modes: step time against none, bytes kept
                                             per block and by op (+ PASS/FAIL)
    python -m benchmarks.plan_table          the memory-plan table of tutorials/pretrain.md (traced, no GPU)
    python -m benchmarks.packing             packed against padded finetuning, document-masked against plain
                                             pretraining: target tokens/s, padding, peak memory (+ PASS/FAIL)
    python -m benchmarks.alignment           the fused preference and distillation losses against the naive ones:
                                             peak memory and time at vocab 65,536
    python -m benchmarks.alignment_accuracy  their value and gradients against float64 formulas, per loss and option
    python -m benchmarks.generate            decoding: KV cache, no cache and transformers.generate
    python -m benchmarks.serve               `litliger serve` with 1, 4 and 8 concurrent clients: total tokens/s, TTFT
    python -m benchmarks.peers               the same training step in litliger, LitGPT and transformers
    python -m benchmarks.verify              what checkpoint checksum verification costs per GB
    python -m benchmarks.convert_parity      per-family max |logit difference| of both conversion directions
    python -m benchmarks.gpu_check_summary   gathers a gpu_check.sh run into gpu_check.json / gpu_check.md

    bash benchmarks/gpu_check.sh [OUT_DIR]   the one-shot check for a lent GPU: pytest -m gpu + benchmarks.kernels
                                             + benchmarks.pretrain + the summary (works on a CPU at small shapes)

``benchmarks.memory`` holds the process-memory helpers the CPU measurements share (RSS, peak RSS, glibc
settings). A benchmark that runs work in fresh processes starts them with :func:`module_argv` and
:func:`child_env`, so that a child finds this package wherever it is started. The per-op resource report
(registers, spills, bytes moved) needs no GPU and lives in the package: ``python -m litliger.tools.kernel_report``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_argv(module: str, *args: str) -> list[str]:
    """The command that runs ``module`` with ``args`` in this interpreter: ``python -m module args``."""
    return [sys.executable, "-m", module, *args]


def argv_as_run(module: str) -> list[str]:
    """This process's command line as it can be rerun from the repository root (for the records)."""
    return module_argv(module, *sys.argv[1:])


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with the repository root first on ``PYTHONPATH``."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env
