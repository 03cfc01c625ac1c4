"""Hugging Face <-> litliger weight conversion with explicit per-family maps.

``convert_from_hf(HF_DIR, OUT_DIR)`` writes a litliger checkpoint folder; ``convert_to_hf(CKPT_DIR, OUT_DIR)``
writes a folder ``transformers.AutoModelForCausalLM.from_pretrained`` loads, ``convert_to_gguf(CKPT_DIR, OUT.gguf)``
one GGUF file for llama.cpp (the gguf package imported only then); ``download(ORG/NAME)`` fetches a
model's safetensors, config and tokenizer from the Hugging Face Hub (through huggingface_hub and its cache) and
converts them into ``checkpoints/ORG/NAME``. Every parameter is produced exactly once; a missing, unknown or
mis-shaped weight is an error that names it. None replaces a non-empty ``OUT_DIR`` unless ``overwrite=True``,
nor ever an input, a folder around or inside one, or a training run's folder
(``litliger.checkpoint.safety.check_output_dir``). See tutorials/convert.md.

May import: ``util``, ``kernels``, ``nn``, ``model``, ``checkpoint``, ``data``; not the engine.
"""

from .download import download
from .from_hf import convert_from_hf
from .hf_config import FAMILIES, config_from_hf, config_to_hf
from .to_gguf import convert_to_gguf
from .to_hf import convert_to_hf

__all__ = [
    "FAMILIES",
    "config_from_hf",
    "config_to_hf",
    "convert_from_hf",
    "convert_to_gguf",
    "convert_to_hf",
    "download",
]
