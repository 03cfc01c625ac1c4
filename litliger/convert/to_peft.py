"""A LoRA finetune's checkpoint folder -> a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

``peft.PeftModel.from_pretrained(<convert_to_hf of the base>, OUT_DIR)`` computes what litliger's unmerged
step folder computes. The fused ``attn.qkv`` adapter of the llama-like families becomes three (q, k, v) with
the same A and B split by rows; every other layer maps one to one (peft_map.py). PEFT's scale is
``lora_alpha / r``: written as litliger's alpha and r, so it is the same number. Trained parameters that are
not LoRA tensors (``train.trainable``: norms, an untied embedding or head) go to ``modules_to_save``, each as
its whole Hugging Face module (a LayerNorm's untrained bias comes from the base); a tied embedding is
refused (PEFT's copy of it would no longer be the head), as is a trained weight of an adapted layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..checkpoint.checksums import verify_checksums
from ..checkpoint.finetuned import trained_tensors_file
from ..checkpoint.io import atomic_dir, check_base, copy_tokenizer_files, read_config, read_finetune_meta
from ..checkpoint.layout import FINETUNE_FILE, MODEL_FILE
from ..checkpoint.safety import check_output_dir
from ..checkpoint.tensor_files import save_tensors
from ..model.config import Config
from .from_hf import resolve_dtype, written
from .hf_config import config_to_hf
from .peft_map import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONV1D_FAMILIES,
    LORA_A,
    LORA_B,
    PEFT_PREFIX,
    AdaptableLayer,
    adaptable_layers,
    module_suffix,
    peft_module_name,
)
from .weight_maps import family_map, listing

_LORA_LEAVES = ("lora_a", "lora_b")


def convert_to_peft(
    checkpoint_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | str | None = None, *, overwrite: bool = False
) -> Path:
    """Write the LoRA adapter of the finetune checkpoint ``checkpoint_dir`` as the PEFT folder ``out_dir``
    (``convert_to_hf --format peft``), for the base recorded in its finetune.yaml as ``convert_to_hf`` exports
    it. The folder and its base are verified first; written atomically, with the same output-folder rules as
    every conversion. Prints ``wrote <n> tensors (<dtype>) to <out_dir>``."""
    dtype = resolve_dtype(dtype)
    folder = Path(checkpoint_dir)
    meta = _lora_meta(folder)
    base = Path(meta["base"]["checkpoint_dir"])
    check_output_dir(out_dir, inputs=[folder, base], overwrite=overwrite)
    verify_checksums(folder, training_state=False)
    check_base(meta, folder)
    config = read_config(folder)
    family = config_to_hf(config)["model_type"]
    trained = load_file(str(trained_tensors_file(folder)))
    if set(trained) != set(meta["trainable"]):
        raise ValueError(
            f"the trained tensors {listing(set(trained) ^ set(meta['trainable']))} are not the trainable set of "
            f"{folder / FINETUNE_FILE}, in {folder}; use an intact checkpoint"
        )
    layers = adaptable_layers(config, family)
    tensors, adapted = _lora_tensors(trained, layers)
    others = [name for name in meta["trainable"] if name.rpartition(".")[2] not in _LORA_LEAVES]
    saved, modules_to_save = _modules_to_save(others, trained, config, family, base, adapted)
    tensors.update(saved)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    adapter_config = peft_config(meta["lora"], family, adapted, modules_to_save)
    with atomic_dir(out_dir) as tmp:
        save_tensors(tmp / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
        copy_tokenizer_files(folder, tmp)
        check_output_dir(out_dir, inputs=[folder, base], overwrite=overwrite)  # again: it may have changed meanwhile
    written(tensors, out_dir)
    return Path(out_dir)


def _lora_meta(folder: Path) -> dict[str, Any]:
    """finetune.yaml of a LoRA finetune; anything else is one line that says to use --format full."""
    if not (folder / FINETUNE_FILE).is_file():
        raise ValueError(
            f"{folder} is not a finetune checkpoint ({FINETUNE_FILE} missing), in --format peft; give a step "
            "folder of a LoRA finetune, or use --format full for a model"
        )
    meta = read_finetune_meta(folder)
    if meta["method"] != "lora" or not meta.get("lora"):
        raise ValueError(
            f"{folder} is a finetune with method {meta['method']!r}, not LoRA, in --format peft; a PEFT folder "
            "holds LoRA adapters: use --format full"
        )
    return meta


def _lora_tensors(
    trained: dict[str, torch.Tensor], layers: dict[str, AdaptableLayer]
) -> tuple[dict[str, torch.Tensor], list[AdaptableLayer]]:
    """PEFT's lora_A / lora_B of every adapted layer (A copied to each module, B split as the weight is), and the
    adapted layers in model order."""
    adapted = [layer for name, layer in layers.items() if f"{name}.lora_a" in trained]
    tensors = {}
    for layer in adapted:
        a, b = trained[f"{layer.name}.lora_a"], trained[f"{layer.name}.lora_b"]
        for module, part in zip(layer.modules, layer.split_b(b), strict=True):
            tensors[f"{PEFT_PREFIX}{module}.{LORA_A}"] = a.clone()
            tensors[f"{PEFT_PREFIX}{module}.{LORA_B}"] = part
    return tensors, adapted


def _modules_to_save(
    names: list[str],
    trained: dict[str, torch.Tensor],
    config: Config,
    family: str,
    base: Path,
    adapted: list[AdaptableLayer],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The trained parameters ``names`` (not LoRA tensors) as PEFT's ``modules_to_save``: every parameter of each
    Hugging Face module they belong to (trained values, else the base's), and the modules' names."""
    if not names:
        return {}, []
    if config.tie_embeddings and "transformer.wte.weight" in names:
        raise ValueError(
            "train.trainable holds transformer.wte.weight, the embedding tied to the LM head, in --format peft; "
            "PEFT's modules_to_save would give the input a new embedding and leave the head as it was: use "
            "--format full"
        )
    entries = family_map(family, config).entries
    module_of = lambda source: peft_module_name(family, source.rpartition(".")[0])
    wanted = {module_of(s) for e in entries if e.target in names for s in e.sources}
    clash = sorted(wanted & {m for layer in adapted for m in layer.modules})
    if clash:
        raise ValueError(
            f"train.trainable trains parameters of the adapted layers {clash}, in --format peft; PEFT cannot "
            "both adapt a module and save it whole: use --format full"
        )
    tensors = {}
    with safe_open(str(base / MODEL_FILE), framework="pt", device="cpu") as weights:
        for entry in entries:
            if not any(module_of(s) in wanted for s in entry.sources):
                continue
            value = trained[entry.target] if entry.target in trained else weights.get_tensor(entry.target)
            for source, part in zip(entry.sources, entry.split(value), strict=True):
                if module_of(source) in wanted:
                    tensors[f"{PEFT_PREFIX}{module_of(source)}.{source.rpartition('.')[2]}"] = part.contiguous()
    return tensors, sorted(wanted)


def peft_config(
    lora: dict[str, Any], family: str, adapted: list[AdaptableLayer], modules_to_save: list[str]
) -> dict[str, Any]:
    """adapter_config.json: PEFT's LoraConfig with litliger's rank, alpha (so lora_alpha / r is litliger's
    scale) and dropout; target_modules name the adapted modules without their layer prefix."""
    targets = sorted({module_suffix(m) for layer in adapted for m in layer.modules})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": lora["r"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "target_modules": targets,
        "fan_in_fan_out": family in CONV1D_FAMILIES,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
