"""Every Triton kernel compiled ahead of time for sm_80 and sm_90, at every specialisation the published
configs launch (fp32, bf16, fp16), by Triton's own compiler and ptxas, on this CPU-only machine.

The compile runs in a subprocess without TRITON_INTERPRET (the interpreter replaces @triton.jit at import) and
into a fresh cache directory. Also checked there: no register spills in the (all memory-bound) kernels and
shared memory within each architecture's limit. A broken test-only kernel shows that the check can fail.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import litliger.kernels as kernels_pkg
from litliger.tools.aot import ARCHS, SM_LIMITS
from litliger.tools.kernel_specs import DTYPE_NAMES, published_names

REPO = Path(__file__).resolve().parents[1]


def _aot(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")  # fresh: nothing compiled before can hide a failure
    out = tmp / "builds.json"
    proc = subprocess.run(
        [sys.executable, "-m", "litliger.tools.aot", "--json", str(out), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, json.loads(out.read_text()) if out.exists() else []


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    proc, result = _aot(tmp_path_factory.mktemp("aot"))
    assert result, f"the AOT compile wrote nothing:\n{proc.stdout}\n{proc.stderr}"
    failed = [f"{b['kernel']}[{b['spec']}] sm_{b['arch']}: {b['error']}" for b in result if b["error"]]
    assert not failed, "kernels that do not compile for a GPU:\n" + "\n".join(failed)
    assert proc.returncode == 0, proc.stderr
    return result


def _kernel_names() -> set[str]:
    """Every @triton.jit function in litliger/kernels/ whose name says it is launched (``*_kernel``)."""
    names = set()
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"litliger.kernels.{info.name}")
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and hasattr(obj, "fn") and obj.fn.__module__ == module.__name__:
                names.add(name)
    return names


def test_every_kernel_compiles_for_both_architectures(builds: list[dict]) -> None:
    expected = _kernel_names()
    assert len(expected) >= 9
    for arch in ARCHS:
        compiled = {b["kernel"] for b in builds if b["arch"] == arch}
        assert compiled == expected, f"sm_{arch}: not compiled {expected - compiled}"


def test_every_published_config_and_dtype_is_covered(builds: list[dict]) -> None:
    tags = {tag for b in builds for tag in b["tags"]}
    wanted = {f"{name} {dt}" for name in published_names() for dt in DTYPE_NAMES.values()}
    assert wanted <= tags, sorted(wanted - tags)
    for b in builds:  # what ptxas said was parsed: every kernel uses registers and runs >= 1 block per SM
        assert b["registers"] > 0 and b["occupancy"] > 0, b


def test_no_register_spills(builds: list[dict]) -> None:
    # Norms, add+norm, RoPE, GLU and cross-entropy are all memory-bound: a spill is traffic they cannot afford.
    spilled = [f"{b['kernel']}[{b['spec']}] sm_{b['arch']}: {b['spill_stores']} B" for b in builds if b["spill_stores"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_shared_memory_within_the_architecture_limit(builds: list[dict]) -> None:
    for b in builds:
        assert b["shared"] <= SM_LIMITS[b["arch"]].shared_per_block, b


def test_a_kernel_the_gpu_compiler_rejects_is_reported(tmp_path: Path) -> None:
    proc, result = _aot(tmp_path, "--plans", "tests/aot_bad_kernels.py:plans", "--arch", "90", "--workers", "1")
    assert proc.returncode == 1
    errors = {b["kernel"]: b["error"] for b in result}
    assert errors["_good_copy_kernel"] is None
    assert "Unsupported function referenced" in errors["_calls_undecorated_helper_kernel"]
    assert "K >= 16" in errors["_small_dot_kernel"]
    # The report names the kernel and the specialisation (dtype, constexprs, warps, arch).
    assert "FAILED _calls_undecorated_helper_kernel[bf16, BLOCK=64, warps=4] sm_90" in proc.stderr
    assert "FAILED _small_dot_kernel[fp16, BLOCK=8, warps=4] sm_90" in proc.stderr


def test_the_interpreter_accepts_the_rejected_kernel() -> None:
    """Why the AOT compile is needed: the interpreter (how every other kernel test runs) runs it happily."""
    from aot_bad_kernels import _calls_undecorated_helper_kernel

    if not hasattr(_calls_undecorated_helper_kernel, "fn") or torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter")
    x = torch.arange(64, dtype=torch.float32)
    y = torch.empty_like(x)
    _calls_undecorated_helper_kernel[(1,)](x, y, 64, BLOCK=64)
    torch.testing.assert_close(y, 2 * x)
