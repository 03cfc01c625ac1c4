"""Training checkpoints: a litliger checkpoint folder plus the full training state, written atomically.

    out_dir/step-00000100/            (and out_dir/final/)
        model.safetensors, model_config.yaml, tokenizer.json ...   the checkpoint folder (litliger/checkpoint.py)
        training_state/
            state.json                 step, tokens, world size, what the state belongs to
            optimizer/                 torch.distributed.checkpoint files (sharded under FSDP)
            rank00000.pt ...           per rank: dataloader state and every RNG

Everything is written into a hidden temporary folder that rank 0 renames into place once all ranks have
finished, so ``--resume auto`` never sees a partial checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..checkpoint import MODEL_FILE, publish_dir, read_config, write_model_files
from ..config import Config
from .runtime import is_fsdp, unwrap

STATE_DIR = "training_state"
STATE_FILE = "state.json"
STEP_PATTERN = re.compile(r"^step-(\d{8})$")


def step_dir(out_dir: Path, step: int) -> Path:
    return out_dir / f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / MODEL_FILE).is_file() and (path / STATE_DIR / STATE_FILE).is_file()


def find_resume_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete training checkpoint in ``out_dir`` (by step), or None."""
    candidates = []
    for path in out_dir.iterdir() if out_dir.is_dir() else ():
        if (STEP_PATTERN.match(path.name) or path.name == "final") and is_complete(path):
            candidates.append((read_state(path)["step"], path.name != "final", path))
    return max(candidates)[2] if candidates else None


def has_checkpoints(out_dir: Path) -> bool:
    return out_dir.is_dir() and any(STEP_PATTERN.match(p.name) or p.name == "final" for p in out_dir.iterdir())


def read_state(path: Path) -> dict[str, Any]:
    file = path / STATE_DIR / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} is not a training checkpoint: {STATE_DIR}/{STATE_FILE} is missing "
            "(to start from a model checkpoint without its training state, use --initial_checkpoint_dir)"
        )
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is corrupt ({e}); resume from another checkpoint") from e


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
    missing = [f"rank{r:05d}.pt" for r in range(world_size) if not (path / STATE_DIR / f"rank{r:05d}.pt").is_file()]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: {STATE_DIR}/{missing[0]} is missing")
    return state


def _no_dist() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


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


def _full_model_state(fabric: L.Fabric, model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters gathered in full on rank 0 (empty on other FSDP ranks)."""
    module = unwrap(model)
    if is_fsdp(fabric):
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return dict(module.named_parameters())


def save_training_checkpoint(
    fabric: L.Fabric,
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    state: dict[str, Any],
    loader_state: dict[str, Any] | None,
    save_tokenizer: Callable[[Path], None] | None,
) -> Path:
    """Atomically write ``path`` (a checkpoint folder + training state). Collective: call on every rank."""
    tmp = path.parent / f".{path.name}.tmp"
    if fabric.global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / STATE_DIR).mkdir(parents=True)
    fabric.barrier()
    module = unwrap(model)
    optim_state = get_optimizer_state_dict(module, optimizer)
    dcp.save({"optimizer": optim_state}, checkpoint_id=str(tmp / STATE_DIR / "optimizer"), no_dist=_no_dist())
    torch.save(
        {"dataloader": loader_state, "rng": _rng_state()}, tmp / STATE_DIR / f"rank{fabric.global_rank:05d}.pt"
    )
    weights = _full_model_state(fabric, model)
    if fabric.global_rank == 0:
        write_model_files(tmp, weights, config, save_tokenizer)
        (tmp / STATE_DIR / STATE_FILE).write_text(json.dumps({**state, "world_size": fabric.world_size}, indent=2))
    fabric.barrier()
    if fabric.global_rank == 0:
        publish_dir(tmp, path)
    fabric.barrier()
    return path


def load_training_state(
    fabric: L.Fabric, path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore the optimizer and this rank's RNG; returns ``{"state": ..., "dataloader": ...}``."""
    module = unwrap(model)
    optim_state = get_optimizer_state_dict(module, optimizer)
    try:
        dcp.load({"optimizer": optim_state}, checkpoint_id=str(path / STATE_DIR / "optimizer"), no_dist=_no_dist())
    except Exception as e:  # DCP reports missing or mismatched files with several exception types
        raise ValueError(f"cannot read the optimizer state of {path} ({e}); the checkpoint is corrupt") from e
    set_optimizer_state_dict(module, optimizer, optim_state)
    rank_state = torch.load(path / STATE_DIR / f"rank{fabric.global_rank:05d}.pt", weights_only=False)
    _set_rng_state(rank_state["rng"])
    return {"state": read_state(path), "dataloader": rank_state["dataloader"]}
