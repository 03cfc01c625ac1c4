"""litliger: LLM pretraining and finetuning with native GPT models built from fused Triton kernels.

The public surface: ``from litliger import GPT, LLM, Config, generate``; ``litliger.kernels.<op>``,
``litliger.data.<module>``, ``litliger.init`` (the init policy, ``litliger.nn.init``). The package is
layered, lowest first (tests/test_layers.py checks that imports only point down):

    util -> kernels -> nn (layers + init policy) -> model -> checkpoint -> data -> convert, inference
         -> eval, engine -> recipes -> tools -> cli

``GPT.from_checkpoint`` is attached here to ``checkpoint.load.load_model``, so the model class itself knows
nothing of folder formats.
"""

import sys

from .checkpoint.load import load_model
from .inference.generate import generate
from .model.config import Config
from .model.gpt import GPT
from .nn import init

GPT.from_checkpoint = staticmethod(load_model)
sys.modules[__name__ + ".init"] = init  # ``import litliger.init`` keeps working: the policy lives in nn/

__all__ = ["GPT", "LLM", "Config", "generate", "load_model"]


def __getattr__(name: str):  # noqa: ANN202 (a module's lazy attribute)
    """``litliger.LLM``, imported on first use: it loads the data package (tokenizers, prompt styles), which the
    commands that do not need it should not pay for at start."""
    if name == "LLM":
        from .inference.llm import LLM

        return LLM
    raise AttributeError(f"module 'litliger' has no attribute {name!r}")


__version__ = "0.1.0"
