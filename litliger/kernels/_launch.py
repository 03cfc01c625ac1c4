"""Launch settings shared by the row-wise Triton kernels."""

from __future__ import annotations

import triton

# One program handles one row; a row wider than this is walked in blocks inside the kernel.
MAX_FUSED_SIZE = 65536


def row_settings(n_cols: int, max_block: int = MAX_FUSED_SIZE) -> tuple[int, int]:
    """``(BLOCK_SIZE, num_warps)`` for a kernel that loads a row of ``n_cols`` elements per block."""
    block = min(triton.next_power_of_2(max(1, n_cols)), max_block)
    if block >= 32768:
        warps = 32
    elif block >= 8192:
        warps = 16
    elif block >= 2048:
        warps = 8
    else:
        warps = 4
    return block, warps
