"""Document masking: several documents in one row, none attending to another, each with its own positions.

A training batch may carry ``document_ids`` (B, T) beside its tokens: the document each position belongs to,
non-decreasing along a row (padding is a document of its own). ``document_step`` turns them, once per batch,
into what every layer shares (a ``Step``, as a cached forward's):

- positions that restart at 0 at each document start, so rotary embeddings (and GPT-2's learned positions)
  see a document as they would see it alone. With rotary embeddings the restart changes no attention score
  (q_i . k_j depends on i - j only, which the restart keeps) but the rounding of the angles; with learned
  positions it is what makes a packed document compute what it computes alone. So one switch, the ids,
  does both; there is no "keep positions running" mode.
- the attention mask: query i sees key j when both are in the same document and j <= i (and, for
  sliding-window families, i - j < window). On CPU, and as the reference, a boolean (B, 1, T, T) mask
  for ``scaled_dot_product_attention``; on CUDA a FlexAttention ``BlockMask`` (compiled FlexAttention skips
  the blocks no query of a tile may see, so a row of short documents costs less than a causal row).
  ``LITLIGER_ATTENTION=sdpa|flex`` overrides the choice (``flex`` on CPU runs FlexAttention's unfused
  reference, forward only: torch has no FlexAttention backward on CPU).
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels._checks import has_data
from .kv_cache import Step

ATTENTION_PATHS = ("auto", "sdpa", "flex")


def check_document_ids(document_ids: torch.Tensor, idx: torch.Tensor) -> None:
    """Refuse ids that are not an integer (B, T) tensor like ``idx``, non-decreasing along every row.

    The order of the values is checked for CPU tensors only (free there), as the kernels check their targets: on
    CUDA it would cost a host sync every step, and the data modules make the ids in order by construction."""
    if not isinstance(document_ids, torch.Tensor) or document_ids.shape != idx.shape:
        shape = tuple(document_ids.shape) if isinstance(document_ids, torch.Tensor) else type(document_ids).__name__
        raise ValueError(
            f"document_ids must be a (B, T) tensor shaped like the tokens {tuple(idx.shape)}, got {shape}; give one "
            "document id per token position"
        )
    if document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool or document_ids.is_complex():
        raise ValueError(f"document_ids must be integers, got {document_ids.dtype}; pass a LongTensor")
    if document_ids.device != idx.device:
        raise ValueError(f"document_ids are on {document_ids.device} but the tokens on {idx.device}; move them")
    if document_ids.device.type != "cpu" or torch.compiler.is_compiling() or not has_data(document_ids):
        return
    steps = document_ids[:, 1:] < document_ids[:, :-1]
    if bool(steps.any()):
        row, col = (int(i) for i in steps.nonzero()[0])
        raise ValueError(
            f"document_ids must be non-decreasing along each row (a document is one contiguous span), but row "
            f"{row} goes from {int(document_ids[row, col])} to {int(document_ids[row, col + 1])} at position "
            f"{col + 1}; number the documents of a row in order"
        )


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position of every token inside its document: 0 at each document start."""
    B, T = document_ids.shape
    index = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # each position's doc start
    return index - first


def attention_path(device: torch.device) -> str:
    """ "flex" (FlexAttention with a block mask) or "sdpa" (a boolean mask) for document-masked attention."""
    chosen = os.environ.get("LITLIGER_ATTENTION", "auto").strip().lower() or "auto"
    if chosen not in ATTENTION_PATHS:
        raise ValueError(
            f"LITLIGER_ATTENTION={chosen!r} is not an attention path; choose one of {', '.join(ATTENTION_PATHS)}"
        )
    if chosen == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if chosen == "flex" and device.type != "cuda" and torch.is_grad_enabled():
        raise ValueError(
            f"LITLIGER_ATTENTION=flex cannot train on {device.type}: FlexAttention has no backward there (torch "
            f"{torch.__version__}); use LITLIGER_ATTENTION=sdpa or auto, or run flex without gradients"
        )
    return chosen


def dense_mask(document_ids: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """(B, 1, T, T) boolean: query i may see key j (same document, j <= i, within the window)."""
    T = document_ids.shape[1]
    i = torch.arange(T, device=document_ids.device)
    distance = i[:, None] - i[None, :]
    allowed = distance >= 0
    if sliding_window is not None:
        allowed = allowed & (distance < sliding_window)
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    return (same & allowed).unsqueeze(1)


def block_mask(document_ids: torch.Tensor, sliding_window: int | None) -> Any:
    """The FlexAttention ``BlockMask`` of the same rule as :func:`dense_mask`."""
    from torch.nn.attention.flex_attention import create_block_mask

    ids = document_ids

    def allowed(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        keep = (ids[b, q] == ids[b, kv]) & (kv <= q)
        if sliding_window is not None:
            keep = keep & (q - kv < sliding_window)
        return keep

    B, T = ids.shape
    return create_block_mask(allowed, B, None, T, T, device=ids.device)


def document_step(
    document_ids: torch.Tensor,
    *,
    sliding_window: int | None,
    rope_tables: tuple[torch.Tensor, torch.Tensor] | None,
) -> Step:
    """What every layer of a document-masked forward shares: restarted positions, their rotary rows, the mask."""
    positions = document_positions(document_ids)  # (B, T)
    cos = sin = None
    if rope_tables is not None:
        cos, sin = rope_tables[0][positions], rope_tables[1][positions]  # (B, T, r), once per batch
    if attention_path(document_ids.device) == "flex":
        mask: Any = block_mask(document_ids, sliding_window)
    else:
        mask = {"attn_mask": dense_mask(document_ids, sliding_window)}
    return Step(None, positions, cos, sin, mask)


@cache
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, scale: float) -> torch.Tensor:
    """Attention of q (B, nh, T, hs) over k, v (B, n_kv, S, hs) under ``mask``: SDPA's keyword arguments (a
    dict) or a FlexAttention ``BlockMask`` (compiled on CUDA, the unfused reference elsewhere)."""
    gqa = k.shape[1] != q.shape[1]
    if isinstance(mask, dict):
        return F.scaled_dot_product_attention(q, k, v, **mask, scale=scale, enable_gqa=gqa)
    from torch.nn.attention.flex_attention import flex_attention

    flex = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
