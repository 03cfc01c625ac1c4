"""Data: tokenizers, corpora of any format tokenized into litdata token shards, weighted mixtures, prepared
(local or remote) shards, instruction data, and exactly resumable loaders.

Layering: this package may use torch, tokenizers, litdata (and its obstore), pyarrow, zstandard and jinja2 (chat
templates), never the model, the checkpoint package, the engine or Fabric (``litliger.util`` is fine).
The chat-template sandbox (``sandbox.py``) bounds what a model folder's template may render.
"""

from litliger.data.base import DataModule, ResumableLoader, infinite_batches
from litliger.data.corpus import Corpus
from litliger.data.docstrings import PythonDocstrings
from litliger.data.example_loader import ExampleLoader
from litliger.data.instructions import Instructions
from litliger.data.mixture import Mixture, MixtureLoader, Source
from litliger.data.preferences import Preferences, PythonPreferences
from litliger.data.prompts import PromptStyle, resolve_prompt_style
from litliger.data.stdlib import PythonStdlib
from litliger.data.text_files import TextFiles
from litliger.data.token_shards import TokenShards
from litliger.data.tokenizer import Tokenizer

__all__ = [
    "Corpus",
    "DataModule",
    "ExampleLoader",
    "Instructions",
    "Mixture",
    "MixtureLoader",
    "Preferences",
    "PromptStyle",
    "PythonDocstrings",
    "PythonPreferences",
    "PythonStdlib",
    "ResumableLoader",
    "Source",
    "TextFiles",
    "TokenShards",
    "Tokenizer",
    "infinite_batches",
    "resolve_prompt_style",
]
