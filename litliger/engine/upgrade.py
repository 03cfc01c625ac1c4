"""``litliger upgrade_checkpoint STEP_DIR``: convert a training checkpoint of an earlier litliger, once, knowingly.

Earlier versions stored the per-rank training state with ``torch.save`` (``training_state/rankNNNNN.pt``)
and the optimizer with torch.distributed.checkpoint (``training_state/optimizer/``); reading either
unpickles, which runs whatever code the file holds. A resume refuses such a folder. A user who trusts
its origin runs this command: it reads the old files (unpickling them, the one place litliger does),
writes the state in today's format (JSON + safetensors, engine/state_codec.py) with checksums, and
replaces the folder atomically. Weights and the other files are kept as they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..checkpoint.checksums import write_checksums
from ..checkpoint.io import disk_full_is_one_line, publish_dir
from ..checkpoint.layout import STATE_DIR, STATE_FILE, scratch_path
from ..checkpoint.safety import RunLock, is_run_dir
from .state_codec import save_state
from .training_state import _rank_stem, is_legacy, read_state


def _read_legacy_optimizer(folder: Path) -> dict[str, Any]:
    """The whole optimizer state (unsharded tensors) from a torch.distributed.checkpoint folder. Unpickles."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(
        state, storage_reader=FileSystemReader(str(folder)), planner=_EmptyStateDictLoadPlanner(), no_dist=True
    )
    return state["optimizer"]


def upgrade_checkpoint(checkpoint_dir: Path) -> Path:
    """Convert a training checkpoint written by an earlier litliger (pickled training state) to today's format.

    Run it only on a checkpoint whose origin you trust: reading the old files runs any code they hold.

    Args:
        checkpoint_dir: a step-XXXXXXXX/ or final/ folder whose training_state/ holds rank00000.pt.
    """
    import torch

    path = Path(checkpoint_dir)
    if not is_legacy(path):
        raise ValueError(
            f"{path} holds no training state of an earlier litliger ({STATE_DIR}/rank00000.pt), in upgrade_checkpoint; "
            "nothing to convert"
        )
    state = read_state(path)
    lock = RunLock(path.parent) if is_run_dir(path.parent) else None
    if lock is not None:
        lock.acquire()  # no run may write into the out_dir meanwhile
    tmp = scratch_path(path, "tmp")
    try:
        with disk_full_is_one_line(path):
            shutil.copytree(path, tmp, ignore=shutil.ignore_patterns("rank*.pt", "optimizer", "checksums.json"))
            optimizer = _read_legacy_optimizer(path / STATE_DIR / "optimizer")
            for rank in range(state["world_size"]):
                old = torch.load(path / STATE_DIR / f"{_rank_stem(rank)}.pt", weights_only=False)
                rank_state = {"optimizer": optimizer, "dataloader": old["dataloader"], "rng": old["rng"]}
                save_state(tmp / STATE_DIR / _rank_stem(rank), rank_state)
            (tmp / STATE_DIR / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
            write_checksums(tmp)
            publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()
    print(f"upgraded {path}: training state stored as JSON + safetensors, every file recorded in checksums.json")
    return path
