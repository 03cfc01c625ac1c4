"""Packing finetuning examples into rows of ``max_seq_length`` positions, each example its own document.

An example of n ids takes n - 1 positions (inputs ids[:-1], targets ids[1:]). ``pack`` fills rows by
best-fit decreasing over consecutive windows of ``window`` examples: inside a window the examples are taken
longest first, each into the open row whose free space it fills most tightly (a new row when none has room).
Deterministic, a sort and a bisection per example, and close to optimal once a window holds a few rows' worth
of examples; the window bounds how far an example moves from its place in the (shuffled) order.

``example_loader.collate_packed`` lays a batch of rows out right-padded, with ``document_ids`` numbering the
examples of each row 0, 1, ... and the padding after them one more document: the model then keeps attention inside every
example and restarts its positions (litliger/model/documents.py), so an example computes what it computes
alone, and the loss stays the sum over target tokens.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

PACK_WINDOW = 1024  # examples packed together (see the module docstring)


def pack(lengths: Sequence[int], capacity: int, *, window: int = PACK_WINDOW) -> list[list[int]]:
    """Rows of indices into ``lengths`` (positions per example), each row's lengths summing to <= ``capacity``.

    Every index appears in exactly one row; windows are consecutive in the given order, rows in order of
    opening. An example longer than ``capacity`` is an error: no row could hold it.
    """
    if capacity < 1 or window < 1:
        raise ValueError(f"packing needs capacity >= 1 and window >= 1, got {capacity} and {window}")
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(
                f"example {i} takes {n} positions, more than a packed row of max_seq_length={capacity} holds; "
                "cut examples to max_seq_length + 1 tokens before packing"
                if n > capacity
                else f"example {i} has no position to train (n={n}); drop empty examples before packing"
            )
    rows: list[list[int]] = []
    for start in range(0, len(lengths), window):
        chunk = sorted(range(start, min(start + window, len(lengths))), key=lambda i: (-lengths[i], i))
        free: list[tuple[int, int]] = []  # (free positions, row number), sorted: the tightest fit first
        for i in chunk:
            at = bisect.bisect_left(free, (lengths[i], -1))
            if at == len(free):
                rows.append([i])
                room, row = capacity - lengths[i], len(rows) - 1
            else:
                room, row = free.pop(at)
                rows[row].append(i)
                room -= lengths[i]
            if room > 0:
                bisect.insort(free, (room, row))
    return [sorted(row) for row in rows]  # an example's place in its row follows the given order
