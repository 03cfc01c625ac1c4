"""Rotary position embedding: cached cos/sin tables (buffers) and the fused q/k rotation."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..kernels import rope
from . import init


def inverse_frequencies(n_elem: int, base: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """``1 / base^(2i / n_elem)`` for i < n_elem / 2, in float64, with optional context-length scaling.

    ``{"type": "linear", "factor": f}`` divides every frequency by f (positions interpolated).
    ``{"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}`` is Llama
    3.1's: long wavelengths are divided by ``factor``, short ones kept, the band between interpolated.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float64) / n_elem))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["type"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_seq_len"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds ``cos``/``sin`` of shape (length, n_elem) in fp32 and rotates the first n_elem dims of q and k.

    The tables are buffers rebuilt by ``reset_parameters`` (never stored in checkpoints).
    """

    def __init__(
        self,
        n_elem: int,
        length: int,
        base: float = 10000.0,
        scaling: dict[str, Any] | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.n_elem, self.base, self.scaling, self.length = n_elem, base, scaling, length
        self.register_buffer("cos", torch.empty(length, n_elem, device=device), persistent=False)
        self.register_buffer("sin", torch.empty(length, n_elem, device=device), persistent=False)

    def reset_parameters(self) -> None:
        # Fresh fp32 tables (also after model.to(bfloat16)): angles of long contexts need the precision.
        device = self.cos.device
        self.cos = torch.empty(self.length, self.n_elem, device=device)
        self.sin = torch.empty(self.length, self.n_elem, device=device)
        positions = torch.arange(self.length, dtype=torch.float64)
        freqs = torch.outer(positions, inverse_frequencies(self.n_elem, self.base, self.scaling))
        angles = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: both halves share a frequency
        init.init_buffer(self, "cos", angles.cos().float())
        init.init_buffer(self, "sin", angles.sin().float())

    def resize(self, length: int) -> None:
        """Cover ``length`` positions; the tables are rebuilt now, or by init_weights when on the meta device."""
        self.length = length
        if self.cos.is_meta:
            self.cos = torch.empty(length, self.n_elem, device="meta")
            self.sin = torch.empty(length, self.n_elem, device="meta")
        else:
            self.reset_parameters()

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, n_head, T, hs), k (B, n_kv, T, hs) -> rotated copies, positions 0..T-1."""
        T = q.shape[2]
        return rope(q, k, self.cos[:T], self.sin[:T])

    def extra_repr(self) -> str:
        return f"n_elem={self.n_elem}, length={self.length}, base={self.base}, scaling={self.scaling}"
