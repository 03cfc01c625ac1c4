"""Data: tokenizers, text corpora tokenized into litdata caches, instruction data, and resumable loaders.

Layering: this package may use torch, tokenizers, litdata and jinja2 (chat templates; a torch dependency),
never the model, the checkpoint package, the engine or Fabric (``litliger.util`` is fine).
The chat-template sandbox (``sandbox.py``) bounds what a model folder's template may render.
"""

from litliger.data.base import DataModule, ResumableLoader, infinite_batches
from litliger.data.docstrings import PythonDocstrings
from litliger.data.example_loader import ExampleLoader
from litliger.data.instructions import Instructions
from litliger.data.prompts import PromptStyle, resolve_prompt_style
from litliger.data.stdlib import PythonStdlib
from litliger.data.text_files import TextFiles
from litliger.data.tokenizer import Tokenizer

__all__ = [
    "DataModule",
    "ExampleLoader",
    "Instructions",
    "PromptStyle",
    "PythonDocstrings",
    "PythonStdlib",
    "ResumableLoader",
    "TextFiles",
    "Tokenizer",
    "infinite_batches",
    "resolve_prompt_style",
]
