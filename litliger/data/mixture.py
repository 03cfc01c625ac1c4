"""Weighted mixtures of sources, sampled per block and resumed exactly: ``Mixture`` and ``MixtureLoader``.

Each source is a ``Corpus`` (files of any format, prepared into the cache) or ``TokenShards`` (prepared
shards, local or remote), chosen by its path. Every training sample (one block of ``max_seq_length + 1``
tokens) comes from the source that a counter-based draw picks: the draw for position ``n`` of the stream
is a function of ``(seed, n)`` alone (``numpy`` ``choice`` with the normalized weights, in blocks of
4096 positions), so the proportions follow the weights by tokens and the choice sequence never has to be
stored. Every rank draws the same source at the same position, each from its own share of that source, so
the tokens taken from each source are known exactly on every rank without communication.

A source is read in its own shuffled, exactly resumable order (``ResumableLoader``); a small source starts
its next epoch when it runs out (``epochs/<name>`` in the metrics counts them), a large one is never read to
the end. The loader's state is the stream position and how many samples each source gave; on resume each
source's loader is put back at (epoch, batch) and the samples of a half-used batch are skipped, so the
batches after a resume are bitwise those of the uninterrupted run. Resuming with other sources, weights or
source data is an error that names the difference; ``reset=True`` starts the new mixture from its
beginning instead (a new training phase that keeps the model and optimizer).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from litliger.data.base import (
    DataModule,
    ResumableLoader,
    infinite_batches,
    stack_stored,
    token_batch,
    token_train_loader,
    token_val_loader,
)
from litliger.data.cache import json_digest
from litliger.data.corpus import Corpus, TokenCorpus
from litliger.data.remote import is_remote
from litliger.data.shards import META
from litliger.data.stdlib import stdlib_dir
from litliger.data.token_shards import TokenShards
from litliger.data.tokenizer import Tokenizer

_STATE_VERSION = 1
_DRAW_BLOCK = 4096  # positions drawn at once
STDLIB = "{stdlib}"  # in a source path: the running Python's standard library folder (the embedded corpus)


@dataclass
class Source:
    """One source of a mixture. ``path`` is a corpus file, folder or glob (read as ``Corpus``), or prepared
    shards (a folder or URL holding ``index.json`` or ``train/index.json``, read as ``TokenShards``).
    ``val_split_fraction`` overrides the mixture's; ``val_path`` names the source's own validation data."""

    name: str
    path: str
    weight: float
    text_key: str = "text"
    glob: str | None = None
    val_split_fraction: float | None = None
    val_path: str | None = None
    storage_options: dict[str, Any] | None = None


def _source(item: Source | dict[str, Any], index: int) -> Source:
    if isinstance(item, Source):
        return item
    if not isinstance(item, dict):
        raise ValueError(
            f"source {index} is a {type(item).__name__}; give {{name, path, weight, ...}}, in --data.sources"
        )
    known = {f for f in Source.__dataclass_fields__}
    if unknown := sorted(set(item) - known):
        raise ValueError(
            f"source {index} has unknown key {unknown[0]!r}, in --data.sources; use {', '.join(sorted(known))}"
        )
    if missing := [k for k in ("name", "path", "weight") if k not in item]:
        raise ValueError(
            f"source {index} has no {missing[0]!r}, in --data.sources; every source needs name, path, weight"
        )
    return Source(**item)


def _is_shards(path: str) -> bool:
    if is_remote(path):
        return True
    folder = Path(path).expanduser()
    return folder.is_dir() and any((folder / p).is_file() for p in ("index.json", "train/index.json", META))


@dataclass
class Mixture(DataModule):
    """Sources mixed by weight (see the module docstring).

    Args:
        sources: ``[{name, path, weight, text_key, glob, val_split_fraction, val_path, storage_options}, ...]``
            (dicts or ``Source``). ``{stdlib}`` in a path stands for the Python standard library's folder.
        seed: the draw of sources and every source's shuffle.
        val_split_fraction: share of every Corpus source held out for validation (a source may override it).
        num_workers: dataloader worker processes per source (0 = load in the main process).
        num_proc: preparation processes (None: every core this process may use).
        verify: "fast" or "full": how Corpus sources' files are identified in the cache key.
        cache_dir: where Corpus sources are prepared; default ``<cache root>/data``.
        max_cache_size: local cache bound for each remote source.
        reset: on resume, ignore the checkpoint's data position and start this mixture from its beginning.
        document_mask: batches carry document ids from the EOS that ends every document: no attention across
            documents, positions restart at each (litliger/model/documents.py). Off by default.
    """

    sources: list[Source | dict[str, Any]] = field(default_factory=list)
    seed: int = 42
    val_split_fraction: float = 0.05
    num_workers: int = 0
    num_proc: int | None = None
    verify: str = "fast"
    cache_dir: Path | None = None
    max_cache_size: str = "10GB"
    reset: bool = False
    document_mask: bool = False

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("a Mixture needs at least one source, in --data.sources; give [{name, path, weight}, ...]")
        self.sources = [_source(s, i) for i, s in enumerate(self.sources)]
        names = [s.name for s in self.sources]
        for s in self.sources:
            if not isinstance(s.name, str) or not s.name or any(c in s.name for c in "/ \t\n"):
                raise ValueError(
                    f"source name {s.name!r} must be a non-empty word (no '/' or spaces), in --data.sources"
                )
            if names.count(s.name) > 1:
                raise ValueError(f"duplicate source name {s.name!r}, in --data.sources; give every source its own name")
            weight = s.weight
            if (
                isinstance(weight, bool)
                or not isinstance(weight, int | float)
                or not math.isfinite(weight)
                or weight <= 0
            ):
                raise ValueError(
                    f"source {s.name!r} has weight {weight!r}, in --data.sources; a weight is a number above 0"
                )
        self.modules: list[DataModule] = [self._module(s) for s in self.sources]

    def _module(self, s: Source) -> DataModule:
        path = str(s.path).replace(STDLIB, str(stdlib_dir()))
        if _is_shards(path):
            return TokenShards(
                path, val_path=s.val_path, seed=self.seed, num_workers=self.num_workers,
                storage_options=s.storage_options, max_cache_size=self.max_cache_size,
            )  # fmt: skip
        fraction = self.val_split_fraction if s.val_split_fraction is None else s.val_split_fraction
        val_path = str(s.val_path).replace(STDLIB, str(stdlib_dir())) if s.val_path is not None else None
        return Corpus(
            path, text_key=s.text_key, glob=s.glob, val_path=val_path, val_split_fraction=fraction, seed=self.seed,
            num_workers=self.num_workers, num_proc=self.num_proc, verify=self.verify, cache_dir=self.cache_dir,
        )  # fmt: skip

    # ---------------------------------------------------------------- DataModule

    def connect(self, tokenizer: Tokenizer, batch_size: int, max_seq_length: int) -> None:
        super().connect(tokenizer, batch_size, max_seq_length)
        for module in self.modules:
            module.connect(tokenizer, batch_size, max_seq_length)

    def training_files(self) -> list[Path]:
        return [f for m in self.modules for f in m.training_files()]

    def train_tokenizer(self, vocab_size: int) -> Tokenizer:
        """The tokenizer of the first prepared-shards source, else a BPE trained on every Corpus source."""
        if shards := [m for m in self.modules if isinstance(m, TokenShards)]:
            return shards[0].train_tokenizer(vocab_size)
        corpora = [m for m in self.modules if isinstance(m, TokenCorpus)]
        if all(p.fmt.kind == "text" and p.fmt.compression is None for m in corpora for p in m.parts()):
            return super().train_tokenizer(vocab_size)
        identity = json_digest([m._key_parts() for m in corpora])
        return Tokenizer.train_bpe(
            [], vocab_size, texts=lambda: (t for m in corpora for t in m.tokenizer_texts()), identity=identity
        )

    def prepare_data(self) -> None:
        for module in self.modules:
            module.prepare_data()

    def setup(self) -> None:
        for module in self.modules:
            module.setup()

    def train_dataloader(self) -> MixtureLoader:
        loaders = []
        for s, module in zip(self.sources, self.modules, strict=True):
            streams = module.streams()
            loaders.append(
                token_train_loader(
                    streams["train"],
                    block=self.max_seq_length + 1,
                    batch_size=self.batch_size,
                    seed=self.seed,
                    num_workers=self.num_workers,
                    fingerprint=streams["fingerprint"],
                    what=f"source {s.name!r}",
                    collate=stack_stored,  # stored dtype: the mixture converts each sample to int64 once
                    **streams["options"],
                )
            )
        return MixtureLoader(
            self.sources, loaders, seed=self.seed, tokens_per_sample=self.max_seq_length, eos_id=self.document_eos()
        )

    def val_dataloader(self) -> dict[str, Any] | None:
        """One validation loader per source that has a validation split (None when none has)."""
        loaders = {}
        for s, module in zip(self.sources, self.modules, strict=True):
            streams = module.streams()
            if streams["val"] is not None:
                loaders[s.name] = token_val_loader(
                    streams["val"], block=self.max_seq_length + 1, batch_size=self.batch_size,
                    num_workers=self.num_workers, what=f"the validation data of source {s.name!r}",
                    eos_id=self.document_eos(), **streams["options"],
                )  # fmt: skip
        return loaders or None


def draws(seed: int, weights: np.ndarray, block: int) -> np.ndarray:
    """The sources drawn for positions ``[block * 4096, (block + 1) * 4096)`` of a mixture stream."""
    rng = np.random.default_rng([seed, 0x6D6978, block])
    return rng.choice(len(weights), size=_DRAW_BLOCK, p=weights)


class MixtureLoader:
    """Endless batches drawn from several exactly resumable loaders by weight (module docstring)."""

    def __init__(
        self,
        sources: list[Source],
        loaders: list[ResumableLoader],
        *,
        seed: int,
        tokens_per_sample: int,
        eos_id: int | None = None,
    ) -> None:
        self.sources, self.loaders, self.seed, self.eos_id = sources, loaders, seed, eos_id
        self.tokens_per_sample = tokens_per_sample
        weights = np.array([float(s.weight) for s in sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.batch_size = loaders[0].batch_size
        self.world_size = loaders[0].dataset.distributed_env.world_size
        self.per_epoch = [len(loader) * self.batch_size for loader in loaders]  # samples per epoch on this rank
        self.position = 0
        self.consumed = [0] * len(sources)
        self._skip = [0] * len(sources)  # samples to leave out of a source's first batch after a resume
        self._streams: list[Iterator[np.ndarray] | None] = [None] * len(sources)
        self._buffers: list[np.ndarray | None] = [None] * len(sources)  # the batch being used, per source
        self._offsets = [0] * len(sources)
        self._block, self._draws = -1, np.empty(0, dtype=np.int64)

    def _draw(self, n: int) -> int:
        block = n // _DRAW_BLOCK
        if block != self._block:
            self._block, self._draws = block, draws(self.seed, self.weights, block)
        return int(self._draws[n % _DRAW_BLOCK])

    def _take(self, s: int, k: int) -> list[np.ndarray]:
        """The next ``k`` samples of source ``s``, as slices of its batches (stored dtype)."""
        pieces = []
        while k:
            buffer = self._buffers[s]
            if buffer is None or self._offsets[s] >= len(buffer):
                if self._streams[s] is None:
                    self._streams[s] = infinite_batches(self.loaders[s])
                buffer = self._buffers[s] = next(self._streams[s])
                self._offsets[s], self._skip[s] = self._skip[s], 0  # a resume starts inside its first batch
                continue
            n = min(k, len(buffer) - self._offsets[s])
            pieces.append(buffer[self._offsets[s] : self._offsets[s] + n])
            self._offsets[s] += n
            k -= n
        return pieces

    def _picks(self, start: int, n: int) -> np.ndarray:
        """The sources drawn for positions [start, start + n)."""
        if start // _DRAW_BLOCK == (start + n - 1) // _DRAW_BLOCK:
            self._draw(start)  # loads the block
            offset = start % _DRAW_BLOCK
            return self._draws[offset : offset + n]
        return np.array([self._draw(start + i) for i in range(n)])

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            picks = self._picks(self.position, self.batch_size)
            counts = np.bincount(picks, minlength=len(self.sources))
            batch: np.ndarray | None = None
            for s, c in enumerate(counts.tolist()):
                if not c:
                    continue
                pieces = self._take(s, c)
                if batch is None:  # int64 once, as the loaders of a single source give
                    batch = np.empty((self.batch_size, pieces[0].shape[1]), dtype=np.int64)
                rows = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
                if c == self.batch_size:
                    batch[:] = rows
                else:
                    batch[np.flatnonzero(picks == s)] = rows
                self.consumed[s] += c
            self.position += self.batch_size
            yield token_batch(batch, self.eos_id)  # with eos_id: and its document ids

    def metrics(self) -> dict[str, float]:
        """Per source: tokens taken so far (all ranks) and epochs of it seen (``tokens/<name>``, ``epochs/<name>``)."""
        values: dict[str, float] = {}
        for s, source in enumerate(self.sources):
            values[f"tokens/{source.name}"] = self.consumed[s] * self.tokens_per_sample * self.world_size
            values[f"epochs/{source.name}"] = round(self.consumed[s] / self.per_epoch[s], 4)
        return values

    def _identity(self) -> dict[str, dict[str, Any]]:
        return {
            s.name: {"weight": float(s.weight), "fingerprint": loader.fingerprint}
            for s, loader in zip(self.sources, self.loaders, strict=True)
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "kind": "mixture",
            "position": self.position,
            "consumed": {s.name: c for s, c in zip(self.sources, self.consumed, strict=True)},
            "sources": self._identity(),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "mixture" or state.get("version") != _STATE_VERSION:
            raise ValueError(
                "the checkpoint's data position is not a mixture's (it was saved by another data module); resume "
                "with the checkpoint's data, or start a new phase with --data.reset true"
            )
        if differences := _differences(state["sources"], self._identity()):
            raise ValueError(
                f"cannot resume the data mixture: {'; '.join(differences)}. Resume with the checkpoint's mixture, "
                "or start a new phase: --data.reset true (keeps model and optimizer) or --initial_checkpoint_dir "
                "(model only)"
            )
        for name in ("batch_size", "world_size"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"Cannot resume the data stream: the checkpoint has {name}={state[name]}, this run "
                    f"{getattr(self, name)}. Resume with {name}={state[name]} or start a fresh run."
                )
        if state["seed"] != self.seed:
            warnings.warn(
                f"Resuming with changed seed ({state['seed']} -> {self.seed}): continuing at the same position, but "
                "not with the samples the interrupted run would have seen.",
                stacklevel=2,
            )
        position = int(state["position"])
        consumed = self._count(position)
        if consumed != [int(state["consumed"][s.name]) for s in self.sources] and state["seed"] == self.seed:
            raise ValueError(
                f"the checkpoint's data position is inconsistent (position {position}, per-source counts "
                f"{state['consumed']}, recounted {consumed}); resume from another checkpoint"
            )
        self.position, self.consumed = position, consumed
        for s, loader in enumerate(self.loaders):
            epoch, within = divmod(consumed[s], self.per_epoch[s])
            batches, self._skip[s] = divmod(within, self.batch_size)
            inner = {**loader.state_dict(), "epoch": epoch + 1, "batches_in_epoch": batches}
            loader.load_state_dict(inner)
            self._streams[s] = self._buffers[s] = None

    def _count(self, position: int) -> list[int]:
        counts = np.zeros(len(self.sources), dtype=np.int64)
        for block in range(position // _DRAW_BLOCK):
            counts += np.bincount(draws(self.seed, self.weights, block), minlength=len(self.sources))
        rest = position % _DRAW_BLOCK
        if rest:
            counts += np.bincount(draws(self.seed, self.weights, position // _DRAW_BLOCK)[:rest], minlength=len(counts))
        return [int(c) for c in counts]


def _differences(saved: dict[str, dict], now: dict[str, dict]) -> list[str]:
    out = [f"source {n!r} is gone" for n in saved if n not in now]
    out += [f"source {n!r} is new" for n in now if n not in saved]
    for name in saved:
        if name in now:
            if saved[name]["weight"] != now[name]["weight"]:
                out.append(f"source {name!r} weight {saved[name]['weight']} -> {now[name]['weight']}")
            if saved[name]["fingerprint"] != now[name]["fingerprint"]:
                out.append(f"source {name!r} data changed ({saved[name]['fingerprint']} -> {now[name]['fingerprint']})")
    return out
