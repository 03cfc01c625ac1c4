"""Linear and embedding layers whose initial values come from the init policy (litliger/nn/init.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.glu_linear import glu_linear, glu_linear_input
from . import init


class Linear(nn.Module):
    """``y = x @ W.T + b``. ``role`` tells the init policy what this projection is ("linear", "out_proj", ...).

    With a LoRA adapter (:meth:`add_lora`; Hu et al., 2021) the layer computes
    ``y = x W^T + b + (dropout(x) A^T B^T) * s`` with A = ``lora_a`` (r, in), B = ``lora_b`` (out, r) and
    s = alpha / r. Without one, ``lora_a`` and ``lora_b`` are None: no parameters, no extra work.
    """

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
        self.register_parameter("lora_a", None)
        self.register_parameter("lora_b", None)
        self.lora_scale = self.lora_dropout = 0.0
        self.lora_enabled = True  # False: the adapter is skipped (litliger.model.lora.adapters_disabled)

    @property
    def adapted(self) -> bool:
        """Whether the forward adds a LoRA adapter: one exists and is not switched off."""
        return self.lora_a is not None and self.lora_enabled

    def add_lora(self, r: int, alpha: float, dropout: float = 0.0) -> None:
        """Add a LoRA adapter of rank ``r``: ``lora_a`` (r, in), ``lora_b`` (out, r), scale ``alpha / r``, and
        ``dropout`` on the adapter's input in training mode.

        The new parameters take ``weight``'s device and dtype. On the meta device they stay empty for
        ``litliger.init.init_weights``; on a real device the policy initialises them at once (A uniform,
        B zero, seeded from the global RNG like a model built there), so the output is unchanged.
        Add adapters before sharding the model: FSDP2 shards the parameters that exist at ``fully_shard``.
        """
        if self.lora_a is not None:
            raise ValueError(f"Linear({self.extra_repr()}) already has a LoRA adapter")
        if r < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1, got {r=}, {alpha=}, {dropout=}")
        from torch.distributed.tensor import DTensor

        if isinstance(self.weight, DTensor):
            raise RuntimeError("add LoRA adapters before sharding the model (fully_shard), not after")
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.lora_scale, self.lora_dropout = alpha / r, dropout
        if not self.weight.is_meta:
            self._reset_lora()

    def merge_lora(self) -> None:
        """Fold the adapter into the weight, ``W <- W + (B A) * s`` (:func:`merge_lora_weight`), and remove it."""
        if self.lora_a is None:
            return
        with torch.no_grad():
            self.weight.copy_(merge_lora_weight(self.weight, self.lora_a, self.lora_b, self.lora_scale))
        self.lora_a = self.lora_b = None
        self.lora_scale = self.lora_dropout = 0.0

    def reset_parameters(self) -> None:
        init.init_parameter(self, "weight", self.role)
        init.init_parameter(self, "bias", "bias")
        self._reset_lora()

    def _reset_lora(self) -> None:
        # PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, so B A = 0 (no-ops without an adapter)
        init.init_parameter(self, "lora_a", "lora_a", fan_in=self.in_features)
        init.init_parameter(self, "lora_b", "lora_b")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.adapted:
            return y
        return y + F.linear(F.linear(self._lora_input(x), self.lora_a), self.lora_b) * self.lora_scale

    def activated(self, gate: torch.Tensor, up: torch.Tensor | None, activation: str) -> torch.Tensor:
        """``self(act(gate) * up)`` (``self(act(gate))`` when ``up`` is None) without holding the activated
        product for backward (:func:`litliger.kernels.glu_linear`): an MLP's down projection. With a LoRA
        adapter, which needs the product itself, it is the plain composition.
        """
        if not self.adapted:
            return glu_linear(gate, up, self.weight, self.bias, activation)
        return self(glu_linear_input(gate, up, activation))

    def fold_lora(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x', W')`` with ``x' W'^T = x W^T + (dropout(x) A^T B^T) * s`` (in exact arithmetic):

            x' = cat(x, dropout(x) A^T * s)   (..., in + r)
            W' = cat(W, B)                    (out, in + r)

        so one matmul with W' is the whole adapted layer (the bias is unchanged). A consumer of
        (hidden, weight), such as the fused linear cross-entropy of the LM head, thus takes the adapter
        without the output ever being materialised. Requires an adapter.
        """
        u = F.linear(self._lora_input(x), self.lora_a) * self.lora_scale  # (..., r)
        return torch.cat((x, u), dim=-1), torch.cat((self.weight, self.lora_b), dim=1)

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x

    def extra_repr(self) -> str:
        text = f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, role={self.role}"
        if self.lora_a is not None:
            text += f", lora_r={self.lora_a.shape[0]}, lora_scale={self.lora_scale:g}, lora_dropout={self.lora_dropout}"
        return text


def merge_lora_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + (B @ A) * scale`` for W (out, in), A (r, in), B (out, r): computed in fp32 and rounded once to
    W's dtype. The one formula of every LoRA merge (in a model or in a state dict)."""
    return (weight.float() + (lora_b.float() @ lora_a.float()) * scale).to(weight.dtype)


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
