"""Forward + backward time and peak memory of every fused kernel against its plain-PyTorch twin.

Per kernel, one row with four variants on the same inputs:

- ``triton``:   the litliger op on backend ``triton`` (CUDA only; on a CPU see ``--interpreter`` below)
- ``eager``:    the ``*_torch`` twin in eager PyTorch (the baseline)
- ``triton_compiled``: the litliger op on backend ``triton`` under ``torch.compile`` (its custom ops; CUDA only)
- ``compiled``: the twin under ``torch.compile`` (a failed compile is reported in its cell)
- ``liger``:    liger-kernel's functional op, when liger-kernel is installed (CUDA only)
- ``litgpt``:   what LitGPT's own modules compute for the op (``litgpt.model.RMSNorm``, ``apply_rope``, the MLPs'
                ``silu(a) * b`` / ``gelu(a) * b``, ``nn.LayerNorm``, ``litgpt.utils.chunked_cross_entropy`` on the
                full logits), when LitGPT is installed (``pip install --no-deps litgpt psutil``); any device

Time: forward + backward, i.e. ``torch.autograd.grad`` of the outputs with a fixed random gradient (of the loss
for the two losses). GPU: ``triton.testing.do_bench`` (warm-up, then the median). CPU: the median of
``time.perf_counter`` over ``--reps`` repetitions after three warm-up calls (the first also compiles; its time is
kept in the JSON as ``first_call_s``). The CPU machine may be shared: compare rows of one run, not across runs.
Peak memory: ``torch.cuda.max_memory_allocated`` minus what was allocated before the call, on GPU. On CPU only
the fused linear cross-entropy gets a memory figure, from :func:`benchmarks.flce_memory.peak_memory_mib` (a fresh
subprocess per variant, peak RSS): fused against the naive ``F.cross_entropy(hidden @ W.T)`` at 4096 tokens,
hidden 1024, vocab 65536, fp32.

``vs litgpt``: LitGPT's time over litliger's (the Triton op on a GPU, the twin on a CPU); above 1, litliger is faster.

Criteria (PASS/FAIL printed at the end):
  CPU: the fused loss (default backend) peaks at <= 25% of the naive one.
  GPU: every kernel's triton time <= its eager time; the fused loss uses >= 3x less memory than the naive one
       at vocab 128256 (bf16, 8192 tokens, hidden 4096).

    python -m benchmarks.kernels                        # CPU: twins eager vs compiled + the FLCE memory check
    python -m benchmarks.kernels --interpreter          # CPU: + Triton through its interpreter at tiny shapes
    python -m benchmarks.kernels --out bench_kernels.json   # on a GPU: the full table at LLM shapes

Interpreter times measure the CPU interpreter executing the kernels one program at a time: they show that the
kernels run, not how fast they are.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

from benchmarks import argv_as_run, flce_memory
from benchmarks.memory import MIB

VARIANTS = ("triton", "triton_compiled", "eager", "compiled", "liger", "litgpt")

# Shapes per preset. gpu: Llama-3-8B-like (8192 tokens = B 4 x T 2048, hidden 4096, heads 32/8 x 128, MLP 14336,
# vocab 128256) in bf16. cpu: small enough that eager + compiled for all kernels take a few minutes on 2 cores.
# tiny: for the Triton interpreter.
SHAPES: dict[str, dict[str, int]] = {
    "gpu": dict(B=4, T=2048, C=4096, nh=32, nkv=8, hs=128, ffn=14336, V=128256, ce_rows=8192, lm_hidden=4096),
    "cpu": dict(B=2, T=1024, C=1024, nh=8, nkv=2, hs=64, ffn=2816, V=8192, ce_rows=1024, lm_hidden=512),
    "tiny": dict(B=1, T=64, C=256, nh=4, nkv=2, hs=32, ffn=512, V=2048, ce_rows=64, lm_hidden=64),
}
# The memory check: fused vs naive loss (tokens, hidden, vocab, dtype); the second case only on a GPU.
FLCE_MEMORY_CASES = [(4096, 1024, 65536, "float32"), (8192, 4096, 128256, "bfloat16")]


@dataclass
class Problem:
    """One kernel at one shape: the leaves that get gradients and how each variant calls the op on them."""

    shape: str
    leaves: list[torch.Tensor]
    ours: Callable[..., Any]  # the litliger op (runs Triton under use_backend("triton"))
    twin: Callable[..., Any]  # its *_torch twin (eager, and the function torch.compile compiles)
    liger: Callable[..., Any] | None  # liger-kernel's op, or None where liger has no counterpart / is missing
    litgpt: Callable[..., Any] | None = None  # LitGPT's computation of the op, or None when LitGPT is missing


# ---------------------------------------------------------------------------------------------------------------------
# The cases: one builder per kernel. K is litliger.kernels, L liger_kernel.transformers.functional (or None).
# ---------------------------------------------------------------------------------------------------------------------


def _leaf(*shape: int, device: torch.device, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()


def _liger(L: ModuleType | None, name: str) -> Callable[..., Any] | None:
    return getattr(L, name, None) if L is not None else None


def _litgpt() -> SimpleNamespace | None:
    """LitGPT's ``RMSNorm``, ``apply_rope`` and ``chunked_cross_entropy``, or None when it is not installed."""
    try:
        model, utils = importlib.import_module("litgpt.model"), importlib.import_module("litgpt.utils")
    except Exception:  # not installed, or its imports clash with this environment
        return None
    return SimpleNamespace(
        RMSNorm=model.RMSNorm, apply_rope=model.apply_rope, chunked_cross_entropy=utils.chunked_cross_entropy
    )


def _litgpt_rms_norm(G: SimpleNamespace, C: int, eps: float, device: torch.device) -> Callable[..., Any]:
    norm = G.RMSNorm(C, eps=eps).to(device)
    return lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,))


def rms_norm_case(K: ModuleType, L: ModuleType | None, s: dict, dev: torch.device, dt: torch.dtype) -> Problem:
    x, w = _leaf(s["B"], s["T"], s["C"], device=dev, dtype=dt), _leaf(s["C"], device=dev, dtype=dt)
    lg = _liger(L, "liger_rms_norm")
    return Problem(
        f"x ({s['B']}, {s['T']}, {s['C']})",
        [x, w],
        lambda x, w: K.rms_norm(x, w, 1e-6),
        lambda x, w: K.rms_norm_torch(x, w, 1e-6),
        lg and (lambda x, w: lg(x, w, 1e-6, in_place=False)),
        (G := _litgpt()) and _litgpt_rms_norm(G, s["C"], 1e-6, dev),
    )


def add_rms_norm_case(K: ModuleType, L: ModuleType | None, s: dict, dev: torch.device, dt: torch.dtype) -> Problem:
    shape = (s["B"], s["T"], s["C"])
    x, r = _leaf(*shape, device=dev, dtype=dt), _leaf(*shape, device=dev, dtype=dt)
    w = _leaf(s["C"], device=dev, dtype=dt)
    lg = _liger(L, "liger_fused_add_rms_norm")  # newer liger-kernel releases only
    litgpt = None
    if G := _litgpt():  # LitGPT adds the residual, then normalises: (norm(x + r), x + r)
        norm = _litgpt_rms_norm(G, s["C"], 1e-6, dev)

        def litgpt(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            total = x + r
            return norm(total, w), total

    return Problem(
        f"x, residual {shape}",
        [x, r, w],
        lambda x, r, w: K.add_rms_norm(x, r, w, 1e-6),
        lambda x, r, w: K.add_rms_norm_torch(x, r, w, 1e-6),
        lg and (lambda x, r, w: lg(x, r, w, 1e-6, in_place=False)),
        litgpt,
    )


def layer_norm_case(K: ModuleType, L: ModuleType | None, s: dict, dev: torch.device, dt: torch.dtype) -> Problem:
    x = _leaf(s["B"], s["T"], s["C"], device=dev, dtype=dt)
    w, b = _leaf(s["C"], device=dev, dtype=dt), _leaf(s["C"], device=dev, dtype=dt)
    lg = _liger(L, "liger_layer_norm")
    return Problem(
        f"x ({s['B']}, {s['T']}, {s['C']})",
        [x, w, b],
        lambda x, w, b: K.layer_norm(x, w, b, 1e-5),
        lambda x, w, b: K.layer_norm_torch(x, w, b, 1e-5),
        lg and (lambda x, w, b: lg(x, w, b, 1e-5)),
        _litgpt() and (lambda x, w, b: torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-5)),  # nn.LayerNorm
    )


def rope_case(K: ModuleType, L: ModuleType | None, s: dict, dev: torch.device, dt: torch.dtype) -> Problem:
    B, T, nh, nkv, hs = s["B"], s["T"], s["nh"], s["nkv"], s["hs"]
    # q and k come from a projection as (B, T, heads, hs) and are transposed to (B, heads, T, hs): the model's layout.
    q, k = _leaf(B, T, nh, hs, device=dev, dtype=dt), _leaf(B, T, nkv, hs, device=dev, dtype=dt)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, hs, 2, device=dev, dtype=torch.float32) / hs)
    angles = torch.outer(torch.arange(T, device=dev, dtype=torch.float32), inv_freq).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()  # (T, hs) fp32 buffers, as litliger.nn.rotary keeps them
    lg = _liger(L, "liger_rope")

    def call(op: Callable[..., Any]) -> Callable[..., Any]:
        return lambda q, k: op(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

    return Problem(
        f"q ({B}, {nh}, {T}, {hs}), k ({B}, {nkv}, {T}, {hs})",
        [q, k],
        call(K.rope),
        call(K.rope_torch),
        lg and (lambda q, k: lg(q.transpose(1, 2), k.transpose(1, 2), cos[None], sin[None])),
        (G := _litgpt())
        and call(lambda q, k, c, s: (G.apply_rope(q, c[None], s[None]), G.apply_rope(k, c[None], s[None]))),
    )


def swiglu_case(K: ModuleType, L: ModuleType | None, s: dict, dev: torch.device, dt: torch.dtype) -> Problem:
    shape = (s["B"], s["T"], s["ffn"])
    gate, up = _leaf(*shape, device=dev, dtype=dt), _leaf(*shape, device=dev, dtype=dt)
    litgpt = _litgpt() and (lambda g, u: torch.nn.functional.silu(g) * u)  # LLaMAMLP
    return Problem(f"gate, up {shape}", [gate, up], K.swiglu, K.swiglu_torch, _liger(L, "liger_swiglu"), litgpt)


def geglu_case(K: ModuleType, L: ModuleType | None, s: dict, dev: torch.device, dt: torch.dtype) -> Problem:
    shape = (s["B"], s["T"], s["ffn"])
    gate, up = _leaf(*shape, device=dev, dtype=dt), _leaf(*shape, device=dev, dtype=dt)
    return Problem(
        f"gate, up {shape}, tanh",
        [gate, up],
        lambda g, u: K.geglu(g, u, "tanh"),
        lambda g, u: K.geglu_torch(g, u, "tanh"),
        _liger(L, "liger_geglu"),  # liger's GEGLU is the tanh approximation
        _litgpt() and (lambda g, u: torch.nn.functional.gelu(g, approximate="tanh") * u),  # GemmaMLP
    )


def _first(out: Any) -> torch.Tensor:
    """liger-kernel's losses return a tuple (or an output object) in some releases: the loss is the first item."""
    return out[0] if isinstance(out, tuple | list) else getattr(out, "loss", out)


def cross_entropy_case(K: ModuleType, L: ModuleType | None, s: dict, dev: torch.device, dt: torch.dtype) -> Problem:
    n, V = s["ce_rows"], s["V"]
    logits = _leaf(n, V, device=dev, dtype=dt)
    targets = torch.randint(0, V, (n,), device=dev)
    lg = _liger(L, "liger_cross_entropy")
    return Problem(
        f"logits ({n}, {V})",
        [logits],
        lambda x: K.cross_entropy(x, targets),
        lambda x: K.cross_entropy_torch(x, targets),
        lg and (lambda x: _first(lg(x, targets))),
        (G := _litgpt()) and (lambda x: G.chunked_cross_entropy(x, targets)),
    )


def flce_case(K: ModuleType, L: ModuleType | None, s: dict, dev: torch.device, dt: torch.dtype) -> Problem:
    n, C, V = s["ce_rows"], s["lm_hidden"], s["V"]
    h, w = _leaf(n, C, device=dev, dtype=dt), _leaf(V, C, device=dev, dtype=dt, scale=C**-0.5)
    targets = torch.randint(0, V, (n,), device=dev)
    lg = _liger(L, "liger_fused_linear_cross_entropy")
    return Problem(
        f"hidden ({n}, {C}), weight ({V}, {C})",
        [h, w],
        lambda h, w: K.fused_linear_cross_entropy(h, w, targets),
        lambda h, w: K.fused_linear_cross_entropy_torch(h, w, targets),
        lg and (lambda h, w: _first(lg(h, w, targets))),
        (G := _litgpt()) and (lambda h, w: G.chunked_cross_entropy(h @ w.T, targets)),  # LitGPT's lm_head + loss
    )


CASES: dict[str, Callable[..., Problem]] = {
    "rms_norm": rms_norm_case,
    "add_rms_norm": add_rms_norm_case,
    "layer_norm": layer_norm_case,
    "rope": rope_case,
    "swiglu": swiglu_case,
    "geglu": geglu_case,
    "cross_entropy": cross_entropy_case,
    "fused_linear_cross_entropy": flce_case,
}


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------


def output_grads(problem: Problem, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """A fixed random gradient for every output of the op (None, i.e. 1, for a scalar loss), shaped from the twin."""
    torch.manual_seed(1)
    with torch.no_grad():
        outs = problem.twin(*leaves)
    return [torch.randn_like(o) if o.dim() else None for o in (outs if isinstance(outs, tuple) else (outs,))]


def fwd_bwd_step(
    fn: Callable[..., Any], leaves: Sequence[torch.Tensor], grads: list[torch.Tensor | None]
) -> Callable[[], None]:
    """A closure running forward + backward of ``fn`` on ``leaves``. ``torch.autograd.grad`` returns the input
    gradients without accumulating them into ``.grad``, so every call does the same work."""

    def step() -> None:
        out = fn(*leaves)
        torch.autograd.grad(out if isinstance(out, tuple) else (out,), leaves, grads)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(step: Callable[[], None], device: torch.device, reps: int) -> float:
    """Median milliseconds of ``step`` (already called once): do_bench on GPU (25 ms warm-up, 100 ms of runs),
    perf_counter over ``reps`` calls after two more warm-up calls on CPU (the first few calls after a compile
    or on fresh allocations are slower)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"))
    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cuda_peak_mib(step: Callable[[], None]) -> float:
    """Peak CUDA memory (MiB) that one ``step`` allocates on top of what is already allocated (its inputs)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MIB


def variant_fn(problem: Problem, variant: str, K: ModuleType) -> Callable[..., Any] | None:
    """The function a variant times, or None where it does not apply."""
    if variant == "triton":

        def on_triton(*leaves: torch.Tensor) -> Any:
            with K.use_backend("triton"):
                return problem.ours(*leaves)

        return on_triton
    if variant == "triton_compiled":
        torch.compiler.reset()
        compiled = torch.compile(problem.ours, dynamic=False)

        def compiled_on_triton(*leaves: torch.Tensor) -> Any:
            with K.use_backend("triton"):
                return compiled(*leaves)

        return compiled_on_triton
    if variant == "eager":
        return problem.twin
    if variant == "compiled":
        torch.compiler.reset()  # a fresh cache per case: each compile is timed from scratch, no recompile limits
        return torch.compile(problem.twin, dynamic=False)
    if variant == "litgpt":
        return problem.litgpt
    return problem.liger


def measure(problem: Problem, variant: str, K: ModuleType, device: torch.device, reps: int) -> dict[str, Any]:
    """``{"ms", "peak_mib"}`` for one variant (peak on GPU only), or ``{"error"}`` if it failed."""
    fn = variant_fn(problem, variant, K)
    if fn is None:
        return {"skipped": True}
    # Own copies: liger's cross-entropy writes its gradient into the logits in forward.
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in problem.leaves]
    try:
        step = fwd_bwd_step(fn, leaves, output_grads(problem, leaves))
        start = time.perf_counter()
        step()  # the first call: warm-up, and for "compiled" the compilation
        sync(device)
        result: dict[str, Any] = {"first_call_s": time.perf_counter() - start}
        result["ms"] = time_ms(step, device, reps)
        if device.type == "cuda":
            result["peak_mib"] = cuda_peak_mib(step)
        return result
    except Exception as e:  # a failed compile or an op liger lacks at this shape: report it in the cell
        first_line = (str(e).strip().splitlines() or [""])[0]
        return {"error": f"{type(e).__name__}: {first_line[:300]}"}
    finally:
        del leaves
        if device.type == "cuda":
            torch.cuda.empty_cache()


def min_bytes(problem: Problem) -> int:
    """The least traffic of forward + backward: forward reads the leaves and writes the outputs, backward reads
    the leaves again and the outputs' gradients, and writes the leaves' gradients (3 x leaves + 2 x outputs).
    GB/s figures divide this by the time."""
    with torch.no_grad():
        out = problem.twin(*problem.leaves)
    outs = out if isinstance(out, tuple) else (out,)
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))  # noqa: E731
    return 3 * size(problem.leaves) + 2 * size(outs)


def bench_table(
    K: ModuleType,
    L: ModuleType | None,
    device: torch.device,
    dtype: torch.dtype,
    preset: str,
    kernels: Sequence[str],
    variants: Sequence[str],
    reps: int,
) -> list[dict[str, Any]]:
    """One row per kernel: every variant measured on the kernel's inputs at the ``preset`` shapes."""
    rows = []
    for kernel in kernels:
        torch.manual_seed(0)
        problem = CASES[kernel](K, L, SHAPES[preset], device, dtype)
        row: dict[str, Any] = {"kernel": kernel, "shape": problem.shape, "dtype": str(dtype).removeprefix("torch.")}
        row["min_bytes"] = min_bytes(problem)
        for variant in variants:
            row[variant] = measure(problem, variant, K, device, reps)
            print(f"  {kernel:<27} {variant:<9} {_cell(row[variant], 'ms')}", flush=True)
        rows.append(row)
        del problem
    return rows


def flce_memory_check(device: torch.device, include_interpreter: bool, liger: bool) -> list[dict[str, Any]]:
    """Fused vs naive loss peak memory via :func:`benchmarks.flce_memory.peak_memory_mib` (subprocesses on CPU)."""
    variants = [("naive F.cross_entropy(h @ W.T)", flce_memory.run_naive, "auto", {})]
    if device.type == "cuda":
        variants += [("fused (auto: triton)", flce_memory.run_fused, "auto", {})]
        variants += [("fused (torch twin)", flce_memory.run_fused, "torch", {})]
        if liger:
            variants += [("liger fused linear CE", run_liger_flce, "auto", {})]
    else:
        variants += [("fused (auto: torch twin)", flce_memory.run_fused, "auto", {})]
        if include_interpreter:
            variants += [("fused (triton interpreter)", flce_memory.run_fused, "triton", {"TRITON_INTERPRET": "1"})]
    cases = FLCE_MEMORY_CASES if device.type == "cuda" else FLCE_MEMORY_CASES[:1]
    results = []
    for tokens, hidden, vocab, dtype in cases:
        naive = None
        for name, run, backend, env in variants:
            args = (tokens, hidden, vocab, dtype, device.type, backend, None)
            try:
                r = flce_memory.peak_memory_mib(flce_memory.make_inputs, run, *args, device=device.type, env=env)
            except Exception as e:  # e.g. the naive loss running out of memory
                r = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
            naive = naive if naive is not None else r.get("peak_mib")
            r.update(variant=name, tokens=tokens, hidden=hidden, vocab=vocab, dtype=dtype)
            if naive and "peak_mib" in r:
                r["ratio_vs_naive"] = r["peak_mib"] / naive
            figure = r.get("error") or f"{r['peak_mib']:.1f} MiB"
            print(f"  memory {tokens}x{hidden}x{vocab} {dtype:<8} {name:<30} {figure}", flush=True)
            results.append(r)
    return results


def run_liger_flce(inputs: tuple) -> None:
    """liger-kernel's fused linear cross-entropy (+ backward) on :func:`benchmarks.flce_memory.make_inputs`' inputs."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    h, w, t, _, _ = inputs
    _first(liger_fused_linear_cross_entropy(h, w, t)).backward()


# ---------------------------------------------------------------------------------------------------------------------
# Criteria and output
# ---------------------------------------------------------------------------------------------------------------------


def criteria(device: torch.device, rows: list[dict], memory: list[dict]) -> dict[str, dict[str, Any]]:
    """The issue's PASS/FAIL checks for this device."""
    out: dict[str, dict[str, Any]] = {}
    fp32 = [r for r in memory if r["dtype"] == "float32"]
    naive = next((r for r in fp32 if r["variant"].startswith("naive")), {})
    fused = next((r for r in fp32 if r["variant"].startswith("fused (auto")), {})
    ratio = fused.get("ratio_vs_naive")
    # A figure that is not "exact" can only overstate its peak (see print_memory): fine for the fused one, but the
    # naive one must be exact, or an inflated denominator could make the fused one look better than it is.
    ok = ratio is not None and ratio <= 0.25 and naive.get("exact", False)
    out["flce_fp32_peak_le_25pct_of_naive"] = {"pass": ok, "ratio": ratio, "naive_exact": naive.get("exact")}
    if device.type != "cuda":
        return out
    slower = []
    for r in rows:
        t, e = r["triton"].get("ms"), r["eager"].get("ms")
        if t is None or e is None or t > e:
            slower.append(r["kernel"])
    out["every_kernel_triton_le_eager_time"] = {"pass": not slower, "failing": slower}
    big = [r for r in memory if r["vocab"] == 128256]
    naive = next((r.get("peak_mib") for r in big if r["variant"].startswith("naive")), None)
    fused = next((r.get("peak_mib") for r in big if r["variant"] == "fused (auto: triton)"), None)
    factor = naive / fused if naive and fused else None
    out["flce_128k_ge_3x_less_memory_than_naive"] = {"pass": factor is not None and factor >= 3.0, "factor": factor}
    return out


def _cell(m: dict[str, Any] | None, key: str) -> str:
    """A table cell: the figure, "-" where it does not apply, "error (below)" where the variant failed."""
    if m is None or m.get("skipped"):
        return "-"
    if "error" in m:
        return "error (below)" if key == "ms" else "-"
    return f"{m[key]:.2f}" if key in m else "-"


def print_table(rows: list[dict], device: torch.device, liger_note: str, triton_note: str) -> None:
    """One line per kernel; the peak-memory columns only on GPU (where they are measured)."""
    head = ["kernel", "shape", "dtype", "triton ms", "triton+c ms", "eager ms", "compiled ms", "liger ms"]
    head += ["litgpt ms", "triton x", "compile x", "vs litgpt"]
    fmt = "{:<26} {:<42} {:<8} {:>13} {:>13} {:>13} {:>13} {:>13} {:>13} {:>8} {:>9} {:>9}"
    if device.type == "cuda":
        head += ["MiB triton", "MiB triton+c", "MiB eager", "MiB compiled", "MiB liger", "MiB litgpt"]
        fmt += " {:>10} {:>12} {:>9} {:>12} {:>9} {:>10}"
    print(fmt.format(*head))
    for r in rows:
        ms = {v: r[v].get("ms") for v in VARIANTS if v in r}
        triton_cell = _cell(r["triton"], "ms") if "triton" in r else triton_note
        liger_cell = _cell(r["liger"], "ms") if "liger" in r else liger_note
        if "liger" in r and r["liger"].get("skipped"):
            liger_cell = "no such op"
        speed_t = f"{ms['eager'] / ms['triton']:.2f}" if ms.get("triton") and ms.get("eager") else "-"
        speed_c = f"{ms['eager'] / ms['compiled']:.2f}" if ms.get("compiled") and ms.get("eager") else "-"
        ours = ms.get("triton") if device.type == "cuda" else ms.get("eager")  # what litliger runs on this device
        vs_litgpt = f"{ms['litgpt'] / ours:.2f}" if ms.get("litgpt") and ours else "-"
        triton_c = _cell(r["triton_compiled"], "ms") if "triton_compiled" in r else triton_note
        cells = [r["kernel"], r["shape"], r["dtype"], triton_cell, triton_c, _cell(r["eager"], "ms")]
        cells += [_cell(r["compiled"], "ms")]
        cells += [liger_cell, _cell(r["litgpt"], "ms") if "litgpt" in r else "not installed"]
        cells += [speed_t, speed_c, vs_litgpt]
        if device.type == "cuda":
            cells += [_cell(r.get(v), "peak_mib") for v in VARIANTS]
        print(fmt.format(*cells))
    errors = [(r["kernel"], v, r[v]["error"]) for r in rows for v in VARIANTS if v in r and "error" in r[v]]
    for kernel, variant, msg in errors:
        print(f"  error {kernel} / {variant}: {msg}")
    print("(x: eager ms / that variant's ms, above 1 is faster than eager)")


def print_memory(memory: list[dict]) -> None:
    print(
        "{:>6} {:>6} {:>6} {:>8}  {:<30} {:>9} {:>8} {:>6}".format(
            "tokens", "hidden", "vocab", "dtype", "variant", "peak MiB", "vs naive", "s"
        )
    )
    for r in memory:
        if "error" in r:
            print(f"{r['tokens']:>6} {r['hidden']:>6} {r['vocab']:>6} {r['dtype']:>8}  {r['variant']:<30} {r['error']}")
            continue
        # Not exact: the process's RSS high-water mark from before the call was never exceeded, so the figure is that
        # mark minus the RSS before the call, at least the call's own peak (an upper bound).
        flag = "" if r["exact"] else "  (upper bound)"
        print(
            f"{r['tokens']:>6} {r['hidden']:>6} {r['vocab']:>6} {r['dtype']:>8}  {r['variant']:<30} "
            f"{r['peak_mib']:>9.1f} {r.get('ratio_vs_naive', float('nan')):>8.1%} {r['seconds']:>6.1f}{flag}"
        )


def print_interpreter(rows: list[dict]) -> None:
    print("{:<26} {:<42} {:<8} {:>18} {:>9}".format("kernel", "shape", "dtype", "interpreter ms", "eager ms"))
    for r in rows:
        print(
            f"{r['kernel']:<26} {r['shape']:<42} {r['dtype']:<8} {_cell(r['triton'], 'ms'):>18} "
            f"{_cell(r['eager'], 'ms'):>9}"
        )
    for r in rows:
        if "error" in r["triton"]:
            print(f"  error {r['kernel']} / triton: {r['triton']['error']}")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def load_liger() -> tuple[ModuleType | None, str | None]:
    """liger-kernel's functional API and version, or (None, None) when it is not installed."""
    try:
        functional = importlib.import_module("liger_kernel.transformers.functional")
    except ImportError:
        return None, None
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        return functional, version("liger-kernel")
    return functional, "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--interpreter",
        action="store_true",
        help="CPU: also run the Triton kernels through TRITON_INTERPRET=1 at tiny shapes (slow)",
    )
    parser.add_argument("--reps", type=int, default=10, help="CPU: timed repetitions per variant (median)")
    parser.add_argument("--kernels", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--skip-memory", action="store_true", help="skip the fused-vs-naive loss memory check")
    parser.add_argument("--tiny-only", action="store_true", help="CPU: only the interpreter table (a smoke run)")
    parser.add_argument("--out", default="bench_kernels.json")
    args = parser.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.interpreter and not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before litliger.kernels is imported: Triton reads it at decoration
    K = importlib.import_module("litliger.kernels")
    L, liger_version = load_liger()
    import triton

    started = datetime.datetime.now(datetime.timezone.utc)
    cpu_name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    device_name = torch.cuda.get_device_name(device) if on_gpu else cpu_name
    print(
        f"device={device_name} torch={torch.__version__} triton={triton.__version__} "
        f"threads={torch.get_num_threads()} liger-kernel={liger_version or 'not installed'}"
    )
    print(f"command: {' '.join(argv_as_run('benchmarks.kernels'))}")

    litgpt = ("litgpt",) if _litgpt() is not None else ()
    if on_gpu:
        variants = ("triton", "triton_compiled", "eager", "compiled", *(("liger",) if L is not None else ()), *litgpt)
        rows = bench_table(K, L, device, torch.bfloat16, "gpu", args.kernels, variants, args.reps)
        interp = []
    else:
        variants = ("eager", "compiled", *litgpt)
        rows = (
            []
            if args.tiny_only
            else bench_table(K, None, device, torch.float32, "cpu", args.kernels, variants, args.reps)
        )
        tiny = ("triton", "eager")
        interp = bench_table(K, None, device, torch.float32, "tiny", args.kernels, tiny, 3) if args.interpreter else []
    memory = [] if args.skip_memory else flce_memory_check(device, args.interpreter, L is not None)
    checks = criteria(device, rows, memory) if memory else {}

    print()
    liger_note = "n/a (no GPU)" if L is not None else "not installed"
    print_table(rows, device, liger_note, "n/a (no GPU)")
    if not on_gpu:
        print("(CPU: the Triton kernels are GPU code, and peak memory per kernel is measured on GPU only)")
    if interp:
        print(
            "\nTriton through the CPU interpreter (TRITON_INTERPRET=1) at tiny shapes: interpreter time, "
            "NOT a speed figure"
        )
        print_interpreter(interp)
    if memory:
        print("\nfused_linear_cross_entropy vs naive F.cross_entropy(hidden @ W.T): peak memory of forward + backward")
        print_memory(memory)
        if any("interpreter" in r["variant"] for r in memory):
            print(
                "note: Triton's interpreter keeps each launch's tensor arguments in a reference cycle until the GC "
                "runs, so its row also holds one freed logits chunk; on a GPU it would not."
            )
    print()
    for name, c in checks.items():
        detail = {k: v for k, v in c.items() if k != "pass"}
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {name}  {detail}")
    if not on_gpu:
        print(
            "not measured here (no GPU): every kernel at least as fast as eager, FLCE >= 3x less memory at "
            "vocab 128k; run `python -m benchmarks.kernels` on a CUDA machine"
        )

    meta = {
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "liger_kernel": liger_version,
        "litgpt": _version("litgpt"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(argv_as_run("benchmarks.kernels")),
        "started_utc": started.isoformat(timespec="seconds"),
        "shapes": SHAPES["gpu" if on_gpu else "cpu"],
    }
    with open(args.out, "w") as f:
        json.dump(
            {**meta, "kernels": rows, "interpreter": interp, "flce_memory": memory, "criteria": checks}, f, indent=2
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
