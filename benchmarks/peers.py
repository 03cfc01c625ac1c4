"""The same training step in litliger, LitGPT and transformers, side by side: tokens/s and peak memory.

Every implementation trains the same architecture (one litliger ``Config`` per ``--shape``, mirrored field by
field into ``litgpt.Config`` and, through ``litliger.convert.hf_config.config_to_hf``, into the transformers
config of the matching family) on the same batch (``--micro_batch`` x ``--seq`` random token ids from a fixed
seed, the targets the ids shifted by one), from the same weights (litliger's initialisation from seed 0, loaded
into LitGPT by name and into transformers through litliger's Hugging Face converter, so the three print the same
losses: a check that they do the same work) with the same optimizer, so that the comparison isolates the model
and its loss. One step:

- litliger: ``GPT(config)``; ``loss = model(idx, targets=targets)`` (the fused linear cross-entropy: no
  (B*T, vocab) logits are held).
- LitGPT: ``litgpt.model.GPT(litgpt.Config(...))``; ``loss = litgpt.utils.chunked_cross_entropy(model(idx),
  targets)`` with its default chunk (128 rows), as LitGPT's pretrain does. LitGPT has no tied-embedding
  switch: for a tied shape the script ties ``lm_head.weight`` to ``transformer.wte.weight`` itself.
- transformers: ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` for the qkv-bias shape; ``tie_word_embeddings``
  for the tied ones) with ``attn_implementation="sdpa"``; ``logits = model(input_ids=idx, use_cache=False)
  .logits`` (labels=None: its labels path would shift the labels and drop a position) and the loss computed
  here as ``F.cross_entropy(logits.view(-1, V), targets.view(-1))``, no upcast, as for LitGPT.

then ``loss.backward()``, ``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``. The optimizer is the
same for all three: AdamW, lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on 2-D weights only (the
groups of ``litliger.engine.build_optimizer``). ``--optimizer torch`` (default): ``torch.optim.AdamW`` with
torch's default implementation choice (foreach on CUDA, the per-tensor loop on CPU); ``--optimizer engine``:
``build_optimizer(model, OptimizerArgs(lr=3e-4, weight_decay=0.1))`` itself, which picks fused AdamW where the
parameters allow it (what litliger's recipes run). No dropout anywhere, no gradient clipping, no torch.compile.

Every (implementation, repetition) runs in its own fresh subprocess, interleaved (litliger, litgpt, hf,
litliger, ...), so a run's peak memory is its own and drift of the machine affects all alike. A peer that
cannot be imported is reported as "not installed" and skipped; a run that fails is reported and skipped.

- tokens/s: micro_batch * seq over each timed step's wall time (CUDA-synchronised), median over the ``--steps``
  timed steps that follow ``--warmup`` untimed ones; the table shows the median over repetitions.
- peak MiB: what the training steps add on top of the built model and optimizer, i.e. gradients + optimizer
  state + activations + the loss's temporaries at their highest (the weights are ``model MiB``).
  CPU: the process's peak RSS (``ru_maxrss``) at the end of the run minus its RSS (``/proc/self/statm``) right
  after the model and the optimizer are built (AdamW allocates its state at the first step, so the state is
  in the peak). glibc's mmap threshold is fixed at 1 MiB so that freed tensors leave RSS (as
  ``benchmarks.flce_memory`` and ``benchmarks.finetune``), and before the model is built the worker has run two
  steps of a one-layer copy of the same implementation on the same batch (then freed it and trimmed the heap
  with ``malloc_trim``), so the library code and kernel caches that the first step pages in do not count. A run
  whose peak stays below that warm-up's high-water mark is flagged as an upper bound (``peak_exact`` False).
  CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` right after the model and the
  optimizer are built (the peak statistics are reset there).
  ``model MiB``: the same measure (RSS, or CUDA allocated) from just before to just after building the model:
  weights plus buffers (LitGPT's rotary cos/sin tables, litliger's rotary tables).
- tok/cpu-s: the same over the process's CPU time of each step (``time.process_time``, all its threads), median.
  On a shared machine a step's wall time includes the time the process waited for a core; its CPU time does not,
  so this column is the steadier one there (with several threads it also counts OpenMP spin-waiting).
- ratios: litliger / peer for tokens/s and tok/cpu-s (above 1: litliger faster) and for peak MiB (below 1:
  litliger lighter).
- MFU (GPUs with a known peak): tokens/s * ``litliger.model.config.flops_per_token`` (the same for all three) / peak.

``--profile`` (optionally a comma list of implementations; default litliger) runs, after the timed runs of a
shape, one more subprocess per implementation that does the warm-up steps and then ``--profile_steps`` steps
under ``torch.profiler`` and prints the top 15 ops by self CPU time (self CUDA time on a GPU).

    python -m benchmarks.peers                                   # CPU, the four small shapes
    python -m benchmarks.peers --steps 4 --warmup 1 --repeats 2 --threads 1 --profile
    python -m benchmarks.peers --shape llama-1b --device cuda --precision bf16-true --steps 10 --warmup 3

Shapes: llama-small (4 layers, n_embd 256, 4 heads, vocab 8,192, 8 x 256 tokens), llama-bigvocab (2 layers,
vocab 65,536, 4 x 512), qwen-gqa (8 heads over 2 kv groups, qkv bias, rope base 1e6, eps 1e-6, 4 layers,
vocab 16,384, 8 x 256), tied (tied embeddings, 4 layers, vocab 16,384, 8 x 256); all SwiGLU with intermediate
768, RMSNorm, full rotary, no biases otherwise. llama-1b (GPU): ``Config.from_name("Llama-3.2-1B")`` (tied
embeddings, llama3 rope scaling), seq 2048, micro batch 4; only when asked for. ``block_size`` is set to the
sequence length (llama-1b keeps its own and litliger's and LitGPT's ``max_seq_length`` is set to it), so that
no implementation holds rotary tables longer than it uses.

Peers are not dependencies of litliger; install them into the environment by hand, e.g.
``pip install --no-deps litgpt psutil`` (LitGPT 0.5's pins clash with current huggingface-hub / jsonargparse)
and ``pip install transformers``. The results go to ``--out`` (bench_vs_peers.json) with the per-run data, the
device, the versions and the command line. The exit status is 0 whatever the numbers (a measurement, not a test).
On a loaded CPU pass ``--threads 1``: with more threads than free cores, OpenMP threads spin waiting for a
descheduled peer and the ratios drift from run to run; one thread per process gives stable ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import REPO, argv_as_run, child_env, module_argv
from benchmarks.memory import MIB, fix_mmap_threshold, max_rss_bytes, rss_bytes, trim_heap

IMPLS = ("litliger", "litgpt", "hf")
LABELS = {"litliger": "litliger", "litgpt": "LitGPT", "hf": "transformers"}
PEER_MODULES = {"litgpt": ("litgpt", "litgpt.model", "litgpt.utils"), "hf": ("transformers",)}
PRECISIONS = ("32-true", "bf16-true", "bf16-mixed")
LR, WEIGHT_DECAY = 3e-4, 0.1

_SMALL = dict(
    n_embd=256,
    intermediate_size=768,
    norm_class="RMSNorm",
    norm_eps=1e-5,
    mlp_class="SwiGLUMLP",
    bias=False,
    rotary_fraction=1.0,
    rope_base=10000.0,
    parallel_residual=False,
)


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq: int
    fields: dict[str, Any] = field(default_factory=dict)  # litliger Config fields
    from_name: str | None = None  # or a registry config (with its own block_size)
    default: bool = True  # part of the default set


SHAPES = {
    s.name: s
    for s in (
        Shape("llama-small", 8, 256, {**_SMALL, "n_layer": 4, "n_head": 4, "vocab_size": 8192}),
        Shape("llama-bigvocab", 4, 512, {**_SMALL, "n_layer": 2, "n_head": 4, "vocab_size": 65536}),
        Shape(
            "qwen-gqa",
            8,
            256,
            {
                **_SMALL,
                "n_layer": 4,
                "n_head": 8,
                "n_query_groups": 2,
                "attn_bias": True,
                "vocab_size": 16384,
                "rope_base": 1e6,
                "norm_eps": 1e-6,
            },
        ),
        Shape("tied", 8, 256, {**_SMALL, "n_layer": 4, "n_head": 4, "vocab_size": 16384, "tie_embeddings": True}),
        Shape("llama-1b", 4, 2048, from_name="Llama-3.2-1B", default=False),
    )
}


def shape_config(shape: Shape, seq: int, **overrides: Any) -> Any:
    """The litliger Config of ``shape`` for sequences of ``seq`` tokens (the small shapes: block_size = seq)."""
    from litliger.model.config import Config

    if shape.from_name:  # its own block_size; the models' rotary tables are cut to seq (build_model)
        return Config.from_name(shape.from_name, **overrides)
    values = {"name": shape.name, "padded_vocab_size": shape.fields["vocab_size"], "block_size": seq}
    return Config(**{**values, **shape.fields, **overrides})


def describe(config: Any) -> str:
    c = config
    parts = [
        f"{c.n_layer} layers, n_embd {c.n_embd}, {c.n_head} heads (head {c.head_size}, {c.n_query_groups} kv)",
        f"intermediate {c.intermediate_size}",
        f"vocab {c.padded_vocab_size:,}",
    ]
    if c.attn_bias:
        parts.append("qkv bias")
    if c.tie_embeddings:
        parts.append("tied embeddings")
    if c.rope_scaling:
        parts.append(f"rope scaling {c.rope_scaling['type']}")
    parts.append(f"rope base {c.rope_base:g}, eps {c.norm_eps:g}")
    return ", ".join(parts)


# --- the three implementations ------------------------------------------------------------------------------


def litgpt_config(config: Any) -> Any:
    """``config`` (litliger) as a ``litgpt.Config``; refuses what this script does not mirror."""
    import litgpt

    c = config
    if c.norm_class != "RMSNorm" or c.mlp_class != "SwiGLUMLP" or c.parallel_residual or c.norm_qk:
        raise ValueError(f"{c.name}: only Llama-style (RMSNorm, SwiGLU, sequential) configs are mirrored in LitGPT")
    if c.sliding_window or c.learned_pos_embeddings or c.scale_embeddings or c.norm_offset or c.lm_head_bias:
        raise ValueError(f"{c.name}: sliding window / learned positions / Gemma switches are not mirrored")
    adjustments = None
    if c.rope_scaling is not None:
        s = c.rope_scaling
        if s["type"] != "llama3":
            raise ValueError(f"{c.name}: rope scaling {s['type']!r} is not mirrored in LitGPT")
        adjustments = {k: s[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len")}
    return litgpt.Config(
        name=c.name,
        block_size=c.block_size,
        n_layer=c.n_layer,
        n_embd=c.n_embd,
        vocab_size=c.vocab_size,
        padded_vocab_size=c.padded_vocab_size,
        n_head=c.n_head,
        head_size=c.head_size,
        n_query_groups=c.n_query_groups,
        intermediate_size=c.intermediate_size,
        norm_class_name="RMSNorm",
        norm_eps=c.norm_eps,
        mlp_class_name="LLaMAMLP",
        parallel_residual=False,
        bias=c.bias,
        attn_bias=c.attn_bias,
        rotary_percentage=c.rotary_fraction,
        rope_base=int(c.rope_base) if float(c.rope_base).is_integer() else c.rope_base,
        rope_adjustments=adjustments,
    )


def litliger_weights(config: Any) -> dict[str, Any]:
    """The parameters of ``GPT(config)`` initialised by litliger's policy from seed 0 (every implementation
    starts from these, so the three compute the same losses)."""
    import torch

    from litliger.model.gpt import GPT

    torch.manual_seed(0)
    return {name: p.detach() for name, p in GPT(config).named_parameters()}


def _load(model: Any, weights: dict[str, Any], allowed_missing: set[str]) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"weights do not map: missing {sorted(missing)}, unexpected {sorted(unexpected)}")


def build_model(impl: str, config: Any, seq: int) -> tuple[Any, Callable[[Any, Any, Any], Any]]:
    """(model, loss(model, idx, targets)) for ``impl`` on the current default device, with the weights of
    :func:`litliger_weights` (LitGPT's parameter names are litliger's; transformers' come from litliger's
    Hugging Face converter)."""
    import torch
    import torch.nn.functional as F

    if impl == "litliger":
        from litliger.model.gpt import GPT

        torch.manual_seed(0)
        model = GPT(config)
        model.max_seq_length = seq  # the rotary tables for seq positions
        return model, lambda model, idx, targets: model(idx, targets=targets)
    if impl == "litgpt":
        from litgpt.model import GPT as LitGPT
        from litgpt.utils import chunked_cross_entropy

        model = LitGPT(litgpt_config(config))
        if config.tie_embeddings:  # LitGPT has no switch for it
            model.lm_head.weight = model.transformer.wte.weight
        _load(model, litliger_weights(config), {"lm_head.weight"} if config.tie_embeddings else set())
        model.max_seq_length = seq  # the rotary tables for seq positions
        return model, lambda model, idx, targets: chunked_cross_entropy(model(idx), targets)
    if impl == "hf":
        import transformers

        from litliger.convert.hf_config import config_to_hf
        from litliger.convert.to_hf import state_dict_to_hf

        hf = config_to_hf(config)
        arch, model_type = hf.pop("architectures")[0], hf.pop("model_type")
        hf_config = transformers.AutoConfig.for_model(model_type, attn_implementation="sdpa", use_cache=False, **hf)
        model = getattr(transformers, arch)(hf_config)
        if model.config._attn_implementation != "sdpa":
            raise RuntimeError(f"transformers picked attention {model.config._attn_implementation!r}, not sdpa")
        tied = model.lm_head.weight is model.get_input_embeddings().weight
        if tied != config.tie_embeddings:
            raise RuntimeError(f"transformers tied the embeddings: {tied}, the config asks {config.tie_embeddings}")
        weights = state_dict_to_hf(litliger_weights(config), config, model_type)
        _load(model, weights, {"lm_head.weight"} if tied else set())

        def loss(model: Any, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids=idx, use_cache=False).logits
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

        return model, loss
    raise ValueError(f"unknown implementation {impl!r}")


# --- one run (in its own subprocess) ------------------------------------------------------------------------


def run_impl(impl: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build ``impl`` for ``args.shape``, train ``args.warmup + args.steps`` steps and measure (or profile)."""
    cpu = args.device == "cpu"
    if cpu:
        fix_mmap_threshold()
    import torch

    from litliger.engine import build_optimizer
    from litliger.engine.args import OptimizerArgs
    from litliger.engine.metrics import peak_flops
    from litliger.model.config import flops_per_token

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.worker_shape]
    batch, seq = args.micro_batch or shape.batch, args.seq or shape.seq
    config = shape_config(shape, seq)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=gen)
    idx, targets = ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)
    del ids

    def autocast() -> contextlib.AbstractContextManager:
        if args.precision == "bf16-mixed":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def build(cfg: Any) -> tuple[Any, Callable[[Any, Any, Any], Any]]:
        with torch.device(device):
            model, loss_fn = build_model(impl, cfg, seq)
        if args.precision == "bf16-true":
            model.to(torch.bfloat16)
        return model.train(), loss_fn

    def new_optimizer(model: Any) -> torch.optim.Optimizer:
        opt_args = OptimizerArgs(lr=LR, weight_decay=WEIGHT_DECAY)
        if args.optimizer == "engine":
            return build_optimizer(model, opt_args)
        params = [p for p in model.parameters() if p.requires_grad]  # tied weights once, as build_optimizer
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": opt_args.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=opt_args.lr, betas=tuple(opt_args.betas), eps=opt_args.eps)

    if cpu:
        # Page in the library code, thread pools and kernel caches that the first steps touch (shared and
        # anonymous pages that RSS counts, tens of MiB): two steps of a one-layer copy on the same batch.
        warm, warm_loss = build(shape_config(shape, seq, n_layer=1))
        warm_optimizer = new_optimizer(warm)
        for _ in range(2):
            with autocast():
                loss = warm_loss(warm, idx, targets)
            loss.backward()
            warm_optimizer.step()
            warm_optimizer.zero_grad(set_to_none=True)
        del warm, warm_optimizer, loss

    def held() -> int:
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        trim_heap()
        return rss_bytes()

    before_model = held()
    model, loss_fn = build(config)
    model_mib = (held() - before_model) / MIB
    optimizer = new_optimizer(model)
    n_params = sum(p.numel() for p in model.parameters())
    base = held()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    high_water_before = 0 if cuda else max_rss_bytes()

    def step() -> float:
        with autocast():
            loss = loss_fn(model, idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    if args.worker_profile:
        for _ in range(args.warmup):
            step()
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                step()
            if cuda:
                torch.cuda.synchronize()
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, sort), reverse=True)[:15]
        top = [
            {
                "op": e.key,
                "calls": e.count,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "self_cuda_ms": e.self_device_time_total / 1e3 if cuda else None,
            }
            for e in events
        ]
        return {"impl": impl, "sort_by": sort, "table": prof.key_averages().table(sort_by=sort, row_limit=15),
                "top": top, "steps": args.profile_steps}  # fmt: skip

    seconds, cpu_seconds, losses = [], [], []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step())  # float(): the step's work is done when it returns
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)

    if cuda:
        peak_mib, exact = (torch.cuda.max_memory_allocated() - base) / MIB, True
    else:
        peak = max_rss_bytes()
        peak_mib, exact = (peak - base) / MIB, peak > high_water_before
    tokens = batch * seq
    per_step = [tokens / s for s in seconds]
    tokens_per_sec = statistics.median(per_step)
    flops = flops_per_token(config, seq)
    peak_device = peak_flops(device, args.precision)
    foreach, fused = optimizer.defaults.get("foreach"), optimizer.defaults.get("fused")
    if foreach is None and not fused:  # torch decides at step(): foreach where the device supports it
        with contextlib.suppress(Exception):  # a private helper; only for the record
            from torch.optim.optimizer import _default_to_fused_or_foreach

            _, foreach = _default_to_fused_or_foreach(list(model.parameters()), False, use_fused=False)
    return {
        "impl": impl,
        "params": n_params,
        "batch": batch,
        "seq": seq,
        "tokens_per_step": tokens,
        "tokens_per_sec": tokens_per_sec,
        "tokens_per_sec_steps": per_step,
        "seconds_steps": seconds,
        "cpu_seconds_steps": cpu_seconds,
        "tokens_per_cpu_sec": statistics.median(tokens / s for s in cpu_seconds),
        "mfu": tokens_per_sec * flops / peak_device if peak_device else None,
        "model_mib": model_mib,
        "peak_mib": peak_mib,
        "peak_exact": exact,
        "losses": losses,
        "optimizer": f"{type(optimizer).__name__} (foreach={foreach}, fused={bool(fused)})",
        "threads": torch.get_num_threads(),
        "litliger_source": source_fingerprint(),
    }


# --- the driver ---------------------------------------------------------------------------------------------


def spawn(impl: str, shape: str, argv: list[str], work: Path, tag: str, profile: bool = False) -> dict[str, Any]:
    """Run one worker; its result, or ``{"error": ...}`` if it failed."""
    out = work / f"{shape}-{tag}-{impl}.json"
    job = ("--worker", impl, "--worker_shape", shape, "--worker_out", str(out))
    cmd = module_argv("benchmarks.peers", *argv, *job)
    if profile:
        cmd.append("--worker_profile")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=child_env())
    if result.returncode or not out.exists():
        lines = (result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}").splitlines()
        return {"impl": impl, "error": lines[-1], "stderr_tail": result.stderr[-4000:]}
    return json.loads(out.read_text())


def peer_status() -> dict[str, dict[str, Any]]:
    """Per implementation: {"available": bool, "version": str | None, "reason": str | None}."""
    status: dict[str, dict[str, Any]] = {}
    for impl in IMPLS:
        dist = {"litliger": "litliger", "litgpt": "litgpt", "hf": "transformers"}[impl]
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = None
        if impl == "litliger":
            import litliger

            status[impl] = {"available": True, "version": version or litliger.__version__, "reason": None}
            continue
        try:
            for module in PEER_MODULES[impl]:
                importlib.import_module(module)
        except Exception as e:  # ImportError, or a peer whose own imports fail
            reason = "not installed" if isinstance(e, ModuleNotFoundError) and version is None else "import fails"
            status[impl] = {"available": False, "version": version, "reason": f"{reason} ({type(e).__name__}: {e})"}
        else:
            status[impl] = {"available": True, "version": version, "reason": None}
    return status


def source_fingerprint() -> str:
    """A short hash of litliger's Python sources as they are now (others may edit the checkout meanwhile)."""
    digest = hashlib.sha1()
    for path in sorted((REPO / "litliger").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def git_state() -> dict[str, Any]:
    """The checkout's commit and its uncommitted changes to litliger/ (the numbers are those of the working tree)."""

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=REPO, check=True).stdout.rstrip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "modified": git("status", "--porcelain", "litliger").splitlines(),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per implementation: medians over its successful repetitions."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"impl": runs[0]["impl"], "error": runs[0]["error"]}
    row: dict[str, Any] = {"impl": ok[0]["impl"], "params": ok[0]["params"], "runs": len(ok)}
    for key in ("tokens_per_sec", "tokens_per_cpu_sec", "peak_mib", "model_mib"):
        row[key] = statistics.median(r[key] for r in ok)
    row["peak_exact"] = all(r["peak_exact"] for r in ok)
    mfus = [r["mfu"] for r in ok if r["mfu"] is not None]
    row["mfu"] = statistics.median(mfus) if mfus else None
    row["losses"] = ok[0]["losses"]  # the same in every repetition (same weights, same batch)
    row["optimizer"] = ok[0]["optimizer"]
    if len(ok) < len(runs):
        row["failed_runs"] = len(runs) - len(ok)
    return row


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(rows: dict[str, dict[str, Any]], status: dict[str, dict[str, Any]], memory: str) -> dict[str, Any]:
    """The per-shape table and summary line; returns the ratios (litliger / peer)."""
    lit = rows.get("litliger")
    lit_ok = lit is not None and "error" not in lit
    print(
        f"  {'impl':13s} {'params (M)':>10s} {'tokens/s':>9s} {'tok/cpu-s':>9s} {'MFU':>6s} {'model MiB':>10s} "
        f"{'peak MiB':>9s} {'lit/impl tok/s':>15s} {'tok/cpu-s':>9s} {'mem':>5s}  (peak: {memory})"
    )
    ratios: dict[str, Any] = {}
    for impl in IMPLS:
        label = LABELS[impl]
        if impl not in rows:
            if not status[impl]["available"]:
                print(f"  {label:13s} {status[impl]['reason']}")
            continue
        r = rows[impl]
        if "error" in r:
            print(f"  {label:13s} failed: {r['error'][:200]}")
            continue
        tok = ratio(lit["tokens_per_sec"], r["tokens_per_sec"]) if lit_ok else None
        tok_cpu = ratio(lit["tokens_per_cpu_sec"], r["tokens_per_cpu_sec"]) if lit_ok else None
        mem = ratio(lit["peak_mib"], r["peak_mib"]) if lit_ok else None
        if impl != "litliger":
            ratios[impl] = {"tokens_per_sec": tok, "tokens_per_cpu_sec": tok_cpu, "peak_mib": mem}
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        flag = "" if r["peak_exact"] else "  (peak: upper bound)"
        print(
            f"  {label:13s} {r['params'] / 1e6:10.2f} {r['tokens_per_sec']:9.0f} {r['tokens_per_cpu_sec']:9.0f} "
            f"{mfu:>6s} {r['model_mib']:10.1f} {r['peak_mib']:9.1f} {fmt(tok):>15s} {fmt(tok_cpu):>9s} "
            f"{fmt(mem):>5s}{flag}"
        )
    done = {impl: r for impl, r in rows.items() if "error" not in r}
    if done:
        first = ", ".join(f"{LABELS[i]} {r['losses'][0]:.5f}" for i, r in done.items())
        line = f"  step-1 loss: {first}"
        if lit_ok:
            diffs = [
                f"{LABELS[i]} {max(abs(a - b) for a, b in zip(r['losses'], lit['losses'], strict=True)):.1e}"
                for i, r in done.items()
                if i != "litliger"
            ]
            line += f"; max |loss - litliger's| over all steps: {', '.join(diffs)}" if diffs else ""
        print(line)
    params = {r["params"] for r in done.values()}
    if len(params) > 1:
        print(f"  WARNING: parameter counts differ between implementations: {sorted(params)}")
    parts = [
        f"litliger / {LABELS[impl]} tokens/s {fmt(v['tokens_per_sec'])}, memory {fmt(v['peak_mib'])}"
        for impl, v in ratios.items()
    ]
    print("  " + ("; ".join(parts) if parts else "no peer to compare with"))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default=None, help=f"comma list of {', '.join(SHAPES)} (default: all but llama-1b)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma list of implementations")
    parser.add_argument("--micro_batch", type=int, default=None, help="override the shape's batch")
    parser.add_argument("--seq", type=int, default=None, help="override the shape's sequence length")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (>= 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per implementation, interleaved")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help="default: bf16-true on CUDA, else 32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--profile", nargs="?", const="litliger", default=None, help="comma list of impls to profile (litliger)"
    )
    parser.add_argument("--profile_steps", type=int, default=1)
    parser.add_argument(
        "--optimizer",
        choices=("torch", "engine"),
        default="torch",
        help="torch: torch.optim.AdamW, torch's default implementation; engine: litliger's build_optimizer (fused)",
    )
    parser.add_argument("--out", default="bench_vs_peers.json")
    parser.add_argument("--worker", choices=IMPLS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_shape", choices=tuple(SHAPES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first step allocates the optimizer state)")

    if args.worker:  # the driver passes --device and --precision resolved
        Path(args.worker_out).write_text(json.dumps(run_impl(args.worker, args)))
        return

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16-true" if args.device == "cuda" else "32-true"
    shapes = args.shape.split(",") if args.shape else [s for s, v in SHAPES.items() if v.default]
    impls = args.impls.split(",")
    profile = args.profile.split(",") if args.profile else []
    for what, names, choices in (("--shape", shapes, SHAPES), ("--impls", impls, IMPLS), ("--profile", profile, IMPLS)):
        unknown = [n for n in names if n not in choices]
        if unknown:
            parser.error(f"{what} has unknown {unknown}; choose from {', '.join(choices)}")

    status = peer_status()
    runnable = [i for i in IMPLS if i in impls and status[i]["available"]]
    command = shlex.join(argv_as_run("benchmarks.peers"))
    if args.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    versions.update({LABELS[i]: status[i]["version"] for i in IMPLS})
    memory = "cuda max allocated" if args.device == "cuda" else "peak RSS growth after model + optimizer built"
    # the workers get the resolved device and precision; a worker never re-resolves them
    argv = [a for a in sys.argv[1:]] + ["--device", args.device, "--precision", args.precision]
    print(f"device: {device}; " + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items()))
    print(f"command: {command}")
    repo = git_state()
    modified = (
        f", uncommitted changes to {', '.join(m.split()[-1] for m in repo['modified'])}" if repo["modified"] else ""
    )
    print(f"litliger checkout: {repo['commit']}{modified} (sources {source_fingerprint()})")
    for impl in IMPLS:
        if impl in impls and not status[impl]["available"]:
            print(f"{LABELS[impl]}: {status[impl]['reason']}; skipped")

    results: dict[str, Any] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            shape = SHAPES[name]
            config = shape_config(shape, args.seq or shape.seq)
            batch, seq = args.micro_batch or shape.batch, args.seq or shape.seq
            print(f"\n{name}: {describe(config)}; batch {batch} x {seq}, {args.precision}", flush=True)
            runs: dict[str, list[dict[str, Any]]] = {i: [] for i in runnable}
            for rep in range(args.repeats):
                for impl in runnable:
                    r = spawn(impl, name, argv, Path(tmp), str(rep))
                    runs[impl].append(r)
                    if "error" in r:
                        print(f"  run {rep + 1}/{args.repeats} {LABELS[impl]:12s}: failed: {r['error'][:200]}")
                    else:
                        print(
                            f"  run {rep + 1}/{args.repeats} {LABELS[impl]:12s}: {r['tokens_per_sec']:9.0f} tokens/s,"
                            f" peak {r['peak_mib']:8.1f} MiB, loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}",
                            flush=True,
                        )
            rows = {impl: summarise(runs[impl]) for impl in runnable}
            done = [r for rs in runs.values() for r in rs if "error" not in r]
            threads = done[0]["threads"] if done else None
            optimizers = sorted({r["optimizer"] for r in done})
            print(
                f"{name}: {args.warmup} warm-up + {args.steps} timed steps x {args.repeats} runs per impl, "
                f"threads {threads}, {args.precision}, optimizer {' / '.join(optimizers) or '-'}"
            )
            ratios = print_table(rows, status, memory)
            profiles = {}
            for impl in (i for i in profile if i in runnable):
                p = spawn(impl, name, argv, Path(tmp), "profile", profile=True)
                profiles[impl] = p
                if "error" in p:
                    print(f"  profile {LABELS[impl]}: failed: {p['error'][:200]}")
                    continue
                print(f"\n  profile of {p['steps']} {LABELS[impl]} step(s) on {name}, by {p['sort_by']}:")
                print("\n".join("    " + line for line in p["table"].splitlines()))
            results[name] = {
                "config": config.to_dict(),
                "batch": batch,
                "seq": seq,
                "rows": rows,
                "litliger_over_peer": ratios,
                "runs": runs,
                "profiles": profiles,
            }
    wall = time.perf_counter() - start
    seen = sorted(
        {r["litliger_source"] for v in results.values() for rs in v["runs"].values() for r in rs if "error" not in r}
    )
    if len(seen) > 1:
        print(
            f"\nWARNING: litliger's sources changed while the benchmark ran ({len(seen)} versions: {', '.join(seen)}; "
            "litliger_source in each run of the JSON); rerun for numbers of one version"
        )

    result = {
        "device": device,
        "versions": versions,
        "command": command,
        "git": repo,
        "args": vars(args),
        "memory_measure": memory,
        "optimizer": f"{args.optimizer}: AdamW lr {LR}, betas (0.9, 0.95), weight decay {WEIGHT_DECAY} on 2-D weights",
        "wall_s": wall,
        "litliger_sources": seen,
        "unavailable": {LABELS[i]: status[i]["reason"] for i in IMPLS if not status[i]["available"]},
        "shapes": results,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
