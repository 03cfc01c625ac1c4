"""The checkpoint folder's layout: every folder and file name litliger writes, in one place.

    model.safetensors      MODEL_FILE       parameters under litliger names
    model_config.yaml      CONFIG_FILE      the Config
    tokenizer.json ...     TOKENIZER_FILES  the tokenizer, its settings, generation ids, chat template
    checksums.json         CHECKSUMS_FILE   size and sha256 of every other file (checkpoint/checksums.py)
    trainable.safetensors  TRAINABLE_FILE   a finetuning step: only the tensors that were trained
    finetune.yaml          FINETUNE_FILE    ... and what they sit on: method, LoRA settings, base folder + digest
    run.yaml               RUN_FILE         a training run's data module and validation settings (litliger evaluate)
    training_state/        TRAINING_STATE_DIR (= STATE_DIR)   state.json + per-rank JSON + safetensors

A training run's out_dir holds ``step-XXXXXXXX/`` (``step_dir``), ``final/`` (``FINAL_DIR``), the run lock
(``LOCK_FILE``) and, while a save is in progress, hidden scratch siblings (``scratch_path``).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model_config.yaml"
TRAINABLE_FILE = "trainable.safetensors"  # a finetuning checkpoint: only the tensors that were trained
FINETUNE_FILE = "finetune.yaml"  # ... and what they sit on: method, LoRA settings, base folder + digest
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")
CHECKSUMS_FILE = "checksums.json"
RUN_FILE = "run.yaml"  # data only: the run's data module (class path + init args) and validation settings

LOCK_FILE = ".litliger-lock"
# What marks a folder as a training run's out_dir (engine/training_state.py writes these), or as one of its
# checkpoints: such a folder is never replaced, whatever --overwrite says.
STEP_DIR_PATTERN = re.compile(r"^step-\d{8}$")
FINAL_DIR = "final"
TRAINING_STATE_DIR = "training_state"

# The hidden siblings a save creates next to the folder it publishes: ``.litliger-tmp.<name>[.<hex8>]`` while
# it is written, ``.litliger-old.<name>.<hex8>`` for the folder it replaces, ``.litliger-pruned.<name>`` for
# a step checkpoint being deleted. A user's own hidden folders never match these names.
_SCRATCH_KINDS = ("tmp", "old", "pruned")
_LEFTOVER = re.compile(r"^\.litliger-(tmp|old|pruned)\.(step-\d{8}|final)(\.[0-9a-f]{8})?$")


def scratch_path(final: Path, kind: str, unique: bool = True) -> Path:
    """The hidden sibling of ``final`` for a save in progress (``kind`` tmp, old or pruned). ``unique`` adds a
    random suffix; without it every rank of a run computes the same name."""
    if kind not in _SCRATCH_KINDS:
        raise ValueError(f"scratch kind {kind!r}; one of {_SCRATCH_KINDS}")
    suffix = f".{uuid.uuid4().hex[:8]}" if unique else ""
    return final.parent / f".litliger-{kind}.{final.name}{suffix}"


STATE_DIR = TRAINING_STATE_DIR
STATE_FILE = "state.json"


def step_dir(out_dir: Path, step: int) -> Path:
    """The folder of the checkpoint after ``step`` optimizer steps."""
    return out_dir / f"step-{step:08d}"


def is_leftover(name: str) -> tuple[str, str] | None:
    """(kind, checkpoint name) when ``name`` is a scratch sibling a save of a step or final checkpoint made."""
    match = _LEFTOVER.match(name)
    return (match.group(1), match.group(2)) if match else None


def run_name(checkpoint_dir: Path) -> str:
    """A checkpoint's name for clients: its folder, or its run's folder for step-XXXXXXXX/ and final/."""
    path = checkpoint_dir.resolve()
    if path.name == "final" or path.name.startswith("step-"):
        return f"{path.parent.name}/{path.name}"
    return path.name
