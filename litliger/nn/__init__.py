"""Kernel-backed layers; each implements ``reset_parameters()`` through the init policy."""

from .linear import Embedding, Linear, merge_lora_weight
from .mlp import GeGLUMLP, GeluMLP, SwiGLUMLP
from .norms import LayerNorm, RMSNorm
from .rotary import RotaryEmbedding, inverse_frequencies

__all__ = [
    "Embedding",
    "GeGLUMLP",
    "GeluMLP",
    "LayerNorm",
    "Linear",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLUMLP",
    "inverse_frequencies",
    "merge_lora_weight",
]
