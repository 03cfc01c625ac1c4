"""The litliger checkpoint folder: the one format for trained, converted and shared weights.

    model.safetensors     parameters under litliger names (buffers such as rotary tables are not stored)
    model_config.yaml     the Config
    tokenizer.json        (+ tokenizer_config.json) when the model has a tokenizer

    checksums.json        size and sha256 of every other file, verified before the folder is loaded

A finetuning step folder holds ``trainable.safetensors`` (only what was trained) and ``finetune.yaml`` (the
method, LoRA settings, trainable names, and the base folder with the digest of its tensors) instead of
model.safetensors: the frozen base is never stored twice. litliger/checkpoint/finetuned.py loads it.

Folders are written atomically: everything goes into a hidden temporary sibling that is renamed into
place at the end, so an interrupted write never leaves a folder under the final name. Tensor files are
written deterministically (litliger/checkpoint/tensor_files.py): the same tensors give the same bytes.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from torch import nn

from ..model.config import Config
from .checksums import verify_checksums, write_checksums
from .layout import CONFIG_FILE, FINETUNE_FILE, MODEL_FILE, TOKENIZER_FILES, scratch_path
from .tensor_files import save_tensors, sha256_file, tensor_digest


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


# safetensors' names of the floating-point dtypes a checkpoint may store
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(*paths: Path) -> torch.dtype | None:
    """The one floating-point dtype of every tensor in the safetensors files ``paths``, or None when they mix
    dtypes (then the model's default, fp32, holds each of them without loss)."""
    found = set()
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} is not a litliger checkpoint folder: {path.name} is missing")
        with _open_weights(path) as f:
            found |= {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (not a dict)
    floats = {_FLOAT_DTYPES.get(name) for name in found if name.startswith(("F", "BF"))}
    return floats.pop() if len(floats) == 1 and None not in floats else None


def load_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` on the CPU, after the folder's files are verified."""
    verify_checksums(Path(checkpoint_dir), training_state=False)
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
    base = meta.get("base") if isinstance(meta, dict) else None
    if (
        not isinstance(meta, dict)
        or not keys <= set(meta)
        or not isinstance(base, dict)
        or "checkpoint_dir" not in base
        or not ({"tensors_sha256", "sha256"} & set(base))
    ):
        raise ValueError(f"{path} is not a litliger finetune record (needs {sorted(keys)}); use another checkpoint")
    return meta


def base_identity(weights: str | Path) -> str:
    """What a finetune records of its base: the digest of the base's tensors (names, dtypes, shapes, data), so a
    base folder rewritten with the same tensors and another file header is still the same base."""
    return tensor_digest(weights)


def verified_base_identity(base_dir: str | Path) -> str:
    """The base's files verified against its checksums, then :func:`base_identity` of its weights."""
    verify_checksums(Path(base_dir), training_state=False)
    return base_identity(_weights_path(base_dir))


def check_base(meta: dict[str, Any], where: str | Path) -> Path:
    """The base checkpoint folder recorded in ``meta``, verified to hold the very tensors the run trained on.

    Records of an earlier litliger hold the sha256 of the file instead (``base.sha256``); they are checked
    against the file's bytes."""
    base = Path(meta["base"]["checkpoint_dir"])
    weights = base / MODEL_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"the base checkpoint {base} recorded in {Path(where) / FINETUNE_FILE} is gone ({MODEL_FILE} missing); "
            "restore it at that path"
        )
    recorded = meta["base"].get("tensors_sha256")
    digest = base_identity(weights) if recorded else sha256_file(weights)
    recorded = recorded or meta["base"]["sha256"]
    if digest != recorded:
        raise ValueError(
            f"the base checkpoint {weights} changed since {where} was trained on it (digest {digest[:12]}... vs "
            f"recorded {recorded[:12]}...); use the original base weights"
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
    tmp = scratch_path(final, "tmp")
    tmp.mkdir()
    try:
        with disk_full_is_one_line(final):
            yield tmp
            write_checksums(tmp)
            publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(final: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (``.litliger-tmp.<name>.<hex>``) that becomes ``final`` when the
    block ends without error: ``atomic_dir`` for one file (``convert_to_gguf``'s output).

    The caller creates the file (a plain ``open``: its mode follows the umask). It is flushed to disk, then
    published by a rename that replaces an existing ``final`` when ``overwrite``, else by a hard link that fails
    if ``final`` appeared meanwhile (where the filesystem has no hard links: a rename after a last look). On
    error the temporary file is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch_path(final, "tmp")
    try:
        with disk_full_is_one_line(final):
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, final)
            else:
                _link_new(tmp, final)
            _fsync_tree(final.parent, files=False)
    finally:
        tmp.unlink(missing_ok=True)


def _link_new(tmp: Path, final: Path) -> None:
    """Publish ``tmp`` as ``final`` only if no ``final`` exists, atomically where the filesystem allows it."""
    try:
        os.link(tmp, final)
        return
    except FileExistsError:
        pass
    except OSError:  # no hard links here (some network and FUSE filesystems)
        if not final.exists():
            os.replace(tmp, final)
            return
    raise FileExistsError(
        f"output file {final} appeared while it was written, nothing was replaced; choose a new file, or pass "
        "--overwrite true to replace it"
    )


@contextmanager
def disk_full_is_one_line(target: Path) -> Iterator[None]:
    """A full disk (or quota) while writing ``target`` becomes an ``OSError`` whose message says so in one line;
    the caller removes its temporary folder, so what was there before is all that remains."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OSError(
            f"no space left on the device, in {target.parent}; nothing was lost ({target.name} and everything "
            "written before are as they were): free some space and run again"
        ) from e


def publish_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final`` with renames, replacing an existing ``final`` only now."""
    _fsync_tree(tmp)
    if final.exists():
        old = scratch_path(final, "old")
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
    save_tensors(folder / MODEL_FILE, state_dict, metadata={"format": "pt", "litliger": "1"})
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
