"""A thin tokenizer over Hugging Face `tokenizers`: load a tokenizer folder, or train a byte-level BPE.

A tokenizer folder is what Hugging Face ships and what litliger checkpoints hold: `tokenizer.json`, plus
optionally `tokenizer_config.json` (special token names, `add_bos_token`) and, as a fallback for the
special token ids, `generation_config.json` / `config.json`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from litliger.data.cache import bytes_digest, cache_root, json_digest, publish_dir
from litliger.util.files import read_json_object

EOS_TOKEN = "<|endoftext|>"
_BYTE_ALPHABET = 256
# Names that mean "end of text" in common tokenizers, tried when no config names the EOS token.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")
_BPE_CACHE_VERSION = 1


class Tokenizer:
    """Text <-> token ids with explicit special tokens.

    `encode` never lets the backend's post-processor add special tokens: BOS/EOS are added here, from
    the ids this object holds, so what a document looks like does not depend on the tokenizer's template.
    """

    def __init__(self, backend: tokenizers.Tokenizer, eos_id: int, bos_id: int | None = None, add_bos: bool = False):
        self.backend = backend
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.add_bos = add_bos and bos_id is not None

    def __repr__(self) -> str:
        ids = f"eos_id={self.eos_id}, bos_id={self.bos_id}, add_bos={self.add_bos}"
        return f"Tokenizer(vocab_size={self.vocab_size}, {ids})"

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """Hash of everything that changes the ids this tokenizer produces (used in data cache keys)."""
        return json_digest([self.backend.to_str(), self.eos_id, self.bos_id, self.add_bos])

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json`, `config.json`) from `path`."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"No tokenizer.json in {path}: pass a folder that holds a Hugging Face tokenizer.json (a downloaded "
                "model or a litliger checkpoint), or leave tokenizer_dir unset to train a BPE on the training data."
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises a bare Exception for a malformed file
            raise ValueError(
                f"unreadable tokenizer ({str(e).strip() or type(e).__name__}), in {file}; "
                "replace it with a valid tokenizer.json"
            ) from e
        config = read_json_object(path / "tokenizer_config.json")
        ids = {**read_json_object(path / "config.json"), **read_json_object(path / "generation_config.json")}

        def resolve(kind: str) -> int | None:
            name = _token_name(config.get(f"{kind}_token"))
            if name is not None:
                token_id = backend.token_to_id(name)
                if token_id is None:
                    raise ValueError(
                        f"{path / 'tokenizer_config.json'} names {kind}_token {name!r}, which is not in the vocabulary."
                    )
                return token_id
            token_id = ids.get(f"{kind}_token_id")
            if isinstance(token_id, list):  # e.g. Llama 3 lists several EOS ids; the first is the document end
                token_id = token_id[0] if token_id else None
            return token_id

        eos_id = resolve("eos")
        if eos_id is None:
            eos_id = next((i for n in _EOS_CANDIDATES if (i := backend.token_to_id(n)) is not None), None)
        if eos_id is None:
            raise ValueError(
                f'Cannot tell the EOS token of the tokenizer in {path}: add "eos_token" to its tokenizer_config.json.'
            )
        bos_id = resolve("bos")
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            # No explicit setting: follow the tokenizer's own template (e.g. Llama 3 prepends BOS there).
            add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        return cls(backend, eos_id=eos_id, bos_id=bos_id, add_bos=bool(add_bos))

    @classmethod
    def train_bpe(
        cls,
        files: Sequence[Path],
        vocab_size: int,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        *,
        texts: Callable[[], Iterable[str]] | None = None,
        identity: str | None = None,
    ) -> Tokenizer:
        """Train a byte-level BPE with `vocab_size` ids on `files`; `<|endoftext|>` (id 0) is EOS and BOS.

        The result is cached under `cache_dir` (default `<cache root>/tokenizers`) by the content of the
        files and `vocab_size`, so a second run on the same corpus reuses it instead of training again.
        Files that are not valid UTF-8 are skipped, as the data modules skip them. A corpus that is not
        plain text files passes `texts` (called to stream the documents) and the `identity` of its content
        (the cache key) instead of `files`.
        """
        minimum = _BYTE_ALPHABET + 1
        if vocab_size < minimum:
            raise ValueError(
                f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least {minimum} "
                f"({_BYTE_ALPHABET} byte tokens + {EOS_TOKEN}); use e.g. 4096."
            )
        if texts is not None:
            key = json_digest([_BPE_CACHE_VERSION, tokenizers.__version__, vocab_size, identity])
            return cls._train(texts(), vocab_size, key, cache_dir, use_cache)
        files = [Path(f) for f in files]
        if not files:
            raise ValueError("train_bpe got no files to train on; pass the corpus files (DataModule.training_files()).")
        digests = []
        for f in files:
            data = f.read_bytes()
            if decode_utf8(data) is not None:
                digests.append(bytes_digest(data))
        if not digests:
            raise ValueError(f"None of the {len(files)} files given to train_bpe (e.g. {files[0]}) holds UTF-8 text.")

        key = json_digest([_BPE_CACHE_VERSION, tokenizers.__version__, vocab_size, sorted(digests)])
        return cls._train(_texts(files), vocab_size, key, cache_dir, use_cache)

    @classmethod
    def _train(
        cls, texts: Iterable[str], vocab_size: int, key: str, cache_dir: str | Path | None, use_cache: bool
    ) -> Tokenizer:
        entry = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizers"
        entry = entry / f"bpe-{vocab_size}-{key[:24]}"
        if use_cache and (entry / "tokenizer.json").is_file():
            return cls.from_dir(entry)

        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        if backend.get_vocab_size() < vocab_size:
            warnings.warn(
                f"The corpus only supports {backend.get_vocab_size()} BPE ids, fewer than vocab_size={vocab_size}; "
                "the model's embedding keeps vocab_size rows (the extra ones are never used).",
                stacklevel=2,
            )
        eos_id = backend.token_to_id(EOS_TOKEN)
        tokenizer = cls(backend, eos_id=eos_id, bos_id=eos_id, add_bos=False)
        if use_cache:
            with publish_dir(entry) as tmp:
                tokenizer.save(tmp)
        return tokenizer

    # ---------------------------------------------------------------- use

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Ids of `text`; `bos=None` follows the tokenizer's `add_bos` setting."""
        return self._wrap(self.backend.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(self, texts: list[str], eos: bool = True, bos: bool | None = None) -> list[list[int]]:
        """Ids of many texts at once (Rust-parallel); by default each ends with EOS, as documents do."""
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encodings]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of `ids` (a list or a 1-D tensor); special tokens are kept, so EOS shows as `<|endoftext|>`."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ValueError(f"decode takes one sequence of ids, got a tensor of shape {tuple(ids.shape)}.")
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, out_dir: str | Path) -> None:
        """Write `tokenizer.json` and a `tokenizer_config.json` that Hugging Face and `from_dir` both read."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out_dir / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None if self.bos_id is None else self.backend.id_to_token(self.bos_id),
            "eos_token": self.backend.id_to_token(self.eos_id),
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def _wrap(self, ids: list[int], bos: bool | None, eos: bool) -> list[int]:
        if bos is None:
            bos = self.add_bos
        if bos:
            if self.bos_id is None:
                raise ValueError("This tokenizer has no BOS token; encode with bos=False.")
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids


def _token_name(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def decode_utf8(data: bytes) -> str | None:
    """UTF-8 text of `data`, or None when it is not UTF-8 (such files are skipped, not mangled)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _texts(files: Sequence[Path]) -> Iterator[str]:
    for f in files:
        text = decode_utf8(f.read_bytes())
        if text is not None:
            yield text
