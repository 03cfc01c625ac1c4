"""Data: tokenizers, text corpora tokenized into litdata caches, and resumable loaders.

Layering: this package may use torch, tokenizers and litdata, never the model, the engine or Fabric.
"""

from litliger.data.base import DataModule, ResumableLoader, infinite_batches
from litliger.data.stdlib import PythonStdlib
from litliger.data.text_files import TextFiles
from litliger.data.tokenizer import Tokenizer

__all__ = ["DataModule", "PythonStdlib", "ResumableLoader", "TextFiles", "Tokenizer", "infinite_batches"]
