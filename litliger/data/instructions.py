"""Instruction data for finetuning: JSON records -> prompt-masked token examples -> padded, resumable batches.

A record is an Alpaca triple `{"instruction", "input" (optional), "output"}` or a chat `{"messages":
[{"role", "content"}, ...]}`. Both become a conversation (an Alpaca record: one user message with the
instruction and input, one assistant message with the output), which the prompt style (see prompts.py)
renders into prompt and response pieces. Pieces are tokenized separately, as generation will tokenize
the prompt alone; response tokens (with the EOS or end-of-turn token that ends them) are the targets,
prompt targets are -100 when `mask_prompt`.

An example is `ids = prompt + response`, at most max_seq_length + 1 tokens (longer ones are cut from
the right); inputs are `ids[:-1]`, targets `ids[1:]`. An example left without any target is dropped.
Everything happens in memory in `setup()`: tokenizing tens of thousands of records takes seconds.
"""

from __future__ import annotations

import codecs
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from litliger.data.base import DataModule
from litliger.data.example_loader import Example, ExampleLoader
from litliger.data.packing import pack
from litliger.data.prompts import (
    STYLE_NAMES,
    PromptStyle,
    RecordError,
    bos_ids,
    check_messages,
    resolve_prompt_style,
)
from litliger.data.tokenizer import Tokenizer

_PACKING_STREAM = 0x7061636B  # the packing order's seed stream, apart from the split's and the epochs'
_FIX_RECORD = 'give {"instruction", "input" (optional), "output"} or {"messages": [{"role", "content"}, ...]}'


@dataclass(frozen=True)
class Record:
    """One conversation and where it came from (`file:line` or `file[index]`), for errors and the split."""

    messages: list[dict[str, Any]]
    where: str
    group: str  # records of one group land on the same side of the train/val split


def read_records(path: Path, group_by: str | None = None) -> list[Record]:
    """The records of a `.json` (a list) or `.jsonl` file; malformed ones raise with file and line/index."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: point json_path at a .json or .jsonl file of records.")
    if path.suffix == ".jsonl":
        raw = [(f"{path}:{n}", _loads(line, f"{path}:{n}")) for n, line in jsonl_lines(path) if line.strip()]
    elif path.suffix == ".json":
        items = _loads(utf8_text(path.read_bytes(), path), str(path), line_of_error=True)
        if not isinstance(items, list):
            raise ValueError(
                f"the top level is a {type(items).__name__}, not a list, in {path}; "
                "give a JSON list of records, or one record per line in a .jsonl file"
            )
        raw = [(f"{path}[{i}]", item) for i, item in enumerate(items)]
    else:
        raise ValueError(f"{path} is neither .json nor .jsonl: give a JSON list of records or one record per line.")
    if not raw:
        raise ValueError(f"no records in {path}; add instruction records to it")
    records = []
    for i, (where, item) in enumerate(raw):
        try:
            messages = to_messages(item)
            group = str(item[group_by]) if group_by is not None and group_by in item else str(i)
        except RecordError as e:
            raise ValueError(f"{e.what}, in {where}; {e.fix}") from None
        records.append(Record(messages, where, group))
    return records


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a JSON Lines file, split on "\\n" only (a trailing "\\r" dropped).

    Not `str.splitlines`, which also splits at U+2028, U+2029, U+0085 and other characters that a JSON string
    may hold as they are. A line that is not UTF-8 is a ValueError naming the file and the line.
    """
    lines = _without_bom(path.read_bytes()).split(b"\n")
    if lines[-1] == b"":  # what follows the last newline
        lines.pop()
    for n, line in enumerate(lines, start=1):
        yield n, utf8_text(line.removesuffix(b"\r"), path, line=n)


def utf8_text(data: bytes, path: Path, line: int | None = None) -> str:
    """`data` (the whole file `path` (a leading BOM dropped), or its line number `line`) decoded as UTF-8; bytes
    that are not UTF-8 are a ValueError naming the file and the line and byte of the first bad one."""
    if line is None:
        data = _without_bom(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        start = e.start
        if line is None:  # the whole file: find the line
            line = data.count(b"\n", 0, e.start) + 1
            start = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise ValueError(
            f"not UTF-8 text (byte 0x{data[e.start]:02x} at position {start + 1} of the line: {e.reason}), "
            f"in {path}:{line}; save the file as UTF-8"
        ) from None


def _without_bom(data: bytes) -> bytes:
    return data.removeprefix(codecs.BOM_UTF8)


def to_messages(item: Any) -> list[dict[str, Any]]:
    """The conversation of one record (Alpaca or chat); a RecordError says what is wrong with it."""
    if not isinstance(item, dict):
        raise RecordError(f"the record is a {type(item).__name__}, not an object", _FIX_RECORD)
    if "messages" in item:
        messages = check_messages(item["messages"])
        if "assistant" not in (m["role"] for m in messages):
            raise RecordError("the conversation has no assistant message", "end it with the assistant's reply")
        return messages
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        if required and key not in item:
            raise RecordError(f"missing field '{key}'", _FIX_RECORD)
        if item.get(key) is not None and not isinstance(item[key], str):
            raise RecordError(f"field '{key}' is a {type(item[key]).__name__}, not a string", "give it as a string")
    instruction, extra = item["instruction"], item.get("input") or ""
    # The content is what a chat template shows; the Alpaca style reads instruction and input separately.
    user = {"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}
    user.update(instruction=instruction, input=extra)
    return [user, {"role": "assistant", "content": item["output"]}]


def tokenize(
    records: list[Record], style: PromptStyle, tokenizer: Tokenizer, max_seq_length: int, mask_prompt: bool
) -> tuple[list[Example], dict[str, int]]:
    """Examples of `records` and their counts: kept (`examples`), kept but cut (`truncated`), `dropped`."""
    examples, truncated, dropped = [], 0, 0
    for example, cut in encode(records, style, tokenizer, max_seq_length, mask_prompt):
        if example is None:
            dropped += 1
            continue
        truncated += cut
        examples.append(example)
    return examples, {"examples": len(examples), "truncated": truncated, "dropped": dropped}


def encode(
    records: list[Record],
    style: PromptStyle,
    tokenizer: Tokenizer,
    max_seq_length: int,
    mask_prompt: bool,
    last_reply_only: bool = False,
) -> list[tuple[Example | None, bool]]:
    """``(example, cut)`` per record, in order: the example cut from the right to max_seq_length + 1 tokens
    (``cut`` says whether it was), or None when nothing of its response is left to learn from.
    ``last_reply_only``: earlier assistant replies of a conversation are context, not targets (preference pairs
    compare the last reply alone)."""
    pieces = []
    for r in records:
        try:
            pieces.append(style.segments(r.messages))
        except RecordError as e:
            raise ValueError(f"{e.what}, in {r.where}; {e.fix}") from None
    texts = [s.text for segments in pieces for s in segments]
    encoded = iter(tokenizer.encode_batch(texts, eos=False, bos=False) if texts else [])
    out: list[tuple[Example | None, bool]] = []
    for segments in pieces:
        ids = bos_ids(tokenizer, segments[0].text)
        trained = [not mask_prompt] * len(ids)
        last = max((i for i, s in enumerate(segments) if s.trained), default=-1)
        for i, s in enumerate(segments):
            part = next(encoded) + ([tokenizer.eos_id] if s.eos else [])
            ids += part
            target = s.trained and (i == last or not last_reply_only)
            trained += [target or not mask_prompt] * len(part)
        cut = len(ids) > max_seq_length + 1
        ids, trained = ids[: max_seq_length + 1], trained[: max_seq_length + 1]
        if not any(trained[1:]):  # nothing left to learn from (the first token is never a target)
            out.append((None, cut))
            continue
        out.append((Example(np.asarray(ids, dtype=np.int32), np.asarray(trained, dtype=bool)), cut))
    return out


def split_groups(groups: list[str], fraction: float, seed: int) -> set[str]:
    """The held-out groups: `fraction` of them (at least one, never all), drawn by `seed`."""
    unique = list(dict.fromkeys(groups))
    if fraction == 0 or len(unique) < 2:
        return set()
    n_val = min(max(1, round(fraction * len(unique))), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[i] for i in order[:n_val]}


@dataclass
class Instructions(DataModule):
    """Instruction-finetuning data from a `.json` / `.jsonl` file of Alpaca or chat records.

    Args:
        json_path: the records: a JSON list (`.json`) or one JSON object per line (`.jsonl`).
        val_split_fraction: share of the records held out for validation (at least one when there are two
            or more; 0: no validation), drawn by `seed`.
        mask_prompt: train on the responses only (prompt targets are -100); False trains on every token.
        prompt_style: "alpaca", "chat_template" or None (the tokenizer's chat template when it has one, else
            alpaca); resolved against a tokenizer folder by `select_prompt_style`.
        seed: seed of the split and of the per-epoch shuffle.
        num_workers: accepted for configs shared with TextFiles; batches are collated in memory, in the main
            process, so there is nothing for workers to do.
        group_by: a record field (e.g. a source file) whose records stay on one side of the split.
        packing: pack the training examples into rows of max_seq_length positions, each example its own
            document (no attention across examples, positions restart), instead of padding every batch to its
            longest example (litliger/data/packing.py). Validation batches stay unpacked, so val_loss is
            comparable between packed and unpacked runs.
    """

    json_path: Path
    val_split_fraction: float = 0.05
    mask_prompt: bool = True
    prompt_style: str | None = None
    seed: int = 42
    num_workers: int = 0
    group_by: str | None = None
    packing: bool = False

    def __post_init__(self) -> None:
        if self.json_path is not None:
            self.json_path = Path(self.json_path).expanduser()
        if not 0.0 <= self.val_split_fraction < 1.0:
            raise ValueError(f"val_split_fraction must be in [0, 1), got {self.val_split_fraction}.")
        if self.prompt_style not in STYLE_NAMES:
            raise ValueError(
                f"Unknown prompt_style {self.prompt_style!r}: use 'alpaca' or 'chat_template', or leave it unset."
            )
        if self.json_path is not None and not self.json_path.is_file():  # checked at parse time, before any work
            raise FileNotFoundError(
                f"{self.json_path} does not exist, in --data.json_path; point it at a .json or .jsonl file"
            )
        self.style: PromptStyle | None = None  # set by select_prompt_style (or assigned), else resolved in setup
        self.stats: dict[str, dict[str, int]] = {}
        self.records: dict[str, list[Record]] = {}  # per split, after setup (e.g. prompts to sample from)
        self._examples: dict[str, list[Example]] | None = None
        self._rows: list[list[int]] | None = None  # the packed training rows, after setup

    def select_prompt_style(self, tokenizer_dir: Path | None) -> PromptStyle:
        """Resolve `prompt_style` against the tokenizer folder of the base model; the recipe saves the result."""
        self.style = resolve_prompt_style(tokenizer_dir, self.prompt_style)
        return self.style

    def source(self) -> Path:
        """The records file (subclasses that build their records return the built file)."""
        if not self.json_path.is_file():
            raise FileNotFoundError(
                f"{type(self).__name__}.json_path: {self.json_path} does not exist; point it at a .json or .jsonl "
                "file of instruction records."
            )
        return self.json_path

    # ---------------------------------------------------------------- DataModule

    def training_files(self) -> list[Path]:
        return [self.source()]

    def prepare_data(self) -> None:
        self.source()  # fails early (on rank 0) when the file is missing; PythonDocstrings builds it here

    def setup(self) -> None:
        if self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__}.connect(tokenizer, batch_size, max_seq_length) was not called.")
        if self.style is None:
            self.select_prompt_style(None)
        records = read_records(self.source(), self.group_by)
        held_out = split_groups([r.group for r in records], self.val_split_fraction, self.seed)
        self._examples, self.stats, self.records = {}, {}, {}
        for split in ("train", "val"):
            chosen = [r for r in records if (r.group in held_out) == (split == "val")]
            examples, stats = tokenize(chosen, self.style, self.tokenizer, self.max_seq_length, self.mask_prompt)
            self._examples[split], self.stats[split], self.records[split] = examples, stats, chosen
        if not self._examples["train"]:
            raise ValueError(
                f"no example fits max_seq_length={self.max_seq_length}: all {self.stats['train']['dropped']} "
                f"training examples of {self.source()} lose every response token when cut to "
                f"{self.max_seq_length + 1} tokens; raise --train.max_seq_length or use shorter records."
            )
        self._rows = self.packed_rows() if self.packing else None
        if self.num_workers:
            warnings.warn(f"{type(self).__name__} collates in memory: num_workers is ignored.", stacklevel=2)

    def packed_rows(self) -> list[list[int]]:
        """The training examples packed into rows of max_seq_length positions: indices into
        ``examples("train")``, packed in an order shuffled by ``seed`` (``packing.pack``)."""
        examples = self.examples("train")
        order = np.random.default_rng([self.seed, _PACKING_STREAM]).permutation(len(examples))
        rows = pack([len(examples[i].ids) - 1 for i in order], self.max_seq_length)
        return [[int(order[j]) for j in row] for row in rows]

    def train_dataloader(self) -> ExampleLoader:
        loader = self._train_loader(self._rows)
        if len(loader) == 0:
            what = f"{len(loader.rows)} packed rows" if loader.rows is not None else "training examples"
            raise ValueError(
                f"The {len(loader.examples)} {what} give no full batch of {self.batch_size} on each of "
                f"{loader.world_size} ranks: lower batch_size or add records."
            )
        return loader

    def _train_loader(self, rows: list[list[int]] | None) -> ExampleLoader:
        return ExampleLoader(
            self.examples("train"), self.batch_size, self._pad_id(), seed=self.seed, rows=rows,
            row_width=self.max_seq_length,  # packed rows: one shape for every batch
        )  # fmt: skip

    def padding_report(self) -> str:
        """One line: the share of padding in the first epoch's training batches, unpacked and packed."""
        rows = self._rows if self._rows is not None else self.packed_rows()
        unpacked, packed = self._train_loader(None), self._train_loader(rows)
        return (
            f"padding: {unpacked.padding_fraction():.1%} of the positions of unpacked batches, "
            f"{packed.padding_fraction():.1%} packed ({len(unpacked.examples)} examples in {len(rows)} rows of "
            f"<= {self.max_seq_length}); this run " + ("packs" if self.packing else "pads (--data.packing true packs)")
        )

    def val_dataloader(self) -> ExampleLoader | None:
        examples = self.examples("val")
        if not examples:
            return None
        # the whole split on every rank: the engine shares its batches (litliger.data.base.rank_share)
        return ExampleLoader(examples, self.batch_size, self._pad_id(), shuffle=False, drop_last=False, rank=0,
                             world_size=1)  # fmt: skip

    # ---------------------------------------------------------------- reporting

    def summary(self) -> str:
        """One line for the recipe to print: examples per split, and what max_seq_length cut or dropped."""
        return split_summary(self, "examples", "")

    def examples(self, split: str) -> list[Example]:
        """The tokenized examples of "train" or "val" (after setup)."""
        if self._examples is None:
            raise RuntimeError(f"Call {type(self).__name__}.setup() before asking for its loaders.")
        return self._examples[split]

    def _pad_id(self) -> int:
        assert self.tokenizer is not None
        return self.tokenizer.eos_id


def _loads(text: str, where: str, line_of_error: bool = False) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"{where}:{e.lineno}" if line_of_error else where
        raise ValueError(f"invalid JSON ({e.msg}), in {at}; fix or remove that record") from None


def split_summary(data: DataModule, unit: str, label: str) -> str:
    """The one-line summary of a module with ``stats`` per split (``unit``: the count's key, ``label`` the word
    after it, e.g. " pairs"), its source, prompt style and max_seq_length."""
    if not data.stats:
        return f"{type(data).__name__}: not set up"
    style = data.style.name if data.style is not None else "?"
    parts = [
        f"{split} {s[unit]}{label} ({s['truncated']} truncated, {s['dropped']} dropped)"
        for split, s in data.stats.items()
    ]
    return (
        f"{type(data).__name__} from {data.source()}, prompt style {style}, max_seq_length "
        f"{data.max_seq_length}: " + ", ".join(parts)
    )
