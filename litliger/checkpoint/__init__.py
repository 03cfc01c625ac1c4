"""Checkpoint folders: their layout (every file and folder name, once, in ``layout.py``), reading and writing
them (``io.py``, with deterministic tensor files in ``tensor_files.py`` and ``checksums.json`` in
``checksums.py``), the finetuning step folder (``finetuned.py``), the one loader ``load.load_model``, and the
guards for folders a command writes into (``safety.py``: output folders, the run lock, leftovers).

May import: ``litliger.util``, ``kernels``, ``nn``, ``model``. A checkpoint folder is data: nothing here
unpickles or runs code from it.
"""

from .io import (
    atomic_dir,
    copy_tokenizer_files,
    load_model_weights,
    load_state_dict,
    load_tensors,
    parameter_state_dict,
    publish_dir,
    read_config,
    read_finetune_meta,
    save_checkpoint,
    write_model_files,
)
from .layout import CONFIG_FILE, FINETUNE_FILE, MODEL_FILE, TOKENIZER_FILES, TRAINABLE_FILE

__all__ = [
    "CONFIG_FILE",
    "FINETUNE_FILE",
    "MODEL_FILE",
    "TOKENIZER_FILES",
    "TRAINABLE_FILE",
    "atomic_dir",
    "copy_tokenizer_files",
    "load_model_weights",
    "load_state_dict",
    "load_tensors",
    "parameter_state_dict",
    "publish_dir",
    "read_config",
    "read_finetune_meta",
    "save_checkpoint",
    "write_model_files",
]
