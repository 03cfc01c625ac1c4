"""An in-memory loader of variable-length examples: padded batches, rank shards, epoch shuffles, exact resume.

Finetuning sets are small (thousands to a few hundred thousand examples), so they live in memory as
token arrays and a batch is padded to its own longest example, not to max_seq_length.

Order. Epoch e (1, 2, ...) visits the examples in a permutation drawn from (seed, e). Training keeps
only the first `len(loader) * batch_size * world_size` of it, and rank r takes every world_size-th of
those from position r: shares are disjoint, every rank yields the same number of full batches (a rank
that runs out first would leave the others waiting in a collective forever), and the dropped remainder
differs every epoch. Validation is not shuffled and keeps every example (the last batch may be
smaller). A data module's validation loader is built with `rank=0, world_size=1`: every rank reads the
whole split and the engine shares a prefix of its batches (`base.rank_share`), so the examples evaluated do
not depend on the world size. (With `world_size > 1` a validation loader leaves the last `n % world_size`
examples out, so that every rank has the same share.)

Resume. The state is the epoch in progress and how many of its batches were consumed, as for
`ResumableLoader`: the permutation is recomputed from (seed, epoch), so a restored loader yields
bitwise the batches an uninterrupted one would have, and an end-of-epoch state resumes at the start
of the next epoch. Each `iter(loader)` starts the next epoch (or finishes a restored one), which is
what `infinite_batches` expects.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

IGNORE_INDEX = -100  # the target of a position that is not trained (the loss's ignore_index)
_STATE_VERSION = 1


class Example(NamedTuple):
    """One tokenized example: `ids` (at most max_seq_length + 1) and which of them are targets."""

    ids: np.ndarray  # int32 (n,)
    trained: np.ndarray  # bool (n,): ids[i] is a target, i.e. predicted from ids[:i] (the first never is)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `{"input_ids", "targets"}` LongTensors (B, T), T the longest example's length - 1."""
    width = max(len(e.ids) for e in examples) - 1
    inputs = np.full((len(examples), width), pad_id, dtype=np.int64)
    targets = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    for row, (ids, trained) in enumerate(examples):
        n = len(ids) - 1
        inputs[row, :n] = ids[:-1]
        targets[row, :n] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
    return {"input_ids": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``{"input_ids", "targets", "document_ids"}`` (B, T) of packed rows, T ``width`` (default: the
    longest row). A fixed width keeps every batch one shape: compiled attention then never recompiles."""
    width = width or max(sum(len(e.ids) - 1 for e in row) for row in rows)
    inputs = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    documents = np.empty((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for doc, (ids, trained) in enumerate(row):
            n = len(ids) - 1
            inputs[r, at : at + n] = ids[:-1]
            targets[r, at : at + n] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
            documents[r, at : at + n] = doc
            at += n
        documents[r, at:] = len(row)  # the padding is a document of its own
    return {
        "input_ids": torch.from_numpy(inputs),
        "targets": torch.from_numpy(targets),
        "document_ids": torch.from_numpy(documents),
    }


def fingerprint(examples: Sequence[Example], rows: Sequence[Sequence[int]] | None = None) -> str:
    """A short hash of the examples' ids and target masks, in order (and of the packed rows): a resume notices
    changed data."""
    digest = hashlib.sha256()
    for ids, trained in examples:
        digest.update(np.int64(len(ids)).tobytes())
        digest.update(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
        digest.update(np.packbits(trained).tobytes())
    for row in rows or ():
        digest.update(np.asarray([-1, *row], dtype=np.int64).tobytes())
    return digest.hexdigest()[:24]


def distributed_rank_and_size() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when it is initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ExampleLoader:
    """Batches of `examples` for this rank, one epoch per iteration (see the module docstring).

    `shuffle=True, drop_last=True` is the training loader (exactly resumable); `shuffle=False,
    drop_last=False` the validation loader. `rank` / `world_size` default to torch.distributed's.

    With ``rows`` (lists of example indices, ``packing.pack``) the loader deals out packed rows instead of
    examples: every rule above applies to rows, and a batch carries ``document_ids`` (``collate_packed``), all
    batches ``row_width`` wide when it is given.
    An epoch is still one pass over the examples, each in its row.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        pad_id: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        rows: Sequence[Sequence[int]] | None = None,
        row_width: int | None = None,
        pairs: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        dist_rank, dist_size = distributed_rank_and_size()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_size if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}.")
        self.examples = examples
        self.rows, self.row_width = rows, row_width
        if pairs and (rows is not None or len(examples) % 2):
            raise ValueError("pairs=True deals out (chosen, rejected) example pairs: an even number, and no rows")
        self.pairs = pairs
        # per pair (pairs, 2) values a batch carries as "ref_logps" (2B,), chosen first: DPO's reference log-probs
        self.pair_values: np.ndarray | None = None
        if rows is not None and row_width is not None:
            for r, row in enumerate(rows):
                if (n := sum(len(examples[i].ids) - 1 for i in row)) > row_width:
                    raise ValueError(
                        f"packed row {r} holds {n} positions, more than max_seq_length={row_width}; pack with "
                        "litliger.data.packing.pack(lengths, max_seq_length)"
                    )
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0  # the epoch in progress (or last finished); the first iteration starts epoch 1
        self._batches_in_epoch = 0
        self._restored = False  # the next iteration continues `epoch` instead of starting a new one
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.examples, self.rows)
        return self._fingerprint

    @property
    def units(self) -> int:
        """What the loader deals out: examples, packed rows, or (chosen, rejected) pairs."""
        if self.pairs:
            return len(self.examples) // 2
        return len(self.examples) if self.rows is None else len(self.rows)

    def __len__(self) -> int:
        """Batches per epoch on this rank, the same on every rank."""
        share = self.units // self.world_size
        return share // self.batch_size if self.drop_last else math.ceil(share / self.batch_size)

    def _share(self, epoch: int) -> np.ndarray:
        """This rank's example (or row) indices for `epoch`, in order."""
        n = self.units
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        used = len(self) * self.batch_size * self.world_size if self.drop_last else n - n % self.world_size
        return order[:used][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self._restored:
            self.epoch += 1
            self._batches_in_epoch = 0
        self._restored = False
        share = self._share(self.epoch)
        for b in range(self._batches_in_epoch, len(self)):
            batch = self._collate(share[b * self.batch_size : (b + 1) * self.batch_size])
            self._batches_in_epoch = b + 1  # counted before the yield: a consumed batch is in the state
            yield batch

    def _collate(self, chosen: np.ndarray) -> dict[str, torch.Tensor]:
        if self.pairs:
            return self._collate_pairs(chosen)
        if self.rows is None:
            return collate([self.examples[i] for i in chosen], self.pad_id)
        rows = [[self.examples[i] for i in self.rows[r]] for r in chosen]
        return collate_packed(rows, self.pad_id, self.row_width)

    def _collate_pairs(self, pairs: np.ndarray) -> dict[str, torch.Tensor]:
        """``collate`` of the B chosen examples, then the B rejected ones (2B rows, one width), with
        ``pair_index`` (B,) and, when ``pair_values`` is set, ``ref_logps`` (2B,)."""
        batch = collate([self.examples[2 * i] for i in pairs] + [self.examples[2 * i + 1] for i in pairs], self.pad_id)
        batch["pair_index"] = torch.from_numpy(np.asarray(pairs, dtype=np.int64))
        if self.pair_values is not None:
            values = self.pair_values[np.asarray(pairs, dtype=np.int64)]
            batch["ref_logps"] = torch.from_numpy(np.concatenate([values[:, 0], values[:, 1]]))
        return batch

    def padding_fraction(self, epoch: int = 1) -> float:
        """The share of the positions of this rank's batches of ``epoch`` that are padding (not any example's)."""
        lengths = np.array([len(e.ids) - 1 for e in self.examples], dtype=np.int64)
        if self.rows is not None:
            lengths = np.array([lengths[list(row)].sum() for row in self.rows], dtype=np.int64)
        share = self._share(epoch)
        used = padded = 0
        for b in range(len(self)):
            widths = lengths[share[b * self.batch_size : (b + 1) * self.batch_size]]
            used += int(widths.sum())
            padded += (self.row_width if self.rows is not None and self.row_width else int(widths.max())) * len(widths)
        return 1.0 - used / padded if padded else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "batches_in_epoch": self._batches_in_epoch,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` was taken; batch_size and world_size must match, seed and data should."""
        keys = ("epoch", "batches_in_epoch", "batch_size", "world_size", "seed", "fingerprint")
        if state.get("version") != _STATE_VERSION or any(k not in state for k in keys):
            raise ValueError(f"Not a litliger example-loader state: {sorted(state)}.")
        for name, now in (("batch_size", self.batch_size), ("world_size", self.world_size)):
            if state[name] != now:
                raise ValueError(
                    f"Cannot resume the data stream: the checkpoint has {name}={state[name]}, this run {now}. "
                    f"Resume with {name}={state[name]} or start a fresh run."
                )
        for name, now in (("seed", self.seed), ("fingerprint", self.fingerprint)):
            if state[name] != now:
                what = "training data" if name == "fingerprint" else f"seed ({state[name]} -> {now})"
                warnings.warn(
                    f"Resuming with a changed {what}: continuing at the same epoch and batch, but not with "
                    "the examples the interrupted run would have seen.",
                    stacklevel=2,
                )
        epoch, done = int(state["epoch"]), int(state["batches_in_epoch"])
        finished = done >= len(self) > 0  # the next iteration starts the following epoch
        # Else the next iteration continues `epoch` at batch `done` (epoch 0 is a loader that never ran).
        self.epoch, self._batches_in_epoch, self._restored = epoch, done, not finished and epoch > 0
