"""Preference pairs for alignment (DPO, SimPO, ORPO): JSON records -> (chosen, rejected) token examples -> batches
of 2B rows, the B chosen first.

A record is ``{"prompt": str, "chosen": str, "rejected": str}``, or the binarised-feedback chat layout
``{"chosen": [messages], "rejected": [messages]}`` where both conversations end in the assistant reply they
compare and share everything before it (a ``prompt`` string may stand in for a missing first user message).
Each side is formatted with the prompt style of instruction data (``prompts.py``) and tokenized as an
Instructions example: the prompt (earlier turns included, earlier assistant replies too) masked (-100 targets),
the last reply and its end token trained.

Truncation is the same on both sides (the shared prompt first, each reply cut from the right at
max_seq_length + 1 tokens); a pair is dropped, and counted, when either side is left without a target.
Packing is not offered: a pair's two sides must stay whole rows for their log-probs to be summed, so
``packing: true`` is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litliger.data.base import DataModule
from litliger.data.cache import cache_root, json_digest, publish_dir
from litliger.data.docstrings import PythonDocstrings
from litliger.data.example_loader import Example, ExampleLoader, fingerprint
from litliger.data.instructions import Record, _loads, encode, jsonl_lines, split_groups, split_summary, utf8_text
from litliger.data.prompts import STYLE_NAMES, PromptStyle, RecordError, check_messages, resolve_prompt_style

_FIX = 'give {"prompt", "chosen", "rejected"} strings, or "chosen" and "rejected" message lists'


@dataclass(frozen=True)
class Pair:
    """One preference record: the chosen and the rejected conversation, where it came from, its split group."""

    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    where: str
    group: str


def to_pair(item: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(chosen messages, rejected messages) of one record; a RecordError says what is wrong with it."""
    if not isinstance(item, dict):
        raise RecordError(f"the record is a {type(item).__name__}, not an object", _FIX)
    for side in ("chosen", "rejected"):
        if side not in item:
            raise RecordError(f"missing field '{side}' (a pair needs both sides)", _FIX)
    prompt = item.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise RecordError(f"field 'prompt' is a {type(prompt).__name__}, not a string", "give it as a string")
    sides = []
    for side in ("chosen", "rejected"):
        value = item[side]
        if isinstance(value, str):
            if prompt is None:
                raise RecordError(f"'{side}' is a string but there is no 'prompt'", _FIX)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": value}]
        elif isinstance(value, list):
            messages = check_messages(value)
            if prompt is not None and messages[0]["role"] == "assistant":
                messages = [{"role": "user", "content": prompt}, *messages]
            if messages[-1]["role"] != "assistant":
                raise RecordError(f"the '{side}' conversation does not end in an assistant reply", _FIX)
        else:
            raise RecordError(f"field '{side}' is a {type(value).__name__}, not a string or a message list", _FIX)
        sides.append(messages)
    chosen, rejected = sides
    if chosen[:-1] != rejected[:-1]:
        raise RecordError(
            "'chosen' and 'rejected' differ before their last reply", "both sides must share the prompt conversation"
        )
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise RecordError("'chosen' and 'rejected' are the same reply", "a pair must compare two different replies")
    return chosen, rejected


def read_pairs(path: Path, group_by: str | None = None) -> list[Pair]:
    """The pairs of a ``.json`` (a list) or ``.jsonl`` file; a malformed record raises with file and line/index."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: point json_path at a .json or .jsonl file of pairs.")
    if path.suffix == ".jsonl":
        raw = [(f"{path}:{n}", _loads(line, f"{path}:{n}")) for n, line in jsonl_lines(path) if line.strip()]
    elif path.suffix == ".json":
        items = _loads(utf8_text(path.read_bytes(), path), str(path), line_of_error=True)
        if not isinstance(items, list):
            raise ValueError(f"the top level is a {type(items).__name__}, not a list, in {path}; give a list of pairs")
        raw = [(f"{path}[{i}]", item) for i, item in enumerate(items)]
    else:
        raise ValueError(f"{path} is neither .json nor .jsonl: give a JSON list of pairs or one pair per line.")
    if not raw:
        raise ValueError(f"no records in {path}; add preference pairs to it")
    pairs = []
    for i, (where, item) in enumerate(raw):
        try:
            chosen, rejected = to_pair(item)
        except RecordError as e:
            raise ValueError(f"{e.what}, in {where}; {e.fix}") from None
        group = str(item[group_by]) if group_by is not None and group_by in item else str(i)
        pairs.append(Pair(chosen, rejected, where, group))
    return pairs


@dataclass
class Preferences(DataModule):
    """Preference pairs from a ``.json`` / ``.jsonl`` file (see the module docstring).

    Args:
        json_path: the records: a JSON list (``.json``) or one JSON object per line (``.jsonl``).
        val_split_fraction: share of the pairs held out for validation (reward accuracy on unseen pairs), by seed.
        prompt_style: "alpaca", "chat_template" or None (the tokenizer's chat template when it has one, else alpaca).
        seed: seed of the split and of the per-epoch shuffle.
        num_workers: accepted for configs shared with other modules; batches are collated in memory.
        group_by: a record field whose records stay on one side of the split.
        packing: refused (a pair's sides must be whole rows); present so that a config saying so gets told.
    """

    json_path: Path | None = None
    val_split_fraction: float = 0.05
    prompt_style: str | None = None
    seed: int = 42
    num_workers: int = 0
    group_by: str | None = None
    packing: bool = False

    def __post_init__(self) -> None:
        if self.packing:
            raise ValueError(
                "packing=True is not supported for preference pairs: the chosen and rejected sides of a pair are "
                "summed as whole rows, in --data.packing; leave it false"
            )
        if self.json_path is not None:
            self.json_path = Path(self.json_path).expanduser()
            if not self.json_path.is_file():
                raise FileNotFoundError(
                    f"{self.json_path} does not exist, in --data.json_path; point it at a .json or .jsonl file of pairs"
                )
        if not 0.0 <= self.val_split_fraction < 1.0:
            raise ValueError(f"val_split_fraction must be in [0, 1), got {self.val_split_fraction}.")
        if self.prompt_style not in STYLE_NAMES:
            raise ValueError(f"Unknown prompt_style {self.prompt_style!r}: use 'alpaca' or 'chat_template'.")
        self.style: PromptStyle | None = None
        self.stats: dict[str, dict[str, int]] = {}
        self.records: dict[str, list[Record]] = {}  # the chosen conversations per split (prompts to sample from)
        self._examples: dict[str, list[Example]] | None = None
        self._keys: dict[str, str] = {}

    def select_prompt_style(self, tokenizer_dir: Path | None) -> PromptStyle:
        self.style = resolve_prompt_style(tokenizer_dir, self.prompt_style)
        return self.style

    def source(self) -> Path:
        if self.json_path is None:
            raise ValueError("Preferences needs json_path, in --data.json_path; point it at a .json or .jsonl file")
        return self.json_path

    def training_files(self) -> list[Path]:
        return [self.source()]

    def prepare_data(self) -> None:
        self.source()

    def setup(self) -> None:
        if self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__}.connect(tokenizer, batch_size, max_seq_length) was not called.")
        if self.style is None:
            self.select_prompt_style(None)
        pairs = read_pairs(self.source(), self.group_by)
        held_out = split_groups([p.group for p in pairs], self.val_split_fraction, self.seed)
        self._examples, self.stats, self.records = {}, {}, {}
        for split in ("train", "val"):
            chosen = [p for p in pairs if (p.group in held_out) == (split == "val")]
            examples, stats = self._tokenize(chosen)
            self._examples[split], self.stats[split] = examples, stats
            self.records[split] = [Record(p.chosen, p.where, p.group) for p in chosen]
        if not self._examples["train"]:
            raise ValueError(
                f"no training pair fits max_seq_length={self.max_seq_length}: all {self.stats['train']['dropped']} "
                f"lose every reply token on one side when cut to {self.max_seq_length + 1} tokens; raise "
                "--train.max_seq_length or use shorter records"
            )

    def _tokenize(self, pairs: list[Pair]) -> tuple[list[Example], dict[str, int]]:
        """Examples [c0, r0, c1, r1, ...] of the pairs kept, and the counts: pairs, truncated, dropped."""
        as_records = [Record(p.chosen, p.where, p.group) for p in pairs] + [
            Record(p.rejected, p.where, p.group) for p in pairs
        ]
        encoded = encode(as_records, self.style, self.tokenizer, self.max_seq_length, True, last_reply_only=True)
        n = len(pairs)
        examples: list[Example] = []
        truncated = dropped = 0
        for (chosen, cut_c), (rejected, cut_r) in zip(encoded[:n], encoded[n:], strict=True):
            if chosen is None or rejected is None:
                dropped += 1
                continue
            truncated += cut_c or cut_r
            examples += [chosen, rejected]
        return examples, {"pairs": len(examples) // 2, "truncated": truncated, "dropped": dropped}

    def examples(self, split: str) -> list[Example]:
        """[chosen 0, rejected 0, chosen 1, ...] of "train" or "val" (after setup)."""
        if self._examples is None:
            raise RuntimeError(f"Call {type(self).__name__}.setup() before asking for its loaders.")
        return self._examples[split]

    def pair_loader(self, split: str) -> ExampleLoader:
        """Every pair of ``split`` in order, on this rank alone (the reference pass walks them all)."""
        return ExampleLoader(self.examples(split), self.batch_size, self._pad_id(), shuffle=False, drop_last=False,
                             rank=0, world_size=1, pairs=True)  # fmt: skip

    def train_dataloader(self) -> ExampleLoader:
        loader = ExampleLoader(self.examples("train"), self.batch_size, self._pad_id(), seed=self.seed, pairs=True)
        if len(loader) == 0:
            raise ValueError(
                f"The {loader.units} training pairs give no full batch of {self.batch_size} pairs on each of "
                f"{loader.world_size} ranks: lower batch_size or add pairs."
            )
        return loader

    def val_dataloader(self) -> ExampleLoader | None:
        if not self.examples("val"):
            return None
        return self.pair_loader("val")

    def summary(self) -> str:
        return split_summary(self, "pairs", " pairs")

    def fingerprint(self, split: str) -> str:
        """A hash of a split's token pairs (ids and target masks, in order): what a reference table is keyed by."""
        return fingerprint(self.examples(split))

    def _pad_id(self) -> int:
        assert self.tokenizer is not None
        return self.tokenizer.eos_id


# --- the embedded default: pairs from the standard library ------------------------------------------------------

FORMAT_VERSION = 1
_PAIRS = "pairs.jsonl"


def stdlib_pairs(records: list[dict[str, str]]) -> list[dict[str, str]]:
    """Preference pairs from PythonDocstrings records (``instruction``, ``output``, ``file``): the prompt asks for
    a function, chosen is its real source. Rejected alternates between two kinds, record by record:

    - the source of another function of the same file, the one closest in length (a plausible, wrong answer);
    - the real source with its body lines in reverse order (right tokens, broken program), when it has at least
      three body lines and that changes it.

    A record with neither (the only function of its file, and too short to reverse) gives no pair.
    """
    by_file: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_file.setdefault(r["file"], []).append(i)
    pairs = []
    for k, r in enumerate(records):
        real = r["output"]
        lines = real.split("\n")
        body = lines[1:]
        reversed_copy = "\n".join([lines[0], *body[::-1]]) if len(body) >= 3 else real
        others = [records[j]["output"] for j in by_file[r["file"]] if records[j]["output"] != real]
        other = min(others, key=lambda o: (abs(len(o) - len(real)), o)) if others else None
        candidates = [other, reversed_copy] if k % 2 == 0 else [reversed_copy, other]
        rejected = next((c for c in candidates if c is not None and c != real), None)
        if rejected is None:
            continue
        pairs.append({"prompt": r["instruction"], "chosen": real, "rejected": rejected, "file": r["file"]})
    return pairs


@dataclass
class PythonPreferences(Preferences):
    """The embedded preference set: :func:`stdlib_pairs` of the standard library's documented functions (no
    download), split into train/val by source file, built once into a cache entry.

    Args (besides Preferences'): max_pairs, max_response_chars, max_docstring_chars (as PythonDocstrings),
    cache_dir (default ``<cache root>/preferences``).
    """

    group_by: str | None = "file"
    max_pairs: int = 3000
    max_response_chars: int = 400
    max_docstring_chars: int = 300
    cache_dir: Path | None = None

    def source(self) -> Path:
        if self.json_path is not None:
            return self.json_path
        settings = {
            "format": FORMAT_VERSION,
            "max_pairs": self.max_pairs,
            "max_response_chars": self.max_response_chars,
            "max_docstring_chars": self.max_docstring_chars,
        }
        docstrings = PythonDocstrings(
            max_examples=self.max_pairs, max_response_chars=self.max_response_chars,
            max_docstring_chars=self.max_docstring_chars, cache_dir=self.cache_dir,
        )  # fmt: skip
        records_file = docstrings.source()
        settings["records"] = records_file.parent.name  # the docstring records' own cache key
        root = Path(self.cache_dir).expanduser() if self.cache_dir is not None else cache_root() / "preferences"
        entry = root / f"stdlib-pairs-{json_digest(settings)[:24]}"
        if not (entry / _PAIRS).is_file():
            start = time.perf_counter()
            records = [json.loads(line) for _, line in jsonl_lines(records_file) if line.strip()]
            pairs = stdlib_pairs(records)
            with publish_dir(entry) as tmp:
                (tmp / _PAIRS).write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
                meta = {**settings, "pairs": len(pairs), "seconds": round(time.perf_counter() - start, 2)}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return entry / _PAIRS

    def training_files(self) -> list[Path]:
        return PythonDocstrings(max_examples=self.max_pairs, cache_dir=self.cache_dir).training_files()
