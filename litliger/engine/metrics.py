"""Metrics: ``metrics.jsonl``, the chosen logger, throughput and model FLOPs utilisation."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..util.files import write_atomically

LOGGERS = ("csv", "tensorboard", "wandb")

# Dense peak FLOP/s per GPU from the vendors' datasheets (no sparsity), by a substring of the device name.
_PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "A10G": 70e12, "L4": 121e12}
_PEAK_FP32 = {"H200": 66.9e12, "H100": 66.9e12, "A100": 19.5e12, "L40S": 91.6e12, "A10G": 31.2e12, "L4": 30.3e12}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak FLOP/s for ``precision``, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = _PEAK_FP32 if precision.startswith("32") else _PEAK_BF16
    return next((flops for key, flops in table.items() if key in name), None)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory so far: CUDA's max allocated bytes on GPU, the process's peak RSS on CPU (in MiB)."""
    if device.type == "cuda":
        return {"max_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def make_loggers(name: str, out_dir: Path, run_name: str) -> list:
    """The Fabric logger ``name`` writes under ``out_dir/logs``; :class:`MetricsLog` feeds it every logged line.

    The CSV logger writes each row when it is logged (Lightning's default buffers 100 steps and nothing
    writes the rest at the end); every run, a resumed one too, writes its own ``csv/version_N/metrics.csv``.
    """
    if name == "csv":
        from lightning.fabric.loggers import CSVLogger

        return [CSVLogger(root_dir=str(out_dir / "logs"), name="csv", flush_logs_every_n_steps=1)]
    if name == "tensorboard":
        try:
            from lightning.fabric.loggers import TensorBoardLogger

            return [TensorBoardLogger(root_dir=str(out_dir / "logs"), name="tensorboard")]
        except ModuleNotFoundError as e:
            raise ValueError("logger=tensorboard needs the tensorboard package: pip install tensorboard") from e
    if name == "wandb":
        try:
            from lightning.pytorch.loggers import WandbLogger

            return [WandbLogger(project="litliger", name=run_name, save_dir=str(out_dir / "logs"))]
        except ModuleNotFoundError as e:
            raise ValueError("logger=wandb needs the wandb package: pip install wandb") from e
    raise ValueError(f"logger={name!r}; choose one of {', '.join(LOGGERS)}")


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (rank 0) and forwards to Fabric's loggers.

    Each step appears once: a resumed run first drops the lines past the step it resumes from (the
    interrupted run logged them, the resumed one logs them again), and a fresh run starts a new file.
    ``metrics.jsonl`` is the source of truth; the loggers get every line too (train and validation), and
    :meth:`flush` writes out what they buffer (the loop calls it at every checkpoint save and when fit ends).
    """

    def __init__(self, fabric: L.Fabric, out_dir: Path, keep_through: int | None) -> None:
        self.fabric = fabric
        self.path = out_dir / "metrics.jsonl"
        if fabric.global_rank == 0 and self.path.exists():
            self._truncate(keep_through)

    def _truncate(self, keep_through: int | None) -> None:
        # Lines are split on b"\n" only (str.splitlines would also split at U+2028 and the like) and kept as the
        # bytes they were; a line that is not a JSON object (cut short by a kill, not UTF-8) is dropped.
        kept = []
        if keep_through is not None:
            for line in self.path.read_bytes().split(b"\n"):
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a kill (JSONDecodeError), or not UTF-8 (UnicodeDecodeError)
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= keep_through:
                    kept.append(line.removesuffix(b"\r"))
        write_atomically(self.path, b"".join(line + b"\n" for line in kept))

    def log(self, values: dict[str, Any], step: int) -> None:
        values = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        if self.fabric.global_rank == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(values) + "\n")
        self.fabric.log_dict({k: v for k, v in values.items() if k != "step"}, step=step)

    def flush(self) -> None:
        """Write out what the loggers hold (CSV rows, TensorBoard events) without closing them (rank 0)."""
        for logger in self.fabric.loggers:
            logger.save()  # rank-zero-only in Lightning's loggers


class Throughput:
    """Tokens per second from wall time between log points, and MFU where the device's peak is known."""

    def __init__(self, flops_per_token: float, peak: float | None, world_size: int) -> None:
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak, world_size
        self.start_time, self.start_tokens = time.perf_counter(), 0

    def reset(self, tokens: int) -> None:
        self.start_time, self.start_tokens = time.perf_counter(), tokens

    def measure(self, tokens: int) -> dict[str, float | None]:
        now = time.perf_counter()
        elapsed = max(now - self.start_time, 1e-9)
        tokens_per_sec = (tokens - self.start_tokens) / elapsed
        self.start_time, self.start_tokens = now, tokens
        mfu = None
        if self.peak:
            mfu = tokens_per_sec * self.flops_per_token / (self.peak * self.world_size)
        return {"tokens_per_sec": tokens_per_sec, "mfu": mfu}
