"""Finetuned models: which parameters train, and the checkpoint folder that holds only those.

    step-XXXXXXXX/  trainable.safetensors   exactly the trainable set (LoRA tensors + parameters selected by name)
                    finetune.yaml           method, LoRA settings, trainable names, base folder + digest, prompt style
                    model_config.yaml, tokenizer files (+ training_state/ when written by a run)
    final/          the same, plus model.safetensors: the merged model, a complete checkpoint folder (a full
                    finetune's final/ holds model.safetensors alone: it is every trained tensor, stored once)

The frozen base is never stored again: a step folder is loaded as base (verified by the digest of its tensors) + the
trainable tensors. Any parameter can be trained by its full name, also a bare ``nn.Parameter`` attribute
of a module (a learned position table, a gate): selection is by name over ``named_parameters()``, so
nothing that trains can be left out of the file (PEFT's ``modules_to_save`` lost such tensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from ..model.config import Config
from ..model.gpt import GPT
from ..model.lora import LoRAArgs, apply_lora, base_parameter_names, merge_lora, merge_lora_state_dict
from ..nn.init import init_weights
from .checksums import verify_checksums
from .io import (
    check_base,
    copy_tokenizer_files,
    load_state_dict,
    load_tensors,
    parameter_state_dict,
    read_config,
    read_finetune_meta,
    save_checkpoint,
    stored_dtype,
    write_model_files,
)
from .layout import FINETUNE_FILE, MODEL_FILE, TRAINABLE_FILE
from .tensor_files import save_tensors


def finetune_meta(
    *,
    method: str,
    lora: LoRAArgs | None,
    trainable: list[str],
    base_dir: Path,
    base_digest: str,
    prompt_style: dict[str, Any] | None,
    objective: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What finetune.yaml records (and what a resume must agree with). ``objective``: the loss and its settings
    (``{"loss": "dpo", "beta": 0.1, ...}``; absent: supervised finetuning)."""
    return {
        "objective": objective or {"loss": "sft"},
        "method": method,
        "lora": None if method != "lora" or lora is None else {**vars(lora), "targets": list(lora.targets)},
        "trainable": list(trainable),
        "base": {"checkpoint_dir": str(Path(base_dir).resolve()), "tensors_sha256": base_digest},
        "prompt_style": prompt_style,
    }


def check_same_finetune(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """A resume continues the same finetune: same method, LoRA settings, trainable set and base weights."""
    diffs = []
    sft = {"loss": "sft"}
    old_objective, new_objective = saved.get("objective") or sft, current.get("objective") or sft
    if old_objective != new_objective:
        diffs.append(f"objective {old_objective} -> {new_objective}")
    if saved["method"] != current["method"]:
        diffs.append(f"method {saved['method']} -> {current['method']}")
    for key in ("r", "alpha", "dropout", "targets"):
        old, new = (saved.get("lora") or {}).get(key), (current.get("lora") or {}).get(key)
        if old != new:
            diffs.append(f"lora.{key} {old} -> {new}")
    added = sorted(set(current["trainable"]) - set(saved["trainable"]))
    removed = sorted(set(saved["trainable"]) - set(current["trainable"]))
    if added or removed:
        diffs.append(f"trainable set (+{added[:3]} -{removed[:3]})")
    recorded, found = saved["base"].get("tensors_sha256"), current["base"]["tensors_sha256"]
    if recorded != found:
        old_dir, new_dir = saved["base"]["checkpoint_dir"], current["base"]["checkpoint_dir"]
        where_base = new_dir if old_dir == new_dir else f"{old_dir} -> {new_dir}"
        recorded = f"{recorded[:12]}..." if recorded else "a file sha256 only"
        diffs.append(f"base weights in {where_base} (tensor digest recorded {recorded}, found {found[:12]}...)")
    if diffs:
        raise ValueError(
            f"checkpoint {where} is of another finetune: {'; '.join(diffs)}; resume with the settings in "
            f"{where / FINETUNE_FILE} or start a fresh run in another --out_dir"
        )


def write_finetune_files(
    folder: Path, tensors: dict[str, torch.Tensor], *, meta: dict[str, Any], config: Config, final: bool
) -> list[str]:
    """Write a finetuning checkpoint's files into ``folder``; returns their names. ``tensors`` holds at least
    the trainable set; for ``final`` every parameter, and the merged model is written beside them.

    The weights are stored once: when the merged model holds every trained tensor as trained (a full
    finetune: nothing to merge), final/ has model.safetensors alone and a resume reads the trained tensors from
    it (:func:`trained_tensors_file`)."""
    base = Path(meta["base"]["checkpoint_dir"])
    merged = None
    if final:
        merged = tensors
        if meta["lora"] is not None:
            merged = merge_lora_state_dict(dict(tensors), LoRAArgs(**meta["lora"]).scale)
    files = [FINETUNE_FILE]
    if merged is None or not set(meta["trainable"]) <= set(merged):
        trainable = {name: tensors[name].detach().to("cpu").contiguous() for name in meta["trainable"]}
        save_tensors(folder / TRAINABLE_FILE, trainable, metadata={"format": "pt", "litliger": "1"})
        files.insert(0, TRAINABLE_FILE)
    (folder / FINETUNE_FILE).write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")
    if merged is not None:
        write_model_files(folder, merged, config)
        files.append(MODEL_FILE)
    else:
        config.save(folder / "model_config.yaml")
    copy_tokenizer_files(base, folder)
    return files


def trained_tensors_file(folder: str | Path) -> Path:
    """The file of a finetuning checkpoint that holds its trained tensors: trainable.safetensors, or the
    model.safetensors of a full finetune's final/ (which stores the weights once)."""
    folder = Path(folder)
    trainable = folder / TRAINABLE_FILE
    return trainable if trainable.is_file() or not (folder / MODEL_FILE).is_file() else folder / MODEL_FILE


def is_finetune_checkpoint(folder: str | Path) -> bool:
    """A step folder of a finetune (trainable tensors on a base), not a complete checkpoint folder."""
    folder = Path(folder)
    return (folder / FINETUNE_FILE).is_file() and not (folder / MODEL_FILE).is_file()


def load_finetuned(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load a finetuning step folder as base + trainable tensors (unmerged), after checking that the base
    file is the one the run trained on."""
    folder = Path(folder)
    verify_checksums(folder, training_state=False)
    meta = read_finetune_meta(folder)
    base = check_base(meta, folder)
    config = read_config(folder)
    lora = LoRAArgs(**meta["lora"]) if meta["lora"] is not None else None
    if dtype is None:  # the stored dtype, as load_model: the base's and the trained tensors' when they agree
        dtype = stored_dtype(base / MODEL_FILE, trained_tensors_file(folder))
    with torch.device("meta"):
        model = GPT(config)
        if lora is not None:
            apply_lora(model, lora)
    model.to_empty(device=device)
    if dtype is not None:
        model.to(dtype)
    init_weights(model, seed=0, resuming=True)  # rebuilds the rotary tables; parameters come from the files
    trainable = set(meta["trainable"])
    unknown = sorted(trainable - {n for n, _ in model.named_parameters()})
    if unknown:
        raise ValueError(f"{folder / FINETUNE_FILE} names trainable tensors the model lacks: {unknown[:5]}")
    base_names = base_parameter_names(model)
    load_tensors(model, base / MODEL_FILE, expected=base_names, copy=base_names - trainable)
    load_tensors(model, trained_tensors_file(folder), expected=trainable)
    return model


def input_folders(checkpoint_dir: str | Path) -> list[Path]:
    """The folders a command reads for ``checkpoint_dir``: itself and, for a finetune step folder, its base (no
    output may replace either)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not is_finetune_checkpoint(checkpoint_dir):
        return [checkpoint_dir]
    return [checkpoint_dir, Path(read_finetune_meta(checkpoint_dir)["base"]["checkpoint_dir"])]


def merged_parameters(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """A finetune step folder's model (base + trained tensors, verified) with its adapters merged (in fp32,
    rounded once to the stored dtype), as parameters by the base's names: what ``merge_lora`` saves, and what
    ``convert_to_hf`` / ``convert_to_gguf`` export."""
    model = load_finetuned(step_dir)
    merge_lora(model)
    return {name: p.detach() for name, p in parameter_state_dict(model).items()}


def exported_tensors(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """What an export writes (``convert_to_hf``, ``convert_to_gguf``): a complete folder's stored tensors, a
    finetune step folder's :func:`merged_parameters`."""
    if is_finetune_checkpoint(checkpoint_dir):
        return merged_parameters(checkpoint_dir)
    return load_state_dict(checkpoint_dir)


def merge_lora_checkpoint(checkpoint_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """``litliger merge_lora STEP_DIR OUT_DIR``: a finetuning step folder -> a complete checkpoint folder.

    The adapters are merged into the weights (``W += (B @ A) * alpha / r`` in fp32); the result is ready for
    every command.

    Args:
        checkpoint_dir: a finetuning checkpoint folder (trainable.safetensors + finetune.yaml).
        out_dir: the new checkpoint folder (an existing non-empty one only with ``--overwrite``).
        overwrite: replace a non-empty ``out_dir`` (never the inputs or a run folder).
    """
    from .safety import check_output_dir

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    read_finetune_meta(checkpoint_dir)  # a one-line error for a folder that is not a finetune
    inputs = input_folders(checkpoint_dir)
    check_output_dir(out_dir, inputs=inputs, overwrite=overwrite)
    parameters = merged_parameters(checkpoint_dir)

    def extra_files(folder: Path) -> None:
        copy_tokenizer_files(checkpoint_dir, folder)
        (folder / FINETUNE_FILE).write_text((checkpoint_dir / FINETUNE_FILE).read_text(encoding="utf-8"))
        # save_checkpoint calls this inside its atomic_dir block, after the weights and the config: the last step
        # before checksums.json and the publish, which is where convert_to_hf checks its output folder again
        check_output_dir(out_dir, inputs=inputs, overwrite=overwrite)  # again: it may have changed meanwhile

    save_checkpoint(out_dir, parameters, read_config(checkpoint_dir), save_tokenizer=extra_files)
    print(f"merged {checkpoint_dir} into {out_dir}")
    return out_dir
