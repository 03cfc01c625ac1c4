"""Training on prepared token shards, local or in object storage: ``TokenShards``.

Shards are what ``litliger prepare`` writes (``<out>/train/``, ``<out>/val/``, ``litliger.json`` and the
tokenizer in ``<out>/tokenizer/``) or any litdata ``TokensLoader`` dataset (an ``index.json`` beside its chunk
files), such as LitGPT's preparation scripts write with ``litdata.optimize``. The block size is chosen here,
when training: one preparation serves every sequence length.

Remote shards (``s3://``, ``gs://``, ...) stream through litdata: chunks are downloaded into a local cache
(``cache_dir``) that is kept under ``max_cache_size`` by deleting consumed chunks, and a failed download is
retried by litdata. ``storage_options`` (e.g. ``{"endpoint_url": ...}``) are passed through to litdata.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litliger.data.base import DataModule, ResumableLoader, token_train_loader, token_val_loader
from litliger.data.cache import bytes_digest
from litliger.data.remote import check_reachable, download_file, is_remote, read_text
from litliger.data.shards import META
from litliger.data.tokenizer import Tokenizer

TOKENIZER_DIR = "tokenizer"  # where `litliger prepare` saves the tokenizer, inside its output


def join(location: str, *names: str) -> str:
    """``location/names`` for a local path or a URL."""
    return "/".join([location.rstrip("/"), *names]) if is_remote(location) else str(Path(location, *names))


def read_location(location: str, storage_options: dict | None = None) -> str | None:
    """The text of a local file or remote object, or None when it does not exist."""
    if is_remote(location):
        return read_text(location, storage_options)
    path = Path(location).expanduser()
    return path.read_text() if path.is_file() else None


@dataclass
class TokenShards(DataModule):
    """Prepared token shards as training data (see the module docstring).

    Args:
        path: the output folder (or URL) of ``litliger prepare``, or a litdata TokensLoader dataset.
        val_path: validation shards; default ``<path>/val`` when ``path`` holds ``train/`` and ``val/``.
        seed: shuffle seed of the training stream (the order also changes every epoch).
        num_workers: dataloader worker processes (0 = load in the main process).
        storage_options: passed to litdata for remote paths, e.g. ``{"endpoint_url": "https://..."}``.
        cache_dir: local folder for downloaded chunks of remote shards (default: litdata's).
        max_cache_size: how much of a remote dataset the local cache may hold, e.g. "10GB".
        reset: on resume, ignore the checkpoint's data position and start this data from its beginning.
        document_mask: batches carry document ids from the EOS that ends every document: no attention across
            documents, positions restart at each (litliger/model/documents.py). Off by default.
    """

    path: str
    val_path: str | None = None
    seed: int = 42
    num_workers: int = 0
    storage_options: dict[str, Any] | None = None
    cache_dir: str | None = None
    max_cache_size: str = "10GB"
    reset: bool = False
    document_mask: bool = False

    def __post_init__(self) -> None:
        self.path = str(self.path)
        self._layout: dict[str, Any] | None = None

    # ---------------------------------------------------------------- layout

    def layout(self) -> dict[str, Any]:
        """{"train": location, "val": location or None, "meta": litliger.json or None, "fingerprint"}."""
        if self._layout is None:
            if is_remote(self.path):
                check_reachable(self.path, self.storage_options)
            elif not Path(self.path).expanduser().exists():
                raise FileNotFoundError(
                    f"TokenShards.path: {self.path} does not exist; point it at the output of litliger prepare"
                )
            meta_text = read_location(join(self.path, META), self.storage_options)
            if (index := read_location(join(self.path, "index.json"), self.storage_options)) is not None:
                train, val = self.path, self.val_path
            elif (index := read_location(join(self.path, "train", "index.json"), self.storage_options)) is not None:
                train = join(self.path, "train")
                val = self.val_path
                if val is None and read_location(join(self.path, "val", "index.json"), self.storage_options):
                    val = join(self.path, "val")
            else:
                raise FileNotFoundError(
                    f"no prepared shards in {self.path}: it holds neither index.json nor train/index.json; prepare "
                    "them with `litliger prepare --out_dir ...` or point path at a litdata TokensLoader dataset"
                )
            meta = json.loads(meta_text) if meta_text else None
            fingerprint = meta["key"] if meta else bytes_digest(index.encode())[:24]
            self._layout = {"train": train, "val": val, "meta": meta, "fingerprint": f"shards-{fingerprint}"}
        return self._layout

    def streams(self) -> dict:
        """Where the splits are: {"train", "val" (or None), "fingerprint", "options"} (as Corpus)."""
        layout = self.layout()
        return {k: layout[k] for k in ("train", "val", "fingerprint")} | {"options": self.remote_options()}

    def remote_options(self) -> dict[str, Any]:
        if not is_remote(self.path):
            return {}
        return {
            "storage_options": self.storage_options,
            "cache_dir": self.cache_dir,
            "max_cache_size": self.max_cache_size,
        }

    # ---------------------------------------------------------------- DataModule

    def training_files(self) -> list[Path]:
        return []

    def train_tokenizer(self, vocab_size: int) -> Tokenizer:
        """The tokenizer the shards were prepared with (saved by ``litliger prepare``); shards hold ids, so
        no other tokenizer can be trained on them."""
        folder = join(self.path, TOKENIZER_DIR)
        if read_location(join(folder, "tokenizer.json"), self.storage_options) is None:
            raise FileNotFoundError(
                f"{self.path} holds token ids without the tokenizer that made them; pass --tokenizer_dir (the "
                "tokenizer the shards were prepared with)"
            )
        if not is_remote(folder):
            return Tokenizer.from_dir(folder)
        local = Path(tempfile.mkdtemp(prefix="litliger-tokenizer-"))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if read_location(join(folder, name), self.storage_options) is not None:
                download_file(join(folder, name), local / name, self.storage_options)
        return Tokenizer.from_dir(local)

    def setup(self) -> None:
        meta = self.layout()["meta"]
        tokenizer = self.tokenizer
        if meta and tokenizer is not None and meta.get("tokenizer") not in (None, tokenizer.fingerprint):
            raise ValueError(
                f"the shards in {self.path} were prepared with another tokenizer than this run's; train with the "
                f"tokenizer saved in {join(self.path, TOKENIZER_DIR)} (leave --tokenizer_dir out) or prepare again"
            )

    def train_dataloader(self) -> ResumableLoader:
        layout = self.layout()
        return token_train_loader(
            layout["train"], block=self.max_seq_length + 1, batch_size=self.batch_size, seed=self.seed,
            num_workers=self.num_workers, fingerprint=layout["fingerprint"], what=f"the shards in {layout['train']}",
            eos_id=self.document_eos(), **self.remote_options(),
        )  # fmt: skip

    def val_dataloader(self):  # noqa: ANN201 (a StreamingDataLoader or None)
        val = self.layout()["val"]
        if val is None:
            return None
        return token_val_loader(
            val, block=self.max_seq_length + 1, batch_size=self.batch_size, num_workers=self.num_workers,
            what=f"the shards in {val}", eos_id=self.document_eos(), **self.remote_options(),
        )  # fmt: skip
