"""litliger: LLM pretraining and finetuning with native GPT models built from fused Triton kernels."""

from .config import Config
from .model import GPT

__all__ = ["GPT", "Config"]
__version__ = "0.1.0"
