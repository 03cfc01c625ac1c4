"""Read the weights of a Hugging Face model folder one tensor at a time.

Supported layouts, in order of preference: ``model.safetensors.index.json`` (sharded safetensors),
``model.safetensors``, ``pytorch_model.bin.index.json`` (sharded .bin), ``pytorch_model.bin``.
Safetensors shards are opened lazily with ``safe_open`` and read tensor by tensor; .bin shards are
memory-mapped where their format allows, so only the tensors asked for are read into memory.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


class HFWeights:
    """The tensors of a Hugging Face folder by name; use as a context manager (closes the shards)."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.hf_dir = Path(hf_dir)
        self._stack = ExitStack()
        self._open: dict[Path, Any] = {}  # shard path -> safe_open handle or (memory-mapped) .bin state dict
        self._files = self._find_files()  # tensor name -> shard path

    def _find_files(self) -> dict[str, Path]:
        for index_name, single_name in _LAYOUTS:
            index, single = self.hf_dir / index_name, self.hf_dir / single_name
            if index.is_file():
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                missing = sorted({s for s in weight_map.values() if not (self.hf_dir / s).is_file()})
                if missing:
                    raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
                return {name: self.hf_dir / shard for name, shard in weight_map.items()}
            if single.is_file():
                return {name: single for name in self._shard(single).keys()}  # noqa: SIM118 (safe_open)
        raise FileNotFoundError(
            f"no weights in {self.hf_dir}: expected one of " + ", ".join(name for layout in _LAYOUTS for name in layout)
        )

    def _shard(self, path: Path) -> Any:
        if path not in self._open:
            if path.suffix == ".safetensors":
                self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            else:
                self._open[path] = _load_bin(path)
        return self._open[path]

    def __enter__(self) -> HFWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._open.clear()

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        shard = self._shard(self._files[name])
        if isinstance(shard, dict):
            return tuple(shard[name].shape)
        return tuple(shard.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        shard = self._shard(self._files[name])
        if isinstance(shard, dict):
            # clone: own memory, not a view of the mapped file (or of a tensor it shares storage with)
            return shard[name].clone()
        return shard.get_tensor(name)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # the legacy (pre-zip) torch.save format cannot be memory-mapped: read it whole
        return torch.load(path, map_location="cpu", weights_only=True)
