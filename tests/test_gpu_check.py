"""scripts/gpu_check.sh runs end to end without a GPU (small shapes, the kernels through the interpreter), so the
one-shot check a lent GPU runs is known to work before the GPU is there."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode; on a GPU run the script itself")
def test_gpu_check_cpu_mode(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_KERNELS": "swiglu", "GPU_CHECK_STEPS": "2"}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself in CPU mode
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["mode"] == "cpu"
    assert summary["pytest_gpu"]["failures"] == summary["pytest_gpu"]["errors"] == 0
    (row,) = summary["kernels"]
    assert row["kernel"] == "swiglu" and row["triton_ms"] > 0 and row["eager_ms"] > 0  # interpreter vs twin
    (run,) = summary["pretrain"]
    assert run["backend"] == "auto" and run["tokens_per_sec"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| swiglu |" in table and "| auto |" in table
