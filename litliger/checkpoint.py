"""The litliger checkpoint folder: the one format for trained, converted and shared weights.

    model.safetensors     parameters under litliger names (buffers such as rotary tables are not stored)
    model_config.yaml     the Config
    tokenizer.json        (+ tokenizer_config.json) when the model has a tokenizer

A finetuning step folder holds ``trainable.safetensors`` (only what was trained) and ``finetune.yaml`` (the
method, LoRA settings, trainable names, and the base folder with the sha256 of its model.safetensors)
instead of model.safetensors: the frozen base is never stored twice. litliger/adapter.py loads it.

Folders are written atomically: everything goes into a hidden temporary sibling that is renamed into
place at the end, so an interrupted write never leaves a folder under the final name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import Config

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model_config.yaml"
TRAINABLE_FILE = "trainable.safetensors"  # a finetuning checkpoint: only the tensors that were trained
FINETUNE_FILE = "finetune.yaml"  # ... and what they sit on: method, LoRA settings, base folder + sha256
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def read_config(checkpoint_dir: str | Path) -> Config:
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir} is not a litliger checkpoint folder: {CONFIG_FILE} is missing "
            "(convert Hugging Face weights first with `litliger convert_from_hf`)"
        )
    return Config.from_file(path)


def _weights_path(checkpoint_dir: str | Path) -> Path:
    path = Path(checkpoint_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a litliger checkpoint folder: {MODEL_FILE} is missing")
    return path


@contextmanager
def _open_weights(path: Path) -> Iterator:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); the checkpoint is corrupt or incomplete"
        ) from e
    with handle as f:
        yield f


def load_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` on the CPU."""
    with _open_weights(_weights_path(checkpoint_dir)) as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def load_model_weights(model: nn.Module, checkpoint_dir: str | Path) -> None:
    """Copy ``model.safetensors`` into ``model``'s (already materialised) parameters; the file must hold
    exactly the model's parameters (see :func:`load_tensors`)."""
    names = {name for name, _ in model.named_parameters()}
    load_tensors(model, _weights_path(checkpoint_dir), expected=names)


def load_tensors(model: nn.Module, path: Path, *, expected: set[str], copy: set[str] | None = None) -> None:
    """Copy the tensors named ``copy`` (default: all of ``expected``) from the safetensors file ``path`` into
    ``model``'s materialised parameters. The file must hold exactly the names ``expected``.

    Shard-aware: an FSDP2 parameter (DTensor) reads only its own rows from the file, so no rank ever
    holds the full model and nothing is loaded into an empty or meta tensor. Every name and shape is
    checked before the first copy, so a mismatch raises an error naming them and leaves the model untouched.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    params = dict(model.named_parameters())
    copy = expected if copy is None else copy
    with _open_weights(path) as f:
        stored = set(f.keys())
        missing, unexpected = sorted(expected - stored), sorted(stored - expected)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match the model: missing {missing[:8]} ({len(missing)} in all), "
                f"unexpected {unexpected[:8]} ({len(unexpected)} in all). Is it a checkpoint of this model?"
            )
        for name in sorted(copy):
            stored_shape = tuple(f.get_slice(name).get_shape())
            if params[name].is_meta:
                raise RuntimeError(f"{name} is on the meta device; materialise the model before loading weights")
            if stored_shape != tuple(params[name].shape):
                raise ValueError(
                    f"{path}: {name} has shape {stored_shape} but the model expects {tuple(params[name].shape)}; "
                    "the checkpoint is of a different model shape"
                )
        for name in sorted(copy):
            param = params[name]
            with torch.no_grad():
                if isinstance(param, DTensor):
                    local = param.to_local()
                    _, offsets = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
                    index = tuple(slice(o, o + n) for o, n in zip(offsets, local.shape, strict=True))
                    if local.numel():
                        local.copy_(f.get_slice(name)[index])
                else:
                    param.copy_(f.get_tensor(name))


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file's bytes (read in 16 MiB chunks: base models can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_finetune_meta(folder: str | Path) -> dict[str, Any]:
    """``finetune.yaml`` of a finetuning checkpoint: method, LoRA settings, trainable names, base and prompt style."""
    path = Path(folder) / FINETUNE_FILE
    try:
        meta = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is not a finetuning checkpoint: {FINETUNE_FILE} is missing") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt ({type(e).__name__}); use another checkpoint") from e
    keys = {"method", "trainable", "base"}
    if not isinstance(meta, dict) or not keys <= set(meta) or not {"checkpoint_dir", "sha256"} <= set(meta["base"]):
        raise ValueError(f"{path} is not a litliger finetune record (needs {sorted(keys)}); use another checkpoint")
    return meta


def check_base(meta: dict[str, Any], where: str | Path) -> Path:
    """The base checkpoint folder recorded in ``meta``, verified to be the very file the run trained on."""
    base = Path(meta["base"]["checkpoint_dir"])
    weights = base / MODEL_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"the base checkpoint {base} recorded in {Path(where) / FINETUNE_FILE} is gone ({MODEL_FILE} missing); "
            "restore it at that path"
        )
    digest = sha256_file(weights)
    if digest != meta["base"]["sha256"]:
        raise ValueError(
            f"the base checkpoint {weights} changed since {where} was trained on it (sha256 {digest[:12]}... vs "
            f"recorded {meta['base']['sha256'][:12]}...); use the original base weights"
        )
    return base


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``final`` when the block ends without error.

    An existing ``final`` is replaced only after the new folder is complete; on error the temporary
    folder is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final`` with renames, replacing an existing ``final`` only now."""
    _fsync_tree(tmp)
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_tree(final.parent, files=False)


def _fsync_tree(path: Path, files: bool = True) -> None:
    """Flush the files below ``path`` and the folder entry itself, so a rename publishes complete data."""
    for file in path.rglob("*") if files else ():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model_files(
    folder: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Config,
    save_tokenizer: Callable[[Path], None] | None = None,
) -> None:
    """Write the checkpoint-folder files into ``folder`` (not atomic by itself: use inside ``atomic_dir``)."""
    folder = Path(folder)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "pt", "litliger": "1"})
    config.save(folder / CONFIG_FILE)
    if save_tokenizer is not None:
        save_tokenizer(folder)


def save_checkpoint(
    checkpoint_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Config,
    save_tokenizer: Callable[[Path], None] | None = None,
) -> Path:
    """Atomically write a checkpoint folder holding ``state_dict`` (parameters only) and ``config``."""
    with atomic_dir(checkpoint_dir) as tmp:
        write_model_files(tmp, state_dict, config, save_tokenizer)
    return Path(checkpoint_dir)


def copy_tokenizer_files(source_dir: str | Path, target_dir: str | Path) -> list[str]:
    """Copy tokenizer files that exist in ``source_dir``; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(source_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(target_dir) / name)
            copied.append(name)
    return copied


def parameter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters by name (persistent buffers excluded: litliger models have none to store)."""
    return {name: p for name, p in model.named_parameters()}
