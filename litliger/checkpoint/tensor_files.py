"""Tensor files without pickle: a deterministic safetensors writer, digests of files and of tensors.

``save_tensors`` writes the safetensors format (8-byte little-endian header length, a JSON header, the raw
bytes) with the header's keys sorted and the tensors laid out in name order, so the same tensors and
metadata always give the same bytes (the ``safetensors`` package writes its metadata in hash order, so
the file's sha256 changed between two saves of the same weights). The file is created like any other file
(its mode follows the umask) and written to disk in one pass, without a second copy in memory.

``tensor_digest`` identifies the *content* of a safetensors file: the sha256 over every tensor's name,
dtype, shape and bytes in name order, read from the file without loading it. Two files with the same
tensors and another header (metadata, key order, layout) have the same tensor digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

HASH_CHUNK = 1 << 24  # 16 MiB reads: base models can be many GB

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` to the safetensors file ``path``: same tensors and metadata, same bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    names = sorted(tensors)
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the format asks
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            f.write(_raw_bytes(tensors[name]))
        f.flush()
        os.fsync(f.fileno())


def read_header(path: str | Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of a safetensors file's header and the offset where its data starts."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its header); the file is truncated")
        (length,) = struct.unpack("<Q", head)
        if length > os.fstat(f.fileno()).st_size - 8 or length > 100 << 20:
            raise ValueError(f"{path} is not a safetensors file (header length {length}); the file is corrupt")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + length


def tensor_digest(path: str | Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in name order) of the safetensors file ``path``."""
    header, start = read_header(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for name in sorted(header):
            entry = header[name]
            try:
                begin, end = (int(v) for v in entry["data_offsets"])
                described = json.dumps([name, entry["dtype"], list(entry["shape"])])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path} is not a safetensors file (entry {name!r} is malformed)") from e
            digest.update(described.encode())
            f.seek(start + begin)
            left = end - begin
            while left > 0:
                block = f.read(min(left, HASH_CHUNK))
                if not block:
                    raise ValueError(f"{path} is truncated (tensor {name} ends past the end of the file)")
                digest.update(block)
                left -= len(block)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()
