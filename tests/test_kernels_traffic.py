"""The bytes-moved counter (litliger/tools/traffic.py) sees a kernel that rereads its input."""

from __future__ import annotations

import importlib

import pytest
import torch

from litliger.kernels import rms_norm as rms_norm_op
from litliger.kernels import use_backend
from litliger.kernels._launch import capture_launches
from litliger.tools.traffic import plan_traffic

rms_module = importlib.import_module("litliger.kernels.rms_norm")  # the package attribute is the op


ROWS = 40  # three programs of 16 rows at hidden 64


def _rms_forward_traffic(hidden: int) -> dict[str, int]:
    x, w = torch.randn(ROWS, hidden, dtype=torch.bfloat16), torch.randn(hidden, dtype=torch.bfloat16)
    with use_backend("triton"), capture_launches() as plans:
        rms_norm_op(x, w)
    (plan,) = plans
    return plan_traffic(plan)


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreter's loads and stores")
def test_one_pass_kernel_moves_the_minimum() -> None:
    t = _rms_forward_traffic(64)
    assert t["moved_activations"] == t["minimum_activations"] == 2 * ROWS * 64 * 2  # x read once, y written once
    assert t["moved"] > t["minimum"]  # the weight is reloaded by each of the 3 programs


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreter's loads and stores")
def test_a_second_pass_over_the_row_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rms_module, "_MAX_BLOCK", 16)  # rows wider than a block: x is read twice
    t = _rms_forward_traffic(64)
    assert t["moved_activations"] == 3 * ROWS * 64 * 2
    assert t["minimum_activations"] == 2 * ROWS * 64 * 2
