"""LoRA at the model level: which layers of a GPT get adapters, and merging adapters back into the weights.

The adapter lives in the kernel-backed layer (:meth:`litliger.nn.Linear.add_lora`, Hu et al., 2021)::

    y = x W^T + b + (dropout(x) A^T B^T) * s        A = lora_a (r, in), B = lora_b (out, r), s = alpha / r

initialised by the init policy like every other tensor (A ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT, B = 0, so
step 0 computes exactly the base model). On the LM head the adapter rides through the fused linear
cross-entropy as one wider matmul (``Linear.fold_lora``): no (tokens x vocab) logits in training either.

Merging (:func:`merge_lora`, :func:`merge_lora_state_dict`) replaces W by W + (B A) s, computed in fp32
and rounded once to W's dtype (for bf16 weights the correctly rounded sum but for vanishingly rare ties;
adding a bf16-rounded B A s to W would round twice). Merged and unmerged models compute the same function
up to rounding. Measured max |logit difference| merged vs unmerged, on tiny llama, gpt2, pythia, gemma and
qwen3 models (CPU, 2 layers, n_embd 64, r 8, alpha 16, A and B ~ N(0, 0.1^2) on every target so the
adapters move the logits by 0.7-3, 3 seeds each; logits up to 3.5 in magnitude):

    fp32                                          <= 1.9e-6   (tests/test_lora.py asserts 1e-5)
    torch.autocast("cpu", dtype=torch.bfloat16)   <= 5.3e-2   (asserts 0.1, and <= 3x bf16's own error)

The bf16 gap is bf16's, not the merge's: the unmerged model's bf16 logits differ from its fp32 logits by as
much (<= 5.2e-2), since the unmerged path rounds x W^T and the adapter's product separately.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import Linear, merge_lora_weight

# What each entry of LoRAArgs.targets adapts: the Linear modules whose full names match.
_TARGET_PATTERNS = {
    "qkv": r"transformer\.h\.\d+\.attn\.qkv",
    "proj": r"transformer\.h\.\d+\.attn\.proj",
    "mlp": r"transformer\.h\.\d+\.mlp\..+",  # every projection of the MLP (fc, fc_1, fc_2, proj)
    "lm_head": r"lm_head",
}
TARGETS = tuple(_TARGET_PATTERNS)
_LORA_LEAVES = ("lora_a", "lora_b")


def lora_target(module_name: str) -> str | None:
    """The entry of ``LoRAArgs.targets`` that adapts the Linear named ``module_name`` (None: none does)."""
    return next((t for t, pattern in _TARGET_PATTERNS.items() if re.fullmatch(pattern, module_name)), None)


@dataclass(frozen=True)
class LoRAArgs:
    """``--lora.*``: the adapters of a LoRA finetune."""

    r: int = 8
    """rank of every adapter (the inner size of its two low-rank matrices)."""
    alpha: float = 16.0
    """the adapter's output is scaled by alpha / r."""
    dropout: float = 0.05
    """dropout on the adapter's input, in [0, 1) (training only)."""
    targets: tuple[str, ...] = ("qkv", "proj", "mlp")
    """layers to adapt, some of: qkv, proj, mlp, lm_head."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))  # a YAML list or a Python list
        if self.r < 1:
            raise ValueError(f"lora.r={self.r} must be >= 1, in --lora.r; use a rank such as 8")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha} must be > 0, in --lora.alpha; use e.g. 2 * r (16 for r 8)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1), in --lora.dropout; use e.g. 0.05")
        if not self.targets:
            raise ValueError(f"lora.targets is empty, in --lora.targets; choose some of {TARGETS}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"lora.targets has unknown {unknown}, in --lora.targets; choose from {TARGETS}")

    @property
    def scale(self) -> float:
        """The adapters' output scale alpha / r."""
        return self.alpha / self.r


def apply_lora(model: nn.Module, args: LoRAArgs) -> list[str]:
    """Add a LoRA adapter (``Linear.add_lora(args.r, args.alpha, args.dropout)``) to every targeted layer and
    return their module names, in model order.

    Works on a meta-device model (the adapters are then initialised by ``litliger.init.init_weights`` after
    ``to_empty``); on a real device they are initialised at once. Call it before sharding. It does not
    change ``requires_grad``: which parameters train is the recipe's choice.
    """
    if "lm_head" in args.targets and model.lm_head is None:
        raise ValueError(
            "lora.targets includes 'lm_head' but this model has no separate LM head: it reuses the token "
            "embedding (tie_embeddings=True); drop 'lm_head' from --lora.targets"
        )
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, Linear) and any(re.fullmatch(_TARGET_PATTERNS[t], name) for t in args.targets)
    ]
    missing = [t for t in args.targets if not any(re.fullmatch(_TARGET_PATTERNS[t], n) for n in names)]
    if missing:
        raise ValueError(
            f"lora.targets {missing} match no layer of this model ({model.config.name}), in --lora.targets"
        )
    for name in names:
        model.get_submodule(name).add_lora(args.r, args.alpha, args.dropout)
    return names


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Full names of every ``lora_a`` / ``lora_b`` parameter of ``model``."""
    return [name for name, _ in model.named_parameters() if name.rpartition(".")[2] in _LORA_LEAVES]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[int]:
    """Inside, every LoRA adapter of ``model`` is skipped: the model computes its frozen base, with one copy of
    the weights (DPO's reference model for a LoRA finetune). Yields how many adapters were switched off."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.lora_a is not None]
    for layer in layers:
        layer.lora_enabled = False
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.lora_enabled = True


def merge_lora(model: nn.Module) -> None:
    """In place: W <- W + (B A) s in every adapted layer (fp32, rounded once to W's dtype), then the adapters
    are removed, so the model has exactly the base model's parameter names. For an unsharded model."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.merge_lora()


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """:func:`merge_lora` on a state dict of full tensors (as a checkpoint writer holds after gathering shards):
    every ``X.lora_a`` / ``X.lora_b`` pair is merged into ``X.weight`` with the one ``scale`` (alpha / r) and
    dropped; every other entry is kept as it is, in order. Bitwise equal to :func:`merge_lora`'s weights.
    """
    adapted: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in _LORA_LEAVES:
            adapted.setdefault(prefix, {})[leaf] = tensor
    unmatched = sorted(_join(p, leaf) for p, pair in adapted.items() for leaf in pair if len(pair) == 1)
    if unmatched:
        raise ValueError(f"LoRA tensors without their other half (lora_a and lora_b go in pairs): {unmatched}")
    orphans = sorted(_join(p, "weight") for p in adapted if _join(p, "weight") not in state_dict)
    if orphans:
        raise ValueError(f"LoRA tensors whose base weight is missing from the state dict: {orphans}")
    merged = {}
    for key, tensor in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in _LORA_LEAVES:
            continue
        if leaf == "weight" and prefix in adapted:
            a, b = adapted[prefix]["lora_a"], adapted[prefix]["lora_b"]
            if b.shape[0] != tensor.shape[0] or a.shape[1] != tensor.shape[1] or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"{key} {tuple(tensor.shape)} does not fit its LoRA tensors: lora_a {tuple(a.shape)}, "
                    f"lora_b {tuple(b.shape)}; expected (r, in) and (out, r)"
                )
            tensor = merge_lora_weight(tensor, a, b, scale)
        merged[key] = tensor
    return merged


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


METHODS = ("lora", "full")


def select_trainable(model: nn.Module, method: str, patterns: tuple[str, ...] = ()) -> list[str]:
    """The trainable parameter names in model order: everything for ``full``; for ``lora`` the adapters plus
    every parameter matched by a glob pattern over full names (``transformer.wpe.weight``, ``*.norm_*``).
    A pattern that matches nothing is an error, never a silent no-op."""
    names = [name for name, _ in model.named_parameters()]
    if method == "full":
        return names
    chosen = set(lora_parameter_names(model))
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(
                f"train.trainable pattern {pattern!r} matches no parameter of {model.config.name or 'this model'}, "
                f"in --train.trainable; names look like {names[0]!r} or {names[-1]!r}"
            )
        chosen.update(matched)
    return [n for n in names if n in chosen]


def base_parameter_names(model: nn.Module) -> set[str]:
    lora = set(lora_parameter_names(model))
    return {name for name, _ in model.named_parameters() if name not in lora}
