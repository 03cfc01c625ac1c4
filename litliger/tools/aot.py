"""Ahead-of-time compilation of the Triton kernels for named NVIDIA GPUs, on a machine without one.

A :class:`~litliger.kernels._launch.LaunchPlan` (recorded from a real launcher call on meta tensors) is turned
into exactly what the JIT would compile on a GPU: the signature, constexprs and specialisation attributes come
from Triton's own binder (``JITFunction.create_binder``'s code), and ``triton.compile`` runs every stage, ptxas
included (Triton's bundled one), for ``GPUTarget("cuda", arch, 32)``. Tensors count as 16-byte aligned, as
the CUDA caching allocator gives them. ptxas' verbose log gives registers and spills; the compiled metadata
gives the dynamic shared memory; :func:`occupancy` estimates resident warps per SM from those.

Run in a process without ``TRITON_INTERPRET=1`` (the interpreter replaces ``@triton.jit`` at import time).

    python -m litliger.tools.aot --json out.json            # the published configs' plans, sm_80 and sm_90
    python -m litliger.tools.aot --plans pkg.mod:plans      # any other provider of (tag, LaunchPlan) pairs
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..kernels._launch import LaunchPlan

ARCHS = (80, 90)
DEFAULT_PLANS = "litliger.tools.kernel_specs:published_plans"


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resources of a compute capability (CUDA programming guide, table of technical specifications)."""

    shared_per_block: int  # bytes a block may opt in to
    shared_per_sm: int
    registers: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    reserved_shared_per_block: int = 1024  # the system's share of every block (sm_80+)


SM_LIMITS = {80: SmLimits(shared_per_block=166912, shared_per_sm=167936), 90: SmLimits(232448, 233472)}


def occupancy(arch: int, num_warps: int, registers: int, shared: int) -> float:
    """Resident warps per SM over the maximum, limited by warps, registers (allocated per warp in units of 256)
    and shared memory (plus the per-block reserve)."""
    lim = SM_LIMITS[arch]
    blocks = min(lim.max_blocks, lim.max_warps // num_warps)
    if registers:
        regs_per_warp = math.ceil(registers * 32 / 256) * 256
        blocks = min(blocks, (lim.registers // regs_per_warp) // num_warps)
    if shared:
        blocks = min(blocks, lim.shared_per_sm // (shared + lim.reserved_shared_per_block))
    return blocks * num_warps / lim.max_warps


@dataclass
class KernelBuild:
    """One kernel x specialisation x architecture: its resources, or the error that stopped its compilation."""

    kernel: str
    spec: str
    arch: int
    num_warps: int
    tags: list[str] = field(default_factory=list)  # who launches it (e.g. "Llama-3.2-1B bf16")
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    occupancy: float = 0.0
    seconds: float = 0.0
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kernel}[{self.spec}] sm_{self.arch}"


@dataclass
class _Job:
    plan: LaunchPlan
    signature: dict[str, str]
    constexprs: dict[Any, Any]
    attrs: dict[Any, Any]
    options: dict[str, Any]
    spec: str
    tags: list[str]


def _specialise(plan: LaunchPlan, arch: int) -> tuple[dict, dict, dict, dict]:
    """``(signature, constexprs, attrs, options)`` as ``JITFunction.run`` computes them for ``plan`` on ``arch``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = plan.kernel
    if not hasattr(kernel, "params"):
        raise RuntimeError(f"{plan.name} is not a JITFunction: unset TRITON_INTERPRET to compile ahead of time")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(plan.constexprs, num_warps=plan.num_warps)
    kwargs["debug"] = kernel.debug or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*plan.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def _spec_label(plan: LaunchPlan, signature: dict[str, str]) -> str:
    """The specialisation in words: the first pointer's dtype (the kernel's input), constexprs, warps."""
    dtype = next((t[1:] for t in signature.values() if t.startswith("*")), "-")
    consts = ", ".join(f"{k}={v}" for k, v in plan.constexprs.items())
    return f"{dtype}, {consts}, warps={plan.num_warps}" if consts else f"{dtype}, warps={plan.num_warps}"


def plan_jobs(tagged: Iterable[tuple[str, LaunchPlan]], archs: Sequence[int]) -> list[tuple[int, _Job]]:
    """One job per distinct (arch, kernel, signature, constexprs, attributes, options): a specialisation that
    many configs launch is compiled once, with all their tags."""
    jobs: dict[tuple, tuple[int, _Job]] = {}
    for tag, plan in tagged:
        for arch in archs:
            signature, constexprs, attrs, options = _specialise(plan, arch)
            key = (
                arch,
                plan.kernel.fn.__module__,
                plan.name,
                tuple(signature.items()),
                tuple(sorted(map(repr, constexprs.items()))),
                tuple(sorted(map(repr, attrs.items()))),
                plan.num_warps,
            )
            if key in jobs:
                if tag not in jobs[key][1].tags:
                    jobs[key][1].tags.append(tag)
                continue
            job = _Job(plan, signature, constexprs, attrs, options, _spec_label(plan, signature), [tag])
            jobs[key] = (arch, job)
    return list(jobs.values())


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(arch: int, job: _Job) -> KernelBuild:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    build = KernelBuild(job.plan.name, job.spec, arch, job.plan.num_warps, list(job.tags))
    start = time.perf_counter()
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # ptxas runs with -v anyway; this prints its log, captured here
    try:
        with contextlib.redirect_stdout(log):
            src = ASTSource(job.plan.kernel, job.signature, job.constexprs, job.attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=job.options)
    except Exception as e:  # any stage: frontend, MLIR passes, LLVM, ptxas
        build.error = f"{type(e).__name__}: {e}".strip()[:2000]
        build.seconds = time.perf_counter() - start
        return build
    text = log.getvalue()
    regs, spills = _PTXAS_REGS.search(text), _PTXAS_SPILLS.search(text)
    build.registers = int(regs.group(1)) if regs else 0
    if spills:
        build.stack, build.spill_stores, build.spill_loads = (int(g) for g in spills.groups())
    build.shared = int(compiled.metadata.shared)
    build.occupancy = occupancy(arch, build.num_warps, build.registers, build.shared)
    build.seconds = time.perf_counter() - start
    return build


_JOBS: list[tuple[int, _Job]] = []  # read by forked workers


def _compile_index(i: int) -> KernelBuild:
    return _compile(*_JOBS[i])


def compile_all(jobs: list[tuple[int, _Job]], workers: int | None = None) -> list[KernelBuild]:
    """Compile every job (in ``workers`` forked processes when more than one) into a fresh Triton cache dir:
    nothing compiled before can hide a failure."""
    global _JOBS
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="litliger-aot-") as cache:
        from triton import knobs

        knobs.cache.dir = cache
        os.environ["TRITON_CACHE_DIR"] = cache
        _JOBS = jobs
        if workers <= 1:
            return [_compile(arch, job) for arch, job in jobs]
        # Forked after the plans exist: workers inherit them (and the imports) instead of pickling kernels.
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_compile_index, range(len(jobs)), chunksize=1)


def error_summary(error: str) -> str:
    """The message of a compile error: its last line (a CompilationError starts with the source excerpt)."""
    lines = [line for line in error.splitlines() if line.strip()]
    return lines[-1].strip() if lines else error


def load_provider(spec: str) -> Callable[..., list[tuple[str, LaunchPlan]]]:
    """``module:function`` or ``path/to/file.py:function``, returning (tag, LaunchPlan) pairs."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(os.path.basename(target)[:-3], target)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, name)


def run(plans: str = DEFAULT_PLANS, archs: Sequence[int] = ARCHS, workers: int | None = None) -> list[KernelBuild]:
    """Build the plans of provider ``plans`` and compile them for ``archs``."""
    tagged = load_provider(plans)()
    return compile_all(plan_jobs(tagged, archs), workers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", default=DEFAULT_PLANS, help="module:function returning (tag, LaunchPlan) pairs")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SM_LIMITS))
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: one per CPU)")
    parser.add_argument("--json", default=None, help="write every build as JSON here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    builds = run(args.plans, args.arch, args.workers)
    failed = [b for b in builds if b.error]
    for b in failed:
        print(f"FAILED {b.label} (launched by {', '.join(b.tags)}):\n  {error_summary(b.error)}", file=sys.stderr)
    seconds = time.perf_counter() - start
    print(f"compiled {len(builds) - len(failed)}/{len(builds)} kernel specialisations in {seconds:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(b) for b in builds], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
