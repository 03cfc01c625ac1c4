"""The KV cache for decoding, and what one cached forward needs: cache slots, positions, the attention mask.

A cache is per attention layer, preallocated for ``(batch, n_query_groups, max_seq_length, head_size)``
(grouped-query attention stores only the kv heads) and created and freed by the caller
(``GPT.set_kv_cache`` / ``GPT.clear_kv_cache``); training never builds one.

A cached forward writes its T tokens to slots ``input_pos .. input_pos + T - 1`` and attends to slots
``0 .. input_pos + T - 1``. A batch of prompts of different lengths is left-padded: row b's first
``left_pad[b]`` slots hold padding, its tokens' positions start at 0 after it, and its queries never see
the padding slots, so a row's result does not depend on the other rows. Mistral's sliding window is a
mask over the slots (every slot is kept), so the cache is as long as the conversation, not the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import rope


class KVCache:
    """Keys and values of one attention layer, ``k`` and ``v`` of shape (B, n_kv, max_seq_length, hs)."""

    def __init__(
        self,
        batch_size: int,
        n_kv: int,
        max_seq_length: int,
        head_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch_size, n_kv, max_seq_length, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def max_seq_length(self) -> int:
        return self.k.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hs) at slots start..start+T-1; the keys and values of slots 0..start+T-1."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


@dataclass
class Step:
    """What every layer of one forward with explicit positions shares, built once per forward: by
    ``cached_step`` for a cached forward, by ``documents.document_step`` for a document-masked one."""

    start: int | None  # the cache slot of the first token; None: no cache (document masking)
    positions: torch.Tensor  # (T,) or, per row, (B, T): token positions (rotary, learned)
    cos: torch.Tensor | None  # (T, r) or (B, T, r): rotary tables at ``positions``; None without rotary
    sin: torch.Tensor | None
    mask: Any  # scaled_dot_product_attention's mask arguments (a dict), or a FlexAttention BlockMask

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding of q (B, nh, T, hs) and k (B, n_kv, T, hs) at this step's positions."""
        if self.cos.dim() == 2:
            return rope(q, k, self.cos, self.sin)
        # Per-row positions: fold (B, T) into one sequence of B*T rows, each with its own cos/sin row.
        B, _, T, hs = q.shape
        fold = lambda x: x.transpose(0, 1).reshape(1, x.shape[1], B * T, hs)  # (1, heads, B*T, hs)
        unfold = lambda x: x.reshape(x.shape[1], B, T, hs).transpose(0, 1)  # (B, heads, T, hs)
        r = self.cos.shape[-1]
        q, k = rope(fold(q), fold(k), self.cos.reshape(B * T, r), self.sin.reshape(B * T, r))
        return unfold(q), unfold(k)


def cached_step(
    start: int,
    T: int,
    *,
    left_pad: torch.Tensor | None,
    sliding_window: int | None,
    rope_tables: tuple[torch.Tensor, torch.Tensor] | None,
    device: torch.device,
) -> Step:
    """The positions, rotary rows and mask of T tokens written at cache slots start..start+T-1."""
    slots = torch.arange(start, start + T, device=device)
    positions = slots if left_pad is None else (slots[None, :] - left_pad[:, None]).clamp(min=0)  # (T,) | (B, T)
    cos = sin = None
    if rope_tables is not None:
        cos, sin = rope_tables[0][positions], rope_tables[1][positions]
    return Step(start, positions, cos, sin, attention_mask(start, T, left_pad, sliding_window, device))


def attention_mask(
    start: int, T: int, left_pad: torch.Tensor | None, sliding_window: int | None, device: torch.device
) -> dict:
    """SDPA mask arguments: the query at slot s sees the slots j <= s (and s - j < sliding_window) of its
    own row, never its padding; a padding query sees itself only (its output is never used, but an empty
    softmax row would be NaN and leak into the padding's keys and values of the next layer)."""
    end = start + T
    if left_pad is None and (sliding_window is None or end <= sliding_window):
        if T == 1:
            return {}  # one new token sees every slot
        if start == 0:
            return {"is_causal": True}
    q = torch.arange(start, end, device=device)[:, None]
    k = torch.arange(end, device=device)[None, :]
    allowed = k <= q  # (T, end)
    if sliding_window is not None:
        allowed &= q - k < sliding_window
    if left_pad is not None:
        allowed = (allowed & (k >= left_pad.view(-1, 1, 1))) | (k == q)  # (B, T, end)
        allowed = allowed.unsqueeze(1)  # (B, 1, T, end)
    return {"attn_mask": allowed}
