"""Kernels that the Triton interpreter runs but the GPU compiler rejects, for tests/test_kernels_aot.py.

``plans()`` gives one launch plan per kernel (meta tensors: nothing runs); the AOT compiler must report the two
broken ones as failures, naming the kernel and the specialisation, and compile the good one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from litliger.kernels._launch import LaunchPlan


def _undecorated_double(x):  # no @triton.jit: the interpreter calls it as Python, the compiler cannot
    return x * 2


@triton.jit
def _calls_undecorated_helper_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, _undecorated_double(tl.load(X + offs, mask=mask)), mask=mask)


@triton.jit
def _small_dot_kernel(A, B, C, BLOCK: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    a = tl.load(A + idx[:, None] * BLOCK + idx[None, :])
    b = tl.load(B + idx[:, None] * BLOCK + idx[None, :])
    tl.store(C + idx[:, None] * BLOCK + idx[None, :], tl.dot(a, b))  # tensor cores need tiles of >= 16


@triton.jit
def _good_copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=mask), mask=mask)


def plans() -> list[tuple[str, LaunchPlan]]:
    x = torch.empty(64, device="meta", dtype=torch.bfloat16)
    m = torch.empty(8, 8, device="meta", dtype=torch.float16)
    return [
        ("test undecorated", LaunchPlan(_calls_undecorated_helper_kernel, (1,), (x, x, 64), {"BLOCK": 64}, 4)),
        ("test dot8x8", LaunchPlan(_small_dot_kernel, (1,), (m, m, m), {"BLOCK": 8}, 4)),
        ("test good", LaunchPlan(_good_copy_kernel, (1,), (x, x, 64), {"BLOCK": 64}, 4)),
    ]
