"""Which litliger layer each PEFT LoRA module is, per family: the names and row orders both directions share.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with tensors
``base_model.model.<Hugging Face module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r), the same
shapes as litliger's ``lora_a`` / ``lora_b``. The weight maps (weight_maps.py) say which Hugging Face modules
hold each litliger Linear; their transform of the weight's rows is the transform of B's rows:

- llama, mistral, qwen2, qwen3, gemma: ``attn.qkv`` is ``q_proj``, ``k_proj``, ``v_proj`` (B split by rows);
- gpt_neox: ``attn.qkv`` is ``query_key_value``, B's rows interleaved per head as the weight's are;
- gpt2: ``Conv1D`` stores its weight transposed, but PEFT's LoRA tensors on it are (r, in) and (out, r) like
  any other (``fan_in_fan_out`` only changes how PEFT merges): B is copied, rows already in ``[q | k | v]``.

A (the input side) is the same for every module a litliger Linear is split into.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..model.config import Config
from ..model.gpt import GPT
from ..model.lora import lora_target
from ..nn import Linear
from .weight_maps import WeightEntry, family_map

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # older PEFT folders
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM's prefix of the transformers model's names
LORA_A, LORA_B = "lora_A.weight", "lora_B.weight"
CONV1D_FAMILIES = ("gpt2",)  # weights stored (in, out): PEFT's fan_in_fan_out
# transformers 5 names GPT-NeoX's head module lm_head (transformers 4: embed_out; the weight map's canonical name)
_MODULE_NAMES = {"gpt_neox": {"embed_out": "lm_head"}}


@dataclass(frozen=True)
class AdaptableLayer:
    """A litliger Linear that LoRA can adapt and the Hugging Face modules (as PEFT names them) it is made of."""

    name: str  # litliger module name, e.g. transformer.h.0.attn.qkv
    target: str  # its entry of LoRAArgs.targets: qkv, proj, mlp or lm_head
    modules: tuple[str, ...]  # Hugging Face module names, in the weight entry's source order
    rows: tuple[int, ...]  # output rows of each of them
    in_features: int
    out_features: int
    entry: WeightEntry  # the map's entry of the weight: its row transform is B's
    conv1d: bool

    def split_b(self, b: torch.Tensor) -> list[torch.Tensor]:
        """litliger's B (out, r) -> each Hugging Face module's B, own memory each."""
        return [b.clone()] if self.conv1d else [p.contiguous() for p in self.entry.split(b)]

    def join_b(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Each Hugging Face module's B, in ``modules`` order -> litliger's B (out, r)."""
        return parts[0].clone() if self.conv1d else self.entry.join(parts).contiguous()


def adaptable_layers(config: Config, family: str) -> dict[str, AdaptableLayer]:
    """Every Linear of ``GPT(config)`` a LoRA target can adapt, by litliger module name, in model order."""
    weights = {e.target: e for e in family_map(family, config).entries}
    with torch.device("meta"):
        model = GPT(config)
    layers = {}
    for name, module in model.named_modules():
        target = lora_target(name) if isinstance(module, Linear) else None
        if target is None:
            continue
        entry = weights[f"{name}.weight"]
        conv1d = family in CONV1D_FAMILIES
        probe = torch.empty(module.out_features, 1, device="meta")  # B's rows per module, from the map itself
        layers[name] = AdaptableLayer(
            name=name,
            target=target,
            modules=tuple(peft_module_name(family, s.removesuffix(".weight")) for s in entry.sources),
            rows=(module.out_features,) if conv1d else tuple(p.shape[0] for p in entry.split(probe)),
            in_features=module.in_features,
            out_features=module.out_features,
            entry=entry,
            conv1d=conv1d,
        )
    return layers


def peft_module_name(family: str, module: str) -> str:
    """The name of a weight map's Hugging Face module in the transformers model PEFT wraps."""
    return _MODULE_NAMES.get(family, {}).get(module, module)


def canonical_module_name(family: str, module: str) -> str:
    """:func:`peft_module_name` backwards (either spelling is accepted on import)."""
    back = {v: k for k, v in _MODULE_NAMES.get(family, {}).items()}
    return back.get(module, module)


def module_suffix(module: str) -> str:
    """The name PEFT's ``target_modules`` / ``modules_to_save`` list for a module: without the layer prefix
    (``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``), which PEFT matches as a name suffix."""
    return re.sub(r"^.*?\.\d+\.", "", module)
