"""Training checkpoints: a litliger checkpoint folder plus the full training state, written atomically.

    out_dir/step-00000100/            (and out_dir/final/)
        model.safetensors, model_config.yaml, tokenizer.json ...   the checkpoint folder (litliger/checkpoint/io.py)
        checksums.json                 size and sha256 of every other file (litliger/checkpoint/checksums.py)
        training_state/
            state.json                 step, tokens, world size, what the state belongs to
            rank00000.json ...         per rank: optimizer state, dataloader position and every RNG state,
            rank00000.safetensors ...  as JSON + tensors (engine/state_codec.py): data, never pickle

A checkpoint is something people share, so reading one never runs code: nothing in it is unpickled, and
every file is verified against checksums.json before a resume uses it. Everything is written into a hidden
temporary folder (``.litliger-tmp.<name>``) that rank 0 renames into place once all ranks have finished,
so ``--resume auto`` never sees a partial checkpoint. On several nodes the folder must be on one
filesystem that all of them see (NFS, Lustre, a cloud file store), which may show one node's files to the
others with some delay: every rank reports the files it wrote (names, sizes and sha256) and rank 0
publishes only once it sees all of them, complete; the checkpoint to resume from is chosen by rank 0 alone
and sent to the others, so a stale directory listing on one node cannot make the ranks disagree. A folder
is complete when checksums.json lists files that are all there at their recorded sizes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..checkpoint.checksums import file_entry, incomplete_files, verify_checksums, write_checksums
from ..checkpoint.io import disk_full_is_one_line, publish_dir, read_config
from ..checkpoint.layout import CHECKSUMS_FILE, FINAL_DIR, STATE_DIR, STATE_FILE, STEP_DIR_PATTERN, scratch_path
from ..model.config import Config
from ..model.parallelize import unwrap
from .runtime import is_fsdp
from .state_codec import load_state, save_state

# (folder, tensors, final) -> the names of the files written: the recipe decides what a checkpoint holds
WriteFiles = Callable[[Path, dict[str, torch.Tensor], bool], list[str]]
T = TypeVar("T")

UPGRADE_HINT = (
    "it was written by an earlier litliger, whose pickled training state can run code when it is loaded; if you "
    "trust where it comes from, convert it once with `litliger upgrade_checkpoint {path}` and resume from it"
)


def _rank_stem(rank: int) -> str:
    return f"rank{rank:05d}"


def is_legacy(path: Path) -> bool:
    """A training checkpoint of an earlier litliger: pickled rank files (rank00000.pt) and no checksums."""
    return (path / STATE_DIR / f"{_rank_stem(0)}.pt").is_file()


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds its training state and every file its checksums list, at the recorded size."""
    if not (path / STATE_DIR / STATE_FILE).is_file():
        return False
    try:
        missing = incomplete_files(path)
    except ValueError:
        return False
    return missing == []


def _checkpoint_folders(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    marked = (p for p in out_dir.iterdir() if STEP_DIR_PATTERN.match(p.name) or p.name == FINAL_DIR)
    return sorted(p for p in marked if p.is_dir() and not p.is_symlink())


def find_resume_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete training checkpoint in ``out_dir`` (by step), or None when it holds none at all.

    A checkpoint folder that is not complete is never skipped silently: resuming from an older one (or
    starting over) would throw away what the user may still want, so it is an error that names them.
    """
    folders = _checkpoint_folders(out_dir)
    legacy = [p for p in folders if is_legacy(p)]
    if legacy:
        raise ValueError(f"checkpoint {legacy[-1]} cannot be resumed, in --resume auto: " + _upgrade_hint(legacy[-1]))
    broken = [f"{p.name} ({_why_incomplete(p)})" for p in folders if not is_complete(p)]
    if broken:
        raise ValueError(
            f"out_dir {out_dir} holds checkpoint folders that cannot be resumed from: {', '.join(broken)}, "
            "in --resume auto; move them away or pass --resume PATH to pick a checkpoint explicitly"
        )
    candidates = [(read_state(p)["step"], p.name != FINAL_DIR, p) for p in folders]
    return max(candidates)[2] if candidates else None


def _why_incomplete(path: Path) -> str:
    """What :func:`is_complete` found wrong with ``path``, naming the file: missing, or corrupt (another size)."""
    state = f"{STATE_DIR}/{STATE_FILE}"
    if not (path / state).is_file():
        return f"{state} is missing"
    try:
        wrong = incomplete_files(path) or []
    except ValueError:
        return f"{CHECKSUMS_FILE} is corrupt"
    missing = [name for name in wrong if not (path / name).is_file()]
    if missing:
        return f"{missing[0]} is missing" + (f", and {len(wrong) - 1} more files" if len(wrong) > 1 else "")
    return f"{wrong[0]} is corrupt: not the size it was written with" + (
        f", and {len(wrong) - 1} more files" if len(wrong) > 1 else ""
    )


def _upgrade_hint(path: Path) -> str:
    return UPGRADE_HINT.format(path=path)


def has_checkpoints(out_dir: Path) -> bool:
    return bool(_checkpoint_folders(out_dir))


def resolve_resume(resume: bool | str | Path | None, out_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (which must not overwrite checkpoints).

    The chosen checkpoint's files are verified against its checksums here, before anything is read."""
    if resume is False or resume is None:
        if has_checkpoints(out_dir):
            raise ValueError(
                f"out_dir {out_dir} already holds checkpoints; pass --resume auto to continue that run, "
                "or choose another --out_dir (nothing was overwritten)"
            )
        return None
    if resume is True or resume == "auto":
        path = find_resume_checkpoint(out_dir)
    else:
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(
                f"--resume {path}: no such checkpoint folder; name a step-XXXXXXXX/ or final/ folder of a run, "
                "or pass --resume auto"
            )
        read_state(path)  # names state.json when it is missing or corrupt
        if is_legacy(path):
            raise ValueError(f"--resume {path} cannot be resumed: " + _upgrade_hint(path))
        verify_checksums(path, training_state=True)  # names a missing, truncated or changed file
        if not is_complete(path):
            raise ValueError(f"--resume {path} is not a complete training checkpoint (files are missing); pick another")
        return path
    if path is not None:
        verify_checksums(path, training_state=True)
    return path


def on_rank_zero(fabric: L.Fabric, work: Callable[[], T]) -> T:
    """``work()`` on rank 0 alone; its result (a picklable value made by this code) or its error on every rank."""
    if fabric.world_size == 1:
        return work()
    answer: tuple[Any, str | None] = (None, None)
    if fabric.global_rank == 0:
        try:
            answer = (work(), None)
        except (ValueError, OSError) as e:
            answer = (None, f"{type(e).__name__}\0{e}")
    result, error = fabric.broadcast(answer, src=0)
    if error is not None:
        kind, message = error.split("\0", 1)
        raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(message)
    return result


def resolve_resume_on_all_ranks(fabric: L.Fabric, resume: bool | str | Path | None, out_dir: Path) -> Path | None:
    """:func:`resolve_resume` on rank 0, its answer (or its error) on every rank."""
    path = on_rank_zero(fabric, lambda: resolve_resume(resume, out_dir))
    return Path(path) if path is not None else None


def finished_run(fabric: L.Fabric, out_dir: Path, resume_dir: Path | None, total_steps: int) -> Path | None:
    """The ``final/`` of a finished run that is at or beyond ``total_steps`` (out_dir's own, or the final/ being
    resumed), after saying so in one line; None when there is something to train. Collective.

    Both recipes ask this before they train: a finished run run again (also with a smaller max_steps, or resumed
    from a step folder at or before final's step) trains, validates and writes nothing, so final/ stays as it is.
    """

    def check() -> tuple[str, int] | None:
        for folder in (out_dir / FINAL_DIR, resume_dir):
            if folder is not None and folder.name == FINAL_DIR and is_complete(folder):
                step = read_state(folder)["step"]
                if step >= total_steps:
                    return str(folder), step
        return None

    found = on_rank_zero(fabric, check)
    if found is None:
        return None
    folder, step = Path(found[0]), found[1]
    asks = "" if step == total_steps else f"; this run asks for {total_steps} steps"
    fabric.print(
        f"{folder.parent} is finished ({folder.name}/ at step {step}{asks}); nothing to train. "
        "Raise --train.max_steps to continue, or use another --out_dir"
    )
    return folder


def prune_step_checkpoints(out_dir: Path, keep_last: int, keep: set[Path] = frozenset()) -> list[str]:
    """Delete all but the newest ``keep_last`` complete step checkpoints (never ``final/`` and never a
    folder in ``keep``, such as the one this run resumed from); returns the names deleted.

    Each is first renamed to its hidden ``.litliger-pruned.<name>`` name, so a kill during the deletion leaves
    nothing that looks like a checkpoint (the next run sweeps the rest away).
    """
    steps = [p for p in _checkpoint_folders(out_dir) if p.name != FINAL_DIR and is_complete(p)]
    steps.sort(key=lambda p: read_state(p)["step"])
    protected = {p.resolve() for p in keep}
    removed = []
    for path in steps[: max(0, len(steps) - keep_last)]:
        if path.resolve() in protected:
            continue
        doomed = scratch_path(path, "pruned", unique=False)
        path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path.name)
    return removed


def read_state(path: Path) -> dict[str, Any]:
    file = path / STATE_DIR / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} is not a training checkpoint: {STATE_DIR}/{STATE_FILE} is missing "
            "(to start from a model checkpoint without its training state, use --initial_checkpoint_dir)"
        )
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is corrupt ({e}); resume from another checkpoint") from e
    if not isinstance(state, dict) or not {"step", "tokens", "world_size"} <= set(state):
        raise ValueError(
            f"{file} is not a litliger training state (step, tokens, world_size); resume from another checkpoint"
        )
    return state


def check_resumable(path: Path, config: Config, world_size: int) -> dict[str, Any]:
    """Validate a checkpoint against this run before anything is loaded; returns its state."""
    state = read_state(path)
    saved = read_config(path)
    if saved != config:
        diff = sorted(k for k, v in config.to_dict().items() if saved.to_dict().get(k) != v)
        raise ValueError(f"checkpoint {path} is of a different model (fields {diff} differ); resume with its config")
    if state["world_size"] != world_size:
        raise ValueError(
            f"checkpoint {path} was written by {state['world_size']} processes but this run has {world_size}; "
            f"resume with --devices/--num_nodes giving {state['world_size']} processes"
        )
    names = [f"{_rank_stem(r)}{ext}" for r in range(world_size) for ext in (".json", ".safetensors")]
    missing = [n for n in names if not (path / STATE_DIR / n).is_file()]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: {STATE_DIR}/{missing[0]} is missing")
    return state


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gathered_parameters(fabric: L.Fabric, model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The parameters in full on rank 0 (empty on other FSDP ranks); only those with requires_grad when
    ``trainable_only`` (a finetuning step checkpoint never gathers the frozen base)."""
    module = unwrap(model)
    if is_fsdp(fabric):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(module, options=options)
    return {n: p for n, p in module.named_parameters() if p.requires_grad or not trainable_only}


def save_training_checkpoint(
    fabric: L.Fabric,
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    loader_state: dict[str, Any] | None,
    write_files: WriteFiles,
    trainable_only: bool = False,
) -> Path:
    """Atomically write ``path`` (the recipe's files + training state). Collective: call on every rank.

    ``write_files(folder, tensors, final)`` runs on rank 0 with the gathered parameters (all of them, or
    only the trainable ones when ``trainable_only`` and this is not ``final``). A full disk removes the
    partial folder and raises one ``OSError`` line; the checkpoints written before stay as they were.
    """
    final = path.name == FINAL_DIR
    tmp = scratch_path(path, "tmp", unique=False)  # every rank computes the same name
    try:
        with disk_full_is_one_line(path):
            if fabric.global_rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / STATE_DIR).mkdir(parents=True)
            fabric.barrier()
            (tmp / STATE_DIR).mkdir(parents=True, exist_ok=True)  # a node whose view of the folder lags creates it
            module = unwrap(model)
            rank_state = {
                "optimizer": get_optimizer_state_dict(module, optimizer),
                "dataloader": loader_state,
                "rng": _rng_state(),
            }
            written = save_state(tmp / STATE_DIR / _rank_stem(fabric.global_rank), rank_state)
            report = {p.relative_to(tmp).as_posix(): file_entry(p) for p in written}
            weights = _gathered_parameters(fabric, model, trainable_only and not final)
            if fabric.global_rank == 0:
                files = write_files(tmp, weights, final)
                record = {**state, "world_size": fabric.world_size, "files": files}
                (tmp / STATE_DIR / STATE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
            reports = _gather_objects(fabric, report)
            if fabric.global_rank == 0:
                _wait_until_visible(tmp, reports)
                write_checksums(tmp, known={k: v for r in reports for k, v in r.items()})
                publish_dir(tmp, path)
    except BaseException:
        if fabric.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    fabric.barrier()
    return path


def _gather_objects(fabric: L.Fabric, obj: Any) -> list[Any]:
    if fabric.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _wait_until_visible(folder: Path, reports: list[dict[str, dict]]) -> None:
    """Wait (up to ``LITLIGER_FS_WAIT`` seconds, default 300) until every file the ranks reported is
    visible in ``folder`` at its full size; a shared filesystem may show other nodes' writes late."""
    deadline = time.monotonic() + float(os.environ.get("LITLIGER_FS_WAIT", "300"))
    while True:
        missing = [
            name
            for report in reports
            for name, entry in report.items()
            if not ((folder / name).is_file() and (folder / name).stat().st_size == entry["size"])
        ]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise OSError(
                f"{len(missing)} files written by other ranks did not appear in {folder} (e.g. {missing[0]}); "
                "out_dir must be on a filesystem that every node sees (set LITLIGER_FS_WAIT to wait longer)"
            )
        time.sleep(0.5)


def _restore_tensors(template: Any, saved: Any, where: str) -> None:
    """Copy the tensors of ``saved`` into the matching tensors of ``template`` (the optimizer's own state, of
    the same structure); a DTensor takes its local shard, from a stored shard or from the full tensor."""
    if isinstance(template, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            raise ValueError(f"{where} is not a tensor")
        target = template.to_local() if hasattr(template, "to_local") else template
        if tuple(saved.shape) != tuple(target.shape) and tuple(saved.shape) == tuple(template.shape):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            shape, offset = compute_local_shape_and_global_offset(
                template.shape, template.device_mesh, template.placements
            )
            saved = saved[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
        if tuple(saved.shape) != tuple(target.shape) or saved.dtype != target.dtype:
            raise ValueError(
                f"{where} is {tuple(saved.shape)} {saved.dtype}, the optimizer holds {tuple(target.shape)} "
                f"{target.dtype}"
            )
        with torch.no_grad():
            target.copy_(saved)
        return
    if isinstance(template, dict):
        if not isinstance(saved, dict) or set(saved) != set(template):
            raise ValueError(f"{where} holds other entries than this optimizer's")
        for key, value in template.items():
            _restore_tensors(value, saved[key], f"{where}.{key}")


def load_training_state(
    fabric: L.Fabric, path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore the optimizer and this rank's RNG; returns ``{"state": ..., "dataloader": ...}``.

    Nothing is unpickled: the rank's JSON + safetensors pair is decoded as data (engine/state_codec.py)."""
    stem = path / STATE_DIR / _rank_stem(fabric.global_rank)
    saved = load_state(stem)
    module = unwrap(model)
    optim_state = get_optimizer_state_dict(module, optimizer)
    try:
        if not isinstance(saved, dict) or not {"optimizer", "dataloader", "rng"} <= set(saved):
            raise ValueError("entries are missing")
        _restore_tensors(optim_state["state"], saved["optimizer"]["state"], "optimizer.state")
        groups = saved["optimizer"]["param_groups"]
        if [g["params"] for g in groups] != [g["params"] for g in optim_state["param_groups"]]:
            raise ValueError("its parameter groups name other parameters")
        optim_state["param_groups"] = groups
        set_optimizer_state_dict(module, optimizer, optim_state)
        _set_rng_state(saved["rng"])
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(
            f"{stem}.json does not fit this run ({e}); the checkpoint is corrupt or of another optimizer, "
            "resume from another checkpoint"
        ) from e
    return {"state": read_state(path), "dataloader": saved["dataloader"]}
