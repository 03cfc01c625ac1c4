"""The one loader: a checkpoint folder -> a ready model, whichever kind of folder it is.

``load_model`` takes a complete checkpoint folder (model.safetensors + model_config.yaml) or a finetuning step
folder (its base + trainable.safetensors, unmerged; checkpoint/finetuned.py). Every file is first verified
against the folder's checksums.json. The model is built on the meta device, materialised on ``device`` and
filled from the files, so nothing is initialised twice and no meta tensor is ever loaded into.
``GPT.from_checkpoint`` is this function (the package root attaches it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.gpt import GPT
from ..nn.init import init_weights
from .checksums import verify_checksums
from .finetuned import is_finetune_checkpoint, load_finetuned
from .io import load_model_weights, read_config, stored_dtype
from .layout import MODEL_FILE


def load_model(checkpoint_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """The model of ``checkpoint_dir`` on ``device``, in train mode like ``GPT()``: in ``dtype`` when given, else
    in the dtype its weights are stored in (a bf16 folder loads as bf16; one that mixes dtypes loads as fp32)."""
    if is_finetune_checkpoint(checkpoint_dir):
        return load_finetuned(checkpoint_dir, device=device, dtype=dtype)
    verify_checksums(Path(checkpoint_dir), training_state=False)
    config = read_config(checkpoint_dir)
    if dtype is None:
        dtype = stored_dtype(Path(checkpoint_dir) / MODEL_FILE)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    if dtype is not None:
        model.to(dtype)
    init_weights(model, seed=0, resuming=True)  # rebuilds the rotary tables; parameters come from the file
    load_model_weights(model, checkpoint_dir)
    return model
