"""litliger checkpoint folder -> Hugging Face model folder (config.json + model.safetensors + tokenizer)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.io import atomic_dir, copy_tokenizer_files, load_state_dict, read_config
from ..checkpoint.safety import check_output_dir
from ..checkpoint.tensor_files import save_tensors
from ..model.config import Config
from .from_hf import GENERATION_CONFIG
from .hf_config import config_to_hf
from .weight_maps import family_map, listing, model_shapes

HF_WEIGHTS = "model.safetensors"


def convert_to_hf(
    checkpoint_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None, *, overwrite: bool = False
) -> Path:
    """Convert the litliger checkpoint folder ``checkpoint_dir`` into a Hugging Face folder ``out_dir``.

    ``out_dir`` gets config.json (architectures, model_type, dtype) and model.safetensors that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads, plus the tokenizer files and
    generation_config.json when the checkpoint has them. Written atomically; publishing replaces ``out_dir``
    whole, so a non-empty one is refused unless ``overwrite``, and the checkpoint, its run folder (or any
    folder around or inside it) or another training run's folder is refused always (``check_output_dir``).
    Raises ``ValueError`` when no Hugging Face family can express the Config (naming the field) or the
    weights do not match it.

    Args:
        checkpoint_dir: a litliger checkpoint folder (model.safetensors, model_config.yaml, tokenizer files).
        out_dir: the Hugging Face folder to write (a new or empty one, else ``--overwrite true``).
        dtype: cast floating-point tensors to this torch dtype, e.g. ``torch.bfloat16`` (default: keep them).
        overwrite: replace a non-empty ``out_dir`` (never the checkpoint, a folder around or inside it, or a run).
    """
    checkpoint_dir = Path(checkpoint_dir)
    check_output_dir(out_dir, inputs=[checkpoint_dir], overwrite=overwrite)
    config = read_config(checkpoint_dir)
    hf = config_to_hf(config)
    tensors = state_dict_to_hf(load_state_dict(checkpoint_dir), config, hf["model_type"], dtype)
    # transformers 5 reads "dtype"; transformers 4 read "torch_dtype"
    hf["dtype"] = hf["torch_dtype"] = _main_dtype(tensors)
    hf.update(_token_ids(checkpoint_dir))
    with atomic_dir(out_dir) as tmp:
        save_tensors(tmp / HF_WEIGHTS, tensors, metadata={"format": "pt"})
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2)
        copy_tokenizer_files(checkpoint_dir, tmp)
        if (checkpoint_dir / GENERATION_CONFIG).is_file():
            shutil.copy2(checkpoint_dir / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
        check_output_dir(out_dir, inputs=[checkpoint_dir], overwrite=overwrite)  # again: it may have changed meanwhile
    return Path(out_dir)


def state_dict_to_hf(
    state_dict: dict[str, torch.Tensor], config: Config, family: str, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of ``family`` from litliger parameters; consumes ``state_dict`` as it goes
    (so the model is held about once). Every parameter of ``GPT(config)`` must be present, and nothing else.
    """
    fmap = family_map(family, config)
    shapes = model_shapes(config)
    missing, unexpected = set(shapes) - set(state_dict), set(state_dict) - set(shapes)
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not match its model_config.yaml: missing {listing(missing)}, "
            f"unexpected {listing(unexpected)}"
        )
    targets = {e.target for e in fmap.entries}
    if targets != set(shapes):
        raise AssertionError(
            f"the {family} map does not cover the model exactly: unmapped {listing(set(shapes) - targets)}, "
            f"not in the model {listing(targets - set(shapes))}"
        )
    out: dict[str, torch.Tensor] = {}
    for entry in fmap.entries:
        value = state_dict.pop(entry.target)
        if tuple(value.shape) != shapes[entry.target]:
            raise ValueError(f"{entry.target} has shape {tuple(value.shape)}, the model expects {shapes[entry.target]}")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        for name, part in zip(entry.sources, entry.split(value), strict=True):
            out[name] = part.contiguous()
    return out


def _main_dtype(tensors: dict[str, torch.Tensor]) -> str:
    """The floating dtype holding most of the elements, as config.json spells it ("bfloat16")."""
    counts = Counter({t.dtype: 0 for t in tensors.values() if t.is_floating_point()})
    for t in tensors.values():
        if t.is_floating_point():
            counts[t.dtype] += t.numel()
    return str(counts.most_common(1)[0][0]).removeprefix("torch.")


def _token_ids(checkpoint_dir: Path) -> dict[str, Any]:
    """bos/eos/pad ids of the checkpoint's generation_config.json (config.json carries them too)."""
    path = checkpoint_dir / GENERATION_CONFIG
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        generation = json.load(f)
    return {k: generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in generation}
