"""Kernel-backed layers (linear and embedding with LoRA, norms, rotary, GLU MLPs), each implementing
``reset_parameters()`` through the init policy, which lives here too (``init.py``: schemes, seeding, the
per-environment behaviour): the policy sits with the layers it fills.

May import: ``litliger.util`` and ``litliger.kernels``. Not the model (the policy reads a config through the
``InitConfig`` protocol).
"""

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
