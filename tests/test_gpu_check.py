"""benchmarks/gpu_check.sh runs end to end without a GPU (small shapes, the kernels through the interpreter), so the
one-shot check a lent GPU runs is known to work before the GPU is there; and every benchmark module imports as
``python -m benchmarks.<name>`` runs it (the package, no path manipulation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CPU_MODE_TESTS = "tests/test_kernels_glu.py"  # what gpu_check.sh runs under `pytest -m gpu` without a GPU


def gpu_test_names(path: str) -> list[str]:
    """The test names (``test_x[params]``) that ``pytest -m gpu path`` selects, from pytest's own collection."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sorted(line.rsplit("::", 1)[1] for line in proc.stdout.splitlines() if "::" in line)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode; on a GPU run the script itself")
def test_gpu_check_cpu_mode(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_KERNELS": "swiglu", "GPU_CHECK_STEPS": "2"}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself in CPU mode
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["mode"] == "cpu"

    # No failures is only news if the GPU tests were there: every `-m gpu` test of the file ran, as a skip.
    expected = gpu_test_names(CPU_MODE_TESTS)
    assert expected, f"no gpu-marked tests in {CPU_MODE_TESTS}"
    n = len(expected)
    assert summary["pytest_gpu"] == {"returncode": 0, "tests": n, "failures": 0, "errors": 0, "skipped": n}
    cases = ET.parse(tmp_path / "pytest_gpu.xml").getroot().iter("testcase")
    skipped = {c.get("name"): [s.get("message") for s in c.findall("skipped")] for c in cases}
    assert sorted(skipped) == expected
    assert all(reasons == ["needs a CUDA GPU"] for reasons in skipped.values()), skipped

    (row,) = summary["kernels"]
    assert row["kernel"] == "swiglu" and row["triton_ms"] > 0 and row["eager_ms"] > 0  # interpreter vs twin
    (run,) = summary["pretrain"]
    assert run["backend"] == "auto" and run["tokens_per_sec"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| swiglu |" in table and "| auto |" in table


def test_benchmarks_import_as_a_package() -> None:
    """Every module of benchmarks/ imports from the repository root, as ``python -m benchmarks.<name>`` does, and
    the package docstring tells how to run each one."""
    code = (
        "import importlib, pkgutil, benchmarks\n"
        "names = [m.name for m in pkgutil.iter_modules(benchmarks.__path__)]\n"
        "for name in names: importlib.import_module('benchmarks.' + name)\n"
        "print(' '.join(names))\n"
        "print(benchmarks.__doc__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names, doc = proc.stdout.split("\n", 1)
    names = names.split()
    assert {"peers", "kernels", "pretrain", "memory", "gpu_check_summary"} <= set(names)
    undocumented = [n for n in names if n != "memory" and f"python -m benchmarks.{n} " not in doc]
    assert not undocumented, f"benchmarks/__init__.py does not list {undocumented}"
