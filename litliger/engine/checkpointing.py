"""Training checkpoints: a litliger checkpoint folder plus the full training state, written atomically.

    out_dir/step-00000100/            (and out_dir/final/)
        model.safetensors, model_config.yaml, tokenizer.json ...   the checkpoint folder (litliger/checkpoint.py)
        training_state/
            state.json                 step, tokens, world size, what the state belongs to
            optimizer/                 torch.distributed.checkpoint files (sharded under FSDP)
            rank00000.pt ...           per rank: dataloader state and every RNG

Everything is written into a hidden temporary folder that rank 0 renames into place once all ranks have
finished, so ``--resume auto`` never sees a partial checkpoint. On several nodes the folder must be on one
filesystem that all of them see (NFS, Lustre, a cloud file store), which may show one node's files to the
others with some delay: every rank reports the files it wrote (names and sizes) and rank 0 publishes only
once it sees all of them, complete; the checkpoint to resume from is chosen by rank 0 alone and sent to the
others, so a stale directory listing on one node cannot make the ranks disagree. ``state.json`` lists the files the
checkpoint consists of (model.safetensors for pretraining, trainable.safetensors for finetuning), and a
folder is complete only when all of them are there.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..checkpoint import MODEL_FILE, publish_dir, read_config
from ..config import Config
from ..output_safety import FINAL_DIR, STEP_DIR_PATTERN, TRAINING_STATE_DIR
from .runtime import is_fsdp, unwrap

# (folder, tensors, final) -> the names of the files written: the recipe decides what a checkpoint holds
WriteFiles = Callable[[Path, dict[str, torch.Tensor], bool], list[str]]

STATE_DIR = TRAINING_STATE_DIR
STATE_FILE = "state.json"


def step_dir(out_dir: Path, step: int) -> Path:
    return out_dir / f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds its training state and every file that state lists."""
    if not (path / STATE_DIR / STATE_FILE).is_file():
        return False
    try:
        files = read_state(path).get("files", [MODEL_FILE])
    except ValueError:
        return False
    return all((path / name).is_file() for name in files)


def _checkpoint_folders(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    marked = (p for p in out_dir.iterdir() if STEP_DIR_PATTERN.match(p.name) or p.name == FINAL_DIR)
    return sorted(p for p in marked if p.is_dir())


def find_resume_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete training checkpoint in ``out_dir`` (by step), or None when it holds none at all.

    A checkpoint folder that is not complete is never skipped silently: resuming from an older one (or
    starting over) would throw away what the user may still want, so it is an error that names them.
    """
    folders = _checkpoint_folders(out_dir)
    broken = [p.name for p in folders if not is_complete(p)]
    if broken:
        raise ValueError(
            f"out_dir {out_dir} holds checkpoint folders that cannot be resumed from: {', '.join(broken)} "
            f"(model or training state files are missing), in --resume auto; move them away or pass "
            "--resume PATH to pick a checkpoint explicitly"
        )
    candidates = [(read_state(p)["step"], p.name != "final", p) for p in folders]
    return max(candidates)[2] if candidates else None


def has_checkpoints(out_dir: Path) -> bool:
    return bool(_checkpoint_folders(out_dir))


def resolve_resume(resume: bool | str | Path | None, out_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (which must not overwrite checkpoints)."""
    if resume is False or resume is None:
        if has_checkpoints(out_dir):
            raise ValueError(
                f"out_dir {out_dir} already holds checkpoints; pass --resume auto to continue that run, "
                "or choose another --out_dir (nothing was overwritten)"
            )
        return None
    if resume is True or resume == "auto":
        return find_resume_checkpoint(out_dir)
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint folder")
    read_state(path)  # names state.json when it is missing or corrupt
    if not is_complete(path):
        raise ValueError(f"--resume {path} is not a complete training checkpoint (files are missing); pick another")
    return path


def resolve_resume_on_all_ranks(fabric: L.Fabric, resume: bool | str | Path | None, out_dir: Path) -> Path | None:
    """:func:`resolve_resume` on rank 0, its answer (or its error) on every rank."""
    if fabric.world_size == 1:
        return resolve_resume(resume, out_dir)
    answer: tuple[str | None, str | None] = (None, None)
    if fabric.global_rank == 0:
        try:
            path = resolve_resume(resume, out_dir)
            answer = (str(path) if path is not None else None, None)
        except (ValueError, OSError) as e:
            answer = (None, f"{type(e).__name__}\0{e}")
    path, error = fabric.broadcast(answer, src=0)
    if error is not None:
        kind, message = error.split("\0", 1)
        raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(message)
    return Path(path) if path is not None else None


def prune_step_checkpoints(out_dir: Path, keep_last: int, keep: set[Path] = frozenset()) -> list[str]:
    """Delete all but the newest ``keep_last`` complete step checkpoints (never ``final/`` and never a
    folder in ``keep``, such as the one this run resumed from); returns the names deleted.

    Each is first renamed to a hidden ``.X.tmp-pruned`` name, so a kill during the deletion leaves nothing
    that looks like a checkpoint (the next run sweeps the rest away).
    """
    steps = [p for p in _checkpoint_folders(out_dir) if p.name != FINAL_DIR and is_complete(p)]
    steps.sort(key=lambda p: read_state(p)["step"])
    protected = {p.resolve() for p in keep}
    removed = []
    for path in steps[: max(0, len(steps) - keep_last)]:
        if path.resolve() in protected:
            continue
        doomed = path.parent / f".{path.name}.tmp-pruned"
        path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path.name)
    return removed


def sweep_temporary(out_dir: Path) -> list[str]:
    """Remove what an interrupted save left in ``out_dir`` (hidden ``.X.tmp*`` folders); returns their names.

    A kill between the two renames of a replacing publish leaves ``.X.old-*`` without ``X``: that folder is
    the only copy of ``X`` and is renamed back, never deleted. Call only while holding the run lock.
    """
    removed = []
    for path in sorted(out_dir.iterdir()) if out_dir.is_dir() else ():
        name = path.name
        if not (path.is_dir() and name.startswith(".")):
            continue
        if ".old-" in name:
            original = out_dir / name[1 : name.index(".old-")]
            if original.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.rename(original)
            removed.append(name)
        elif name.endswith(".tmp") or ".tmp-" in name:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def read_state(path: Path) -> dict[str, Any]:
    file = path / STATE_DIR / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} is not a training checkpoint: {STATE_DIR}/{STATE_FILE} is missing "
            "(to start from a model checkpoint without its training state, use --initial_checkpoint_dir)"
        )
    try:
        state = json.loads(file.read_text())
    except json.JSONDecodeError as e:
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
    missing = [_rank_file(r) for r in range(world_size) if not (path / STATE_DIR / _rank_file(r)).is_file()]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: {STATE_DIR}/{missing[0]} is missing")
    return state


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def _no_dist() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns on every single-process save and load that it assumes a single process: that is the intent
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


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
    only the trainable ones when ``trainable_only`` and this is not ``final``).
    """
    final = path.name == "final"
    tmp = path.parent / f".{path.name}.tmp"
    if fabric.global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / STATE_DIR).mkdir(parents=True)
    fabric.barrier()
    (tmp / STATE_DIR).mkdir(parents=True, exist_ok=True)  # a node whose view of the folder lags creates it too
    module = unwrap(model)
    optim_state = get_optimizer_state_dict(module, optimizer)
    with _quiet_single_process():
        dcp.save({"optimizer": optim_state}, checkpoint_id=str(tmp / STATE_DIR / "optimizer"), no_dist=_no_dist())
    rank_file = tmp / STATE_DIR / _rank_file(fabric.global_rank)
    torch.save({"dataloader": loader_state, "rng": _rng_state()}, rank_file)
    written = _files_of_rank(tmp, fabric.global_rank)
    weights = _gathered_parameters(fabric, model, trainable_only and not final)
    if fabric.global_rank == 0:
        files = write_files(tmp, weights, final)
        record = {**state, "world_size": fabric.world_size, "files": files}
        (tmp / STATE_DIR / STATE_FILE).write_text(json.dumps(record, indent=2))
    reports = _gather_objects(fabric, written)
    if fabric.global_rank == 0:
        _wait_until_visible(tmp, reports)
        publish_dir(tmp, path)
    fabric.barrier()
    return path


def _files_of_rank(folder: Path, rank: int) -> dict[str, int]:
    """The training-state files ``rank`` wrote into ``folder`` (relative name -> size), flushed to disk."""
    state = folder / STATE_DIR
    own = [state / _rank_file(rank), *sorted((state / "optimizer").glob(f"__{rank}_*"))]
    if rank == 0:
        own += [p for p in (state / "optimizer").glob(".metadata")]
    report = {}
    for file in own:
        with open(file, "rb") as f:
            os.fsync(f.fileno())
        report[str(file.relative_to(folder))] = file.stat().st_size
    return report


def _gather_objects(fabric: L.Fabric, obj: Any) -> list[Any]:
    if fabric.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _wait_until_visible(folder: Path, reports: list[dict[str, int]]) -> None:
    """Wait (up to ``LITLIGER_FS_WAIT`` seconds, default 300) until every file the ranks reported is
    visible in ``folder`` at its full size; a shared filesystem may show other nodes' writes late."""
    deadline = time.monotonic() + float(os.environ.get("LITLIGER_FS_WAIT", "300"))
    while True:
        missing = [
            name
            for report in reports
            for name, size in report.items()
            if not ((folder / name).is_file() and (folder / name).stat().st_size == size)
        ]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise OSError(
                f"{len(missing)} files written by other ranks did not appear in {folder} (e.g. {missing[0]}); "
                "out_dir must be on a filesystem that every node sees (set LITLIGER_FS_WAIT to wait longer)"
            )
        time.sleep(0.5)


def load_training_state(
    fabric: L.Fabric, path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore the optimizer and this rank's RNG; returns ``{"state": ..., "dataloader": ...}``."""
    module = unwrap(model)
    optim_state = get_optimizer_state_dict(module, optimizer)
    try:
        with _quiet_single_process():
            dcp.load({"optimizer": optim_state}, checkpoint_id=str(path / STATE_DIR / "optimizer"), no_dist=_no_dist())
    except (Exception, CheckpointException) as e:  # CheckpointException (a BaseException) wraps bad files
        raise ValueError(f"cannot read the optimizer state of {path} ({e}); the checkpoint is corrupt") from e
    set_optimizer_state_dict(module, optimizer, optim_state)
    rank_file = path / STATE_DIR / _rank_file(fabric.global_rank)
    try:
        rank_state = torch.load(rank_file, weights_only=False)
    except Exception as e:  # pickle, zip and EOF errors of a truncated or foreign file
        raise ValueError(f"{rank_file} is corrupt ({type(e).__name__}: {e}); resume from another checkpoint") from e
    _set_rng_state(rank_state["rng"])
    return {"state": read_state(path), "dataloader": rank_state["dataloader"]}
