"""Training state as data: nested Python values <-> JSON + a safetensors file, never pickle.

A resumed checkpoint may come from someone else; reading it must not be able to run code. The per-rank
training state (optimizer state, dataloader position, RNG states) is therefore stored as

    rankNNNNN.json           the structure: dicts, lists, tuples, numbers, strings, None; tensors by reference
    rankNNNNN.safetensors    the tensors it refers to

``encode`` accepts only those types (plus numpy arrays and scalars, which RNG states hold) and names the
path of anything else; ``decode`` rebuilds exactly the same structure (tuples stay tuples, non-string dict
keys keep their type). A DTensor (an FSDP2 shard) is stored as its local shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ..checkpoint.tensor_files import save_tensors

FORMAT = "litliger-training-state/1"
_TAGS = ("__tuple__", "__dict__", "__tensor__", "__ndarray__")


def encode(value: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """A JSON-ready form of ``value``; its tensors are added to ``tensors`` under generated names."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, torch.Tensor):
        if hasattr(value, "to_local"):  # DTensor: this rank's shard
            value = value.to_local()
        name = f"t{len(tensors):06d}"
        tensors[name] = value.detach().to("cpu").contiguous()
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, (list, tuple)):
        items = [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {
            "__dict__": [[encode(k, tensors, where), encode(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()]
        }
    raise TypeError(
        f"cannot store a {type(value).__name__} at {where} in a training checkpoint (only numbers, strings, "
        "lists, tuples, dicts and tensors are stored, never pickled objects)"
    )


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tuple__" in tree:
        return tuple(decode(v, tensors) for v in tree["__tuple__"])
    if "__dict__" in tree:
        return {decode(k, tensors): decode(v, tensors) for k, v in tree["__dict__"]}
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return np.asarray(tree["__ndarray__"], dtype=np.dtype(tree["dtype"]))
    return {k: decode(v, tensors) for k, v in tree.items()}


def save_state(stem: Path, state: dict[str, Any]) -> list[Path]:
    """Write ``stem.json`` and ``stem.safetensors``; returns both paths."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {"format": FORMAT, "state": encode(state, tensors)}
    json_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    save_tensors(tensor_path, tensors)
    with open(json_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(tree))
    return [json_path, tensor_path]


def load_state(stem: Path) -> dict[str, Any]:
    """Read what :func:`save_state` wrote; a missing, foreign or corrupt file is a ``ValueError`` naming it."""
    json_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise ValueError(f"{path} is missing; the checkpoint is incomplete, resume from another one")
    try:
        tree = json.loads(json_path.read_text(encoding="utf-8"))
        if not isinstance(tree, dict) or tree.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path} is corrupt ({e}); resume from another checkpoint") from e
    try:
        with safe_open(str(tensor_path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{tensor_path} is corrupt ({e}); resume from another checkpoint") from e
    try:
        return decode(tree["state"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{json_path} is corrupt (a malformed entry: {e}); resume from another checkpoint") from e
