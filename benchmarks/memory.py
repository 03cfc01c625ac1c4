"""Process memory on CPU for the benchmarks: RSS now, peak RSS, and glibc settings that make RSS track live
tensors (benchmarks.flce_memory, .kernels, .finetune, .generate and .peers measure with these)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource

MIB = 2**20


def rss_bytes() -> int:
    """The process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """The process's peak resident set size so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def trim_heap() -> None:
    """glibc: give freed heap pages back to the system, so RSS is live memory (not a warm-up's leftovers)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def fix_mmap_threshold(nbytes: int = MIB) -> None:
    """glibc: map every allocation above ``nbytes`` on its own and unmap it on free.

    By default glibc raises its mmap threshold (up to 32 MiB) after a big block is freed and then serves blocks
    of that size from a heap it rarely gives back, so RSS keeps counting tensors freed long ago (FLCE's 16 MiB
    chunks once read as +400 MiB). A fixed threshold keeps RSS on live memory.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: measure with its default policy
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # -3: M_MMAP_THRESHOLD
