"""litliger checkpoint folder -> Hugging Face model folder (config.json + model.safetensors + tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoint.finetuned import exported_tensors, input_folders
from ..checkpoint.io import atomic_dir, copy_tokenizer_files, read_config
from ..checkpoint.safety import check_output_dir
from ..checkpoint.tensor_files import save_tensors
from ..data.tokenizer import Tokenizer
from ..model.config import Config
from ..util.files import read_json_object
from .from_hf import GENERATION_CONFIG, main_dtype, resolve_dtype, written
from .hf_config import config_to_hf
from .to_peft import convert_to_peft
from .weight_maps import family_map, listing, model_shapes

HF_WEIGHTS = "model.safetensors"


def convert_to_hf(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | str | None = None,
    *,
    format: Literal["full", "peft"] = "full",
    overwrite: bool = False,
) -> Path:
    """Convert the litliger checkpoint folder ``checkpoint_dir`` into a Hugging Face folder ``out_dir``.

    A finetune's step folder is merged on the way (its LoRA adapters folded into its base's weights) with
    ``format="full"``; ``format="peft"`` writes its LoRA adapter as a PEFT folder instead (``convert_to_peft``).

    ``out_dir`` gets config.json (architectures, model_type, dtype, bos/eos/pad token ids) and model.safetensors
    that ``transformers.AutoModelForCausalLM.from_pretrained`` loads, the tokenizer files, and a
    generation_config.json with the bos/eos/pad ids (see ``token_ids``), so that transformers' ``generate``
    stops where litliger's does. Prints one line on success: ``wrote <n> tensors (<dtype>) to <out_dir>``.
    Written atomically; publishing replaces ``out_dir``
    whole, so a non-empty one is refused unless ``overwrite``, and the checkpoint, its run folder (or any
    folder around or inside it) or another training run's folder is refused always (``check_output_dir``).
    Raises ``ValueError`` when no Hugging Face family can express the Config (naming the field) or the
    weights do not match it.

    Args:
        checkpoint_dir: a litliger checkpoint folder (model.safetensors, model_config.yaml, tokenizer files), or a
            finetune's step folder (trainable.safetensors + finetune.yaml on its base).
        out_dir: the Hugging Face folder to write (a new or empty one, else ``--overwrite true``).
        dtype: cast floating-point tensors to this dtype: bfloat16, float16 or float32 (a torch.dtype, or
            torch.<name>, also works); default: keep them.
        format: ``full``: a model folder for transformers (a step folder merged); ``peft``: a LoRA finetune's
            adapter as a PEFT folder (adapter_config.json + adapter_model.safetensors) for the exported base.
        overwrite: replace a non-empty ``out_dir`` (never the checkpoint, a folder around or inside it, or a run).
    """
    if format not in ("full", "peft"):
        raise ValueError(f"got {format!r}, in --format; use full or peft")
    if format == "peft":
        return convert_to_peft(checkpoint_dir, out_dir, dtype, overwrite=overwrite)
    dtype = resolve_dtype(dtype)
    checkpoint_dir = Path(checkpoint_dir)
    inputs = input_folders(checkpoint_dir)  # a step folder's base too: never replaced by the output
    check_output_dir(out_dir, inputs=inputs, overwrite=overwrite)
    config = read_config(checkpoint_dir)
    hf = config_to_hf(config)
    tensors = state_dict_to_hf(exported_tensors(checkpoint_dir), config, hf["model_type"], dtype)
    # transformers 5 reads "dtype"; transformers 4 read "torch_dtype"
    hf["dtype"] = hf["torch_dtype"] = main_dtype(tensors)
    generation = read_json_object(checkpoint_dir / GENERATION_CONFIG)
    ids = token_ids(checkpoint_dir, generation)
    hf.update(ids)
    with atomic_dir(out_dir) as tmp:
        save_tensors(tmp / HF_WEIGHTS, tensors, metadata={"format": "pt"})
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2)
        copy_tokenizer_files(checkpoint_dir, tmp)
        if generation or ids:  # the checkpoint's generation settings, with the ids transformers stops at
            with open(tmp / GENERATION_CONFIG, "w", encoding="utf-8") as f:
                json.dump({**generation, **ids}, f, indent=2)
        check_output_dir(out_dir, inputs=inputs, overwrite=overwrite)  # again: it may have changed meanwhile
    written(tensors, out_dir)
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


def token_ids(checkpoint_dir: Path, generation: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids for config.json and generation_config.json (else transformers assumes its defaults,
    e.g. Llama's eos 2, and never stops at the tokenizer's EOS).

    The ids of the checkpoint's ``generation`` config (a converted model keeps e.g. its list of EOS ids) are
    kept; the rest come from its tokenizer (``Tokenizer.from_dir``: the ids litliger decodes with). The
    tokenizer's EOS is always among the EOS ids, since litliger stops there; pad is the tokenizer's pad token,
    else EOS (the first one).
    """
    ids = {k: generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if generation.get(k) is not None}
    if (checkpoint_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_dir(checkpoint_dir)
        eos = ids.get("eos_token_id")
        if eos is None:
            ids["eos_token_id"] = tokenizer.eos_id
        elif tokenizer.eos_id not in (eos if isinstance(eos, list) else [eos]):
            ids["eos_token_id"] = [tokenizer.eos_id, *(eos if isinstance(eos, list) else [eos])]
        if "bos_token_id" not in ids and tokenizer.bos_id is not None:
            ids["bos_token_id"] = tokenizer.bos_id
        if "pad_token_id" not in ids:
            pad = _pad_token(checkpoint_dir)
            pad_id = tokenizer.backend.token_to_id(pad) if pad is not None else None
            if pad_id is not None:
                ids["pad_token_id"] = pad_id
    eos = ids.get("eos_token_id")
    if "pad_token_id" not in ids and eos is not None and eos != []:
        ids["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids}


def _pad_token(checkpoint_dir: Path) -> str | None:
    """The pad token named in tokenizer_config.json (a string or an AddedToken dict), if any."""
    pad = read_json_object(checkpoint_dir / "tokenizer_config.json").get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return pad if isinstance(pad, str) else None
