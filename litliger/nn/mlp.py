"""Feed-forward blocks. ``fc*`` project up (init role "linear"), ``proj`` writes back into the residual
stream (role "out_proj")."""

from __future__ import annotations

import torch
from torch import nn

from .linear import Linear


class GeluMLP(nn.Module):
    """GPT-2 / GPT-NeoX: ``proj(gelu(fc(x)))``."""

    def __init__(self, n_embd: int, intermediate_size: int, bias: bool, approximate: str = "none", **factory) -> None:
        super().__init__()
        self.approximate = approximate
        self.fc = Linear(n_embd, intermediate_size, bias, role="linear", **factory)
        self.proj = Linear(intermediate_size, n_embd, bias, role="out_proj", **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj.activated(self.fc(x), None, "gelu_tanh" if self.approximate == "tanh" else "gelu")


class SwiGLUMLP(nn.Module):
    """Llama: ``proj(silu(fc_1(x)) * fc_2(x))``; the gate product is one fused kernel, recomputed in backward
    rather than held (``Linear.activated``)."""

    def __init__(self, n_embd: int, intermediate_size: int, bias: bool, **factory) -> None:
        super().__init__()
        self.fc_1 = Linear(n_embd, intermediate_size, bias, role="linear", **factory)  # gate
        self.fc_2 = Linear(n_embd, intermediate_size, bias, role="linear", **factory)  # up
        self.proj = Linear(intermediate_size, n_embd, bias, role="out_proj", **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj.activated(self.fc_1(x), self.fc_2(x), "silu")


class GeGLUMLP(SwiGLUMLP):
    """Gemma: ``proj(gelu(fc_1(x)) * fc_2(x))`` with the tanh approximation or exact erf."""

    def __init__(self, n_embd: int, intermediate_size: int, bias: bool, approximate: str = "tanh", **factory) -> None:
        super().__init__(n_embd, intermediate_size, bias, **factory)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj.activated(self.fc_1(x), self.fc_2(x), "gelu_tanh" if self.approximate == "tanh" else "gelu")
