"""Linear and embedding layers whose initial values come from the init policy (litliger/init.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import init


class Linear(nn.Module):
    """``y = x @ W.T + b``. ``role`` tells the init policy what this projection is ("linear", "out_proj", ...)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        role: str = "linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.role = in_features, out_features, role
        # torch.empty: the values come from reset_parameters, so no default init is paid for.
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def reset_parameters(self) -> None:
        init.init_parameter(self, "weight", self.role)
        init.init_parameter(self, "bias", "bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, role={self.role}"


class Embedding(nn.Module):
    """A lookup table ``W[idx]``; ``role`` is "embedding" or "pos_embedding"."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        role: str = "embedding",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.role = num_embeddings, embedding_dim, role
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        init.init_parameter(self, "weight", self.role)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, role={self.role}"
