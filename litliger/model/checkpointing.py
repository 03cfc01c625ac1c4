"""Activation checkpointing: what a transformer block keeps for backward, and what it computes again.

``--train.activation_checkpointing`` names a mode (``parse_checkpointing``):

- ``none``: every block keeps what its ops save (minus the norm outputs and the gated-MLP product, which
  litliger always rebuilds in backward: ``nn/recompute.py``, ``Linear.activated``).
- ``full``: every block keeps only its input; backward runs the block's forward again, then its backward.
- ``selective:<k>``: every k-th block (blocks k-1, 2k-1, ...) is ``full``, the others ``none`` (torchtitan's
  per-layer selective checkpointing). ``selective`` means ``selective:2``: half of full's savings at half its
  recompute.
- ``selective:op``: every block keeps the outputs of its matrix multiplications and of attention (the expensive
  ops) and recomputes everything else (norms, rotary, activations, residual adds): torchtitan's per-op
  selective checkpointing, through ``torch.utils.checkpoint``'s selective contexts. In litliger it saves no
  memory over ``none``: ``none`` already keeps little beyond those outputs (the norm outputs and the gated-MLP
  product are recomputed anyway), and the op policy also keeps the output projections' results, which ``none``
  never holds (``python -m benchmarks.checkpointing`` prints the saved tensors of a block). It is there for
  parity with torchtitan and for kernels that save more.

Nothing is wrapped: a block holds its mode in ``Block.checkpoint`` and checkpoints its own forward, so parameter
names and checkpoints are the same in every mode. A checkpointed block (full or op) turns off the norm
recompute inside it (the checkpoint already rebuilds those outputs: no double recompute). Checkpointing only
happens in training forwards with gradients (never in validation, sampling or a KV-cache forward), and
recomputation replays the RNG state of the forward (LoRA dropout draws the same masks), so gradients equal
those of ``none`` bitwise wherever the kernels are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..kernels.backend import get_backend, interpreting

MODES = ("none", "full", "selective", "selective:<k>", "selective:op")

_aten = torch.ops.aten
# The ops whose outputs the "op" policy keeps: matrix multiplications and every attention kernel.
_SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._flash_attention_forward.default,
    _aten._efficient_attention_forward.default,
}


@dataclass(frozen=True)
class Checkpointing:
    """A parsed ``--train.activation_checkpointing``: ``kind`` "none", "full", "op" or "every" (every ``k``-th)."""

    kind: str = "none"
    every: int = 1

    def block_mode(self, index: int) -> str | None:
        """What block ``index`` does: "full", "op", or None (keeps its activations)."""
        if self.kind == "every":
            return "full" if (index + 1) % self.every == 0 else None
        return None if self.kind == "none" else self.kind

    def describe(self, n_layer: int) -> str:
        """One line for a run's header."""
        if self.kind == "none":
            return "activation checkpointing: none (every block keeps its activations; norm outputs recomputed)"
        if self.kind == "full":
            return f"activation checkpointing: full (each of {n_layer} blocks keeps only its input)"
        if self.kind == "op":
            return (
                f"activation checkpointing: selective:op (each of {n_layer} blocks keeps its matmul and attention "
                "outputs, recomputes the rest)"
            )
        chosen = sum(self.block_mode(i) is not None for i in range(n_layer))
        return f"activation checkpointing: selective:{self.every} ({chosen} of {n_layer} blocks full, the rest none)"


def parse_checkpointing(spec: str) -> Checkpointing:
    """``none``, ``full``, ``selective``, ``selective:op`` or ``selective:<k>`` (k >= 1) -> a ``Checkpointing``."""
    text = str(spec).strip().lower()
    if text in ("none", "full"):
        return Checkpointing(text)
    if text == "selective:op":
        return Checkpointing("op")
    if text == "selective":
        text = "selective:2"
    if text.startswith("selective:") and text[len("selective:") :].isdigit() and int(text[len("selective:") :]) >= 1:
        k = int(text[len("selective:") :])
        return Checkpointing("full") if k == 1 else Checkpointing("every", k)
    raise ValueError(
        f"activation checkpointing {spec!r} is not a mode, in --train.activation_checkpointing; use none, full, "
        "selective:<k> (every k-th block full; selective = selective:2) or selective:op (keep matmul and attention "
        "outputs)"
    )


def apply_activation_checkpointing(model: nn.Module, spec: str | Checkpointing) -> Checkpointing:
    """Set every block's mode (``Block.checkpoint``); the model's parameters and names do not change."""
    plan = spec if isinstance(spec, Checkpointing) else parse_checkpointing(spec)
    for i, block in enumerate(model.transformer.h):
        block.checkpoint = plan.block_mode(i)
    return plan


def _keep_matmuls_and_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _op_contexts() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_keep_matmuls_and_attention)


def run_checkpointed(mode: str, forward: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``forward(*args)`` under ``mode`` ("full" or "op"), recomputed in backward (non-reentrant)."""
    if mode == "op":
        if interpreting() and get_backend() == "triton":
            # The interpreter runs a kernel through torch views whose count differs between forward and its
            # replay, which selective checkpointing refuses (a GPU launch makes no torch op at all).
            raise ValueError(
                "selective:op checkpointing cannot replay Triton kernels run by the CPU interpreter "
                "(TRITON_INTERPRET=1), in --train.activation_checkpointing; use the torch kernel backend "
                "(LITLIGER_KERNELS=torch) or another mode"
            )
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_op_contexts)
    return checkpoint(forward, *args, use_reentrant=False)
