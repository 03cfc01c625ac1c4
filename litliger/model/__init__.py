"""The model: one GPT for every family (``gpt.py``), its ``Config`` (``config.py``) and the registry of
published configs (``registry.py``), the KV cache for decoding, LoRA adapters at the model level, and how
the model is parallelised (``parallelize.py``: FSDP2 per block).

May import: ``litliger.util``, ``litliger.kernels``, ``litliger.nn``. Nothing here knows checkpoint folders,
Fabric or the training engine.
"""

from .config import Config
from .gpt import GPT, Block, CausalSelfAttention

__all__ = ["GPT", "Block", "CausalSelfAttention", "Config"]
