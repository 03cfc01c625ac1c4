"""The data-module contract, the resumable loader data modules hand out, and the endless batch iterator.

Lifecycle (as in LitGPT): `connect(tokenizer, batch_size, max_seq_length)` -> `prepare_data()` (once, on
rank 0 first) -> `setup()` (every rank) -> `train_dataloader()` / `val_dataloader()`.

Exact resume. A training loader's state is two numbers, the epoch in progress and how many batches of
it were consumed, plus the settings that must match. `load_state_dict` rebuilds litdata's own resume
state from those numbers on a fresh dataset, so litdata skips the consumed samples by index arithmetic
(nothing is re-read), and the continuation is bitwise the batches the uninterrupted run would have
produced. We do not save litdata's state dict itself: its `dataset.current_epoch` is read from the main
process's copy of the dataset, which goes stale once a state has been loaded (with `num_workers > 0`
until the next epoch; with any `num_workers` until the first batch). A second resume inside a resumed
epoch, or a save right after a resume, then replays the wrong epoch's shuffle (litdata 0.2.76). An
end-of-epoch state is read as "next epoch, 0 batches", so no partial-epoch bookkeeping crosses an epoch
boundary.

Validation reads the same batches at any world size. A validation loader yields the whole split, in the same
order, on every rank (litdata would split it between ranks); `rank_share` takes the first `max_batches` of
those batches, all ranks together, and gives batch i to rank i % world_size. The batches evaluated, and so
the loss, are then those of one process, whatever the world size.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.item_loader import TokensLoader
from litdata.streaming.resolver import Dir
from litdata.utilities.env import _DistributedEnv

from litliger.checkpoint.layout import RUN_FILE
from litliger.data.tokenizer import Tokenizer

_STATE_VERSION = 1


class DataModule(ABC):
    """Base of litliger's data modules: connect -> prepare_data -> setup -> loaders."""

    tokenizer: Tokenizer | None = None
    batch_size: int = 1
    max_seq_length: int = -1
    reset: bool = False  # a resume ignores the checkpoint's data position (a new data phase); see the recipes

    def connect(self, tokenizer: Tokenizer, batch_size: int, max_seq_length: int) -> None:
        """Give the module what it needs to tokenize and batch: samples are `max_seq_length + 1` tokens."""
        if batch_size < 1 or max_seq_length < 1:
            raise ValueError(f"batch_size and max_seq_length must be >= 1, got {batch_size} and {max_seq_length}.")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length

    def prepare_data(self) -> None:  # noqa: B027 (an optional hook)
        """Do the one-off, cacheable work (tokenizing); called on rank 0 before the other ranks."""

    def setup(self) -> None:  # noqa: B027 (an optional hook)
        """Build the datasets; called on every rank after `prepare_data`."""

    @abstractmethod
    def train_dataloader(self) -> StreamingDataLoader:
        """A new loader over the training set, yielding LongTensor batches (batch_size, max_seq_length + 1)."""

    def val_dataloader(self) -> StreamingDataLoader | None:
        """A new loader over the whole validation set, the same batches in the same order on every rank (not
        split between ranks: see `rank_share`), or None when there is none."""
        return None

    @abstractmethod
    def training_files(self) -> list[Path]:
        """The files a tokenizer for this data would be trained on."""

    def train_tokenizer(self, vocab_size: int) -> Tokenizer:
        """The tokenizer a run uses when none is given: a byte-level BPE trained on this data (cached)."""
        return Tokenizer.train_bpe(self.training_files(), vocab_size=vocab_size)

    def document_eos(self) -> int | None:
        """The token that ends every document of the stream when the module's ``document_mask`` is on (its
        batches then carry document ids), else None. A module without the field never masks."""
        if not getattr(self, "document_mask", False):
            return None
        if self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__}.connect(tokenizer, batch_size, max_seq_length) was not called.")
        return self.tokenizer.eos_id


# --- the run record: what a checkpoint says about the data it was validated on (RUN_FILE) -------------------


def run_record(data: DataModule, *, max_seq_length: int, batch_size: int, max_batches: int) -> dict[str, Any]:
    """What ``run.yaml`` holds (plain YAML data): the data module as a config file names it (``class_path`` +
    ``init_args``: its dataclass fields) and the validation settings, as ``litliger evaluate``'s flags.

    ``litliger evaluate`` on the checkpoint then evaluates the batches the run's validation did: the first
    ``max_batches`` batches of ``batch_size`` sequences of ``max_seq_length`` tokens.
    """
    cls = type(data)
    import litliger.data as package  # the public name when there is one, as configs write it

    public = getattr(package, cls.__name__, None) is cls
    fields = dataclasses.fields(data) if dataclasses.is_dataclass(data) else ()
    return {
        "data": {
            "class_path": f"litliger.data.{cls.__name__}" if public else f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {f.name: _plain(getattr(data, f.name)) for f in fields if f.init},
        },
        "validation": {"max_seq_length": max_seq_length, "batch_size": batch_size, "max_batches": max_batches},
    }


def write_run_record(folder: Path, record: dict[str, Any]) -> str:
    """Write ``record`` as ``folder/run.yaml`` (a checkpoint's checksums cover it); returns the file name."""
    (Path(folder) / RUN_FILE).write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")
    return RUN_FILE


def read_run_record(folder: Path) -> dict[str, Any] | None:
    """The ``run.yaml`` of a checkpoint folder, or None when it has none (written before it existed)."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    record = yaml.safe_load(path.read_text(encoding="utf-8"))
    validation = record.get("validation") if isinstance(record, dict) else None
    keys = ("max_seq_length", "batch_size", "max_batches")
    if (
        not isinstance(validation, dict)
        or not isinstance(record.get("data"), dict | None)
        or not all(type(validation.get(k)) is int and validation[k] > 0 for k in keys)
    ):
        raise ValueError(
            f"{path} is not a litliger run record, in CHECKPOINT_DIR; give --data, --max_seq_length, --batch_size "
            "and --max_batches, or use a checkpoint written by litliger"
        )
    return record


def data_from_record(record: dict[str, Any], where: Path) -> DataModule:
    """The data module ``record`` (``{"class_path", "init_args"}``) names. A record is data, never code: only
    a DataModule class of ``litliger.data`` is built, from plain YAML values; anything else is refused."""
    class_path, init_args = record.get("class_path"), record.get("init_args") or {}
    module_name, _, name = str(class_path).rpartition(".")
    cls = None
    if (module_name == "litliger.data" or module_name.startswith("litliger.data.")) and not name.startswith("_"):
        try:
            cls = getattr(importlib.import_module(module_name), name, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, DataModule)) or not isinstance(init_args, dict):
        raise ValueError(
            f"{where} names the data module {class_path!r}, in {RUN_FILE}; only litliger.data classes are rebuilt "
            "from a checkpoint: give --data"
        )
    try:
        return cls(**init_args)
    except TypeError as e:
        raise ValueError(f"{class_path} does not take the init_args of {where} ({e}); give --data") from e


def _plain(value: Any) -> Any:
    """``value`` as YAML data: paths as strings, tuples as lists, dataclasses (a Mixture's sources) as dicts."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def eos_document_ids(blocks: np.ndarray, eos_id: int) -> np.ndarray:
    """(B, T) document ids of the inputs ``blocks[:, :-1]`` of (B, T + 1) token blocks cut from an EOS-separated
    stream: an EOS is the last token of its document, so a position's id is the number of EOS before it in its
    row (the first, partial document of a block is 0). An EOS input still predicts the next document's first
    token: the targets are those of the unmasked stream, only attention and positions change."""
    ends = blocks[:, :-1] == eos_id
    return (np.cumsum(ends, axis=1) - ends).astype(np.int64)


def collate_tokens(items: list[np.ndarray], eos_id: int | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """Stack token blocks (stored as uint16/int32 to halve the disk) into an int64 batch (B, T + 1); with
    ``eos_id`` (document masking) ``{"tokens": batch, "document_ids": (B, T)}``."""
    return token_batch(np.stack(items), eos_id)


def token_batch(blocks: np.ndarray, eos_id: int | None) -> torch.Tensor | dict[str, torch.Tensor]:
    """A (B, T + 1) block array as the batch the engine takes: an int64 tensor, or with ``eos_id`` the tokens
    and their document ids (see :func:`eos_document_ids`)."""
    tokens = torch.from_numpy(blocks.astype(np.int64, copy=False))
    if eos_id is None:
        return tokens
    return {"tokens": tokens, "document_ids": torch.from_numpy(eos_document_ids(blocks, eos_id))}


def batch_inputs(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets, document_ids or None) of any batch a data module gives: token blocks (B, T + 1), alone
    or as ``{"tokens", "document_ids"}``, or instruction batches ``{"input_ids", "targets"[, "document_ids"]}``."""
    if isinstance(batch, torch.Tensor):
        return batch[:, :-1], batch[:, 1:], None
    if "tokens" in batch:
        return batch["tokens"][:, :-1], batch["tokens"][:, 1:], batch.get("document_ids")
    return batch["input_ids"], batch["targets"], batch.get("document_ids")


def stack_stored(items: list[np.ndarray]) -> np.ndarray:
    """Stack token blocks as stored (uint16/int32): for a consumer that converts them once (a Mixture)."""
    return np.stack(items)


class ResumableLoader(StreamingDataLoader):
    """A StreamingDataLoader over token blocks whose `state_dict` resumes exactly (see the module docstring).

    Same world size and batch size are required to resume; a changed `num_workers`, seed or dataset
    resumes at the same (epoch, batch) position with a warning, since the order can no longer match.
    """

    def __init__(
        self,
        dataset: StreamingDataset,
        batch_size: int,
        num_workers: int = 0,
        fingerprint: str = "",
        collate: Callable[[list[np.ndarray]], Any] = collate_tokens,
    ):
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
        self.fingerprint = fingerprint
        self._batches_in_epoch = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self.restore:  # litdata starts a new epoch unless it is resuming one
            self._batches_in_epoch = 0
        for batch in super().__iter__():
            self._batches_in_epoch += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "epoch": self.current_epoch,
            "batches_in_epoch": self._batches_in_epoch,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "world_size": self.dataset.distributed_env.world_size,
            "seed": self.dataset.seed,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"Not a litliger loader state (version {state.get('version')!r}): {sorted(state)}.")
        world_size = self.dataset.distributed_env.world_size
        for name, now in (("batch_size", self.batch_size), ("world_size", world_size)):
            if state[name] != now:
                raise ValueError(
                    f"Cannot resume the data stream: the checkpoint has {name}={state[name]}, this run {now}. "
                    f"Resume with {name}={state[name]} or start a fresh run."
                )
        soft = (("num_workers", self.num_workers), ("seed", self.dataset.seed), ("fingerprint", self.fingerprint))
        for name, now in soft:
            if state[name] != now:
                what = "the training data" if name == "fingerprint" else f"{name} ({state[name]} -> {now})"
                warnings.warn(
                    f"Resuming with changed {what}: continuing at the same epoch and batch, but not with "
                    "the same samples the interrupted run would have seen.",
                    stacklevel=2,
                )

        epoch, done = int(state["epoch"]), int(state["batches_in_epoch"])
        if done >= len(self):  # the epoch was finished: resume at the start of the next one
            epoch, done = epoch + 1, 0
        if done == 0:
            # Stand where an uninterrupted run stands before starting `epoch`: the previous one fully
            # consumed (so saving again before the first batch gives this state back); __iter__ then
            # increments the epoch and starts it fresh.
            self.current_epoch = max(epoch - 1, 0)
            self._batches_in_epoch = len(self) if epoch > 1 else 0
            return
        self._batches_in_epoch = done
        samples = done * self.batch_size
        dataset_state = {**self.dataset.state_dict(samples, self.num_workers, self.batch_size), "current_epoch": epoch}
        super().load_state_dict(
            {
                "dataset": dataset_state,
                "current_epoch": epoch,
                "num_samples_yielded": samples,
                # Workers hand out batches round-robin; the next batch comes from the worker after this one.
                "latest_worker_idx": (done - 1) % max(self.num_workers, 1),
            }
        )


_NEVER_EVICT = 1 << 50  # litdata may delete chunks it thinks are a download cache; local shards are the data itself


def token_dataset(
    input_dir: str,
    *,
    block: int,
    shuffle: bool,
    seed: int = 42,
    storage_options: dict | None = None,
    cache_dir: str | None = None,
    max_cache_size: int | str | None = None,
) -> StreamingDataset:
    """litdata's dataset of ``block``-token samples over prepared shards (a local folder or a remote URL)."""
    remote = "://" in input_dir
    return StreamingDataset(
        input_dir=input_dir if not (remote and cache_dir) else Dir(path=cache_dir, url=input_dir),
        item_loader=TokensLoader(block_size=block),
        shuffle=shuffle,
        # Training: every rank and worker gets the same number of full batches (litdata forces this under
        # torch.distributed anyway). Validation on one rank keeps every sample.
        drop_last=True if shuffle else None,
        seed=seed,
        item_shuffle_window=0,  # a full permutation inside each chunk, independent of LITDATA_* env settings
        max_cache_size=(max_cache_size or "10GB") if remote else _NEVER_EVICT,
        storage_options=storage_options or {},
    )


def token_train_loader(
    input_dir: str,
    *,
    block: int,
    batch_size: int,
    seed: int,
    num_workers: int,
    fingerprint: str,
    what: str,
    eos_id: int | None = None,
    collate: Callable[[list[np.ndarray]], Any] | None = None,
    **remote,
) -> ResumableLoader:
    """The exactly resumable training loader over prepared shards; an error when no full batch fits. With
    ``eos_id`` its batches carry document ids (document masking); ``collate`` replaces the batching."""
    dataset = token_dataset(input_dir, block=block, shuffle=True, seed=seed, **remote)
    collate = collate or functools.partial(collate_tokens, eos_id=eos_id)  # a partial: workers pickle it
    loader = ResumableLoader(dataset, batch_size, num_workers, fingerprint, collate)
    if len(loader) == 0:
        samples = total_samples(loader.dataset, block)
        if samples == 0:
            raise ValueError(
                f"The text of {what} is shorter than one sample of max_seq_length + 1 = {block} tokens: add text or "
                "lower max_seq_length."
            )
        raise ValueError(
            f"{what} ({samples} samples of {block} tokens) gives no full batch of {batch_size} per rank and worker: "
            "add text, or lower batch_size, max_seq_length or num_workers."
        )
    return loader


def total_samples(dataset: StreamingDataset, block: int) -> int:
    """Samples of ``block`` tokens in a token dataset, all ranks together (from its index, local or cached)."""
    index = json.loads((Path(dataset.input_dir.path) / "index.json").read_text())
    return sum(c["dim"] // block for c in index["chunks"])


def token_val_loader(
    input_dir: str, *, block: int, batch_size: int, num_workers: int, what: str, eos_id: int | None = None, **remote
) -> StreamingDataLoader:
    """The validation loader over prepared shards (not shuffled): every sample, the last batch possibly smaller,
    and the whole split on every rank (see `rank_share`); with ``eos_id``, batches with document ids."""
    dataset = token_dataset(input_dir, block=block, shuffle=False, **remote)
    if total_samples(dataset, block) == 0:
        raise ValueError(
            f"The text of {what} is shorter than one sample of max_seq_length + 1 = {block} tokens: add validation "
            "text or lower max_seq_length."
        )
    # litdata reads the distributed environment when the dataset is built and would give each rank a part
    dataset.distributed_env = _DistributedEnv(world_size=1, global_rank=0, num_nodes=1)
    collate = functools.partial(collate_tokens, eos_id=eos_id)
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)


def rank_share(loader: Iterable, max_batches: int | None, rank: int, world_size: int) -> Iterator[tuple[Any, bool]]:
    """This rank's share of the first ``max_batches`` (None: all) batches of a validation ``loader``, which
    yields the whole split in the same order on every rank: ``(batch, True)`` for every batch i with
    ``i % world_size == rank``.

    Every rank yields ceil(n / world_size) pairs, n the batches taken, so that every rank runs the same number
    of forwards (FSDP gathers weights inside each): a rank with one batch fewer ends with ``(a batch, False)``,
    a filler whose loss the caller counts as zero.
    """
    taken = mine = 0
    filler = None
    for i, batch in enumerate(itertools.islice(loader, max_batches)):
        taken += 1
        filler = batch if filler is None else filler
        if i % world_size == rank:
            mine += 1
            yield batch, True
    for _ in range(-(-taken // world_size) - mine):
        yield filler, False


def infinite_batches(loader: StreamingDataLoader) -> Iterator[torch.Tensor]:
    """Batches from `loader` forever: each exhausted pass starts the next epoch by iterating again."""
    while True:
        produced = False
        for batch in loader:
            produced = True
            yield batch
        if not produced:
            raise ValueError("The data loader produced no batch in a whole epoch; the dataset is too small.")
