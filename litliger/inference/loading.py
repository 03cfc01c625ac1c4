"""Loading a checkpoint for inference (generate, chat, evaluate): device, precision, tokenizer, prompt style."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

Precision = Literal["auto", "32-true", "bf16-true", "16-true"]


_DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; a device that is not there is a one-line error."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device, in --device; use auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is available, in --device; use --device cpu")
    return device


def precision_dtype(precision: Precision, device: str) -> torch.dtype:
    """The weights' (and the KV cache's) dtype: ``auto`` is bf16 on a GPU that supports it, else fp32."""
    if precision == "auto":
        bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16-true" if bf16 else "32-true"
    return _DTYPES[precision]


def read_tokenizer(checkpoint_dir: Path):
    """The checkpoint's tokenizer; a folder without one is a one-line error that names it."""
    from ..data import Tokenizer

    if not (Path(checkpoint_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"No tokenizer.json in {checkpoint_dir}: the checkpoint has no tokenizer, in CHECKPOINT_DIR; copy "
            "tokenizer.json (and tokenizer_config.json) of the model it came from into the folder"
        )
    return Tokenizer.from_dir(checkpoint_dir)


def load_for_inference(checkpoint_dir: Path, device: str, precision: Precision):
    """(model in eval mode, tokenizer, device) of a checkpoint folder or a finetuning step folder."""
    from ..model.gpt import GPT

    device = resolve_device(device)
    tokenizer = read_tokenizer(checkpoint_dir)
    model = GPT.from_checkpoint(checkpoint_dir, device=device, dtype=precision_dtype(precision, device)).eval()
    return model, tokenizer, device


def recorded_prompt_style(checkpoint_dir: Path):
    """The prompt style a finetuned checkpoint was trained with, or None (not a finetune, or none recorded)."""
    from ..checkpoint.io import read_finetune_meta
    from ..checkpoint.layout import FINETUNE_FILE
    from ..data import PromptStyle

    if not (Path(checkpoint_dir) / FINETUNE_FILE).is_file():
        return None
    recorded = read_finetune_meta(checkpoint_dir).get("prompt_style")
    return PromptStyle.from_dict(recorded) if recorded else None
