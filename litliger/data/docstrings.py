"""The embedded finetuning set: "write this function" instructions from the Python standard library's source.

Every function and method with a docstring becomes a record: the instruction gives its signature and
docstring, the response is its source without the docstring. Like PythonStdlib it needs no download
and is fixed for an installation. Short functions only (`max_response_chars`), so that a debug
finetune with max_seq_length 128-256 keeps most examples whole. Parsing the standard library takes
seconds, so the records are built once into a `.jsonl` cache entry named by the Python build, the
stdlib folder and the settings; later runs read it.
"""

from __future__ import annotations

import ast
import json
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from litliger.data.cache import cache_root, json_digest, publish_dir
from litliger.data.instructions import Instructions, jsonl_lines
from litliger.data.stdlib import PythonStdlib, stdlib_dir

FORMAT_VERSION = 1
_RECORDS = "records.jsonl"
_Function = ast.FunctionDef | ast.AsyncFunctionDef


@dataclass
class PythonDocstrings(Instructions):
    """Instruction pairs from the standard library (see the module docstring), split into train/val by file.

    Files are read top-level modules first, then packages, each group sorted by path (as PythonStdlib
    orders them), functions in source order, until `max_examples` records or `max_files` files.

    Args (besides Instructions'):
        max_examples: stop after this many records.
        max_response_chars: skip functions whose source (without docstring) is longer.
        max_docstring_chars: skip functions whose docstring is longer.
        max_files: read at most this many files (None: all).
        cache_dir: where the records are cached; default `<cache root>/instructions`.
    """

    json_path: Path | None = None  # None: the built records (a path reads a previously exported file)
    group_by: str | None = "file"
    max_examples: int = 3000
    max_response_chars: int = 500
    max_docstring_chars: int = 300
    max_files: int | None = None
    cache_dir: Path | None = None

    def source(self) -> Path:
        if self.json_path is not None:
            return self.json_path
        settings = {
            "format": FORMAT_VERSION,
            "python": sys.version,
            "stdlib": str(stdlib_dir()),
            "max_examples": self.max_examples,
            "max_response_chars": self.max_response_chars,
            "max_docstring_chars": self.max_docstring_chars,
            "max_files": self.max_files,
        }
        root = Path(self.cache_dir).expanduser() if self.cache_dir is not None else cache_root() / "instructions"
        entry = root / f"docstrings-{json_digest(settings)[:24]}"
        if not (entry / _RECORDS).is_file():
            start = time.perf_counter()
            records = list(self._build())
            with publish_dir(entry) as tmp:
                (tmp / _RECORDS).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
                meta = {**settings, "records": len(records), "seconds": round(time.perf_counter() - start, 2)}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return entry / _RECORDS

    def training_files(self) -> list[Path]:
        """The standard-library files the records come from (a tokenizer is better trained on code than JSON)."""
        names = dict.fromkeys(json.loads(line)["file"] for _, line in jsonl_lines(self.source()) if line.strip())
        return [stdlib_dir() / n for n in names]

    def _build(self) -> Iterator[dict[str, str]]:
        root = stdlib_dir()
        files = PythonStdlib(max_bytes=None, val_split_fraction=0.0).training_files()
        files.sort(key=lambda f: (len(f.relative_to(root).parts) > 1, f.relative_to(root).as_posix()))
        count = 0
        for f in files[: self.max_files]:
            for record in file_records(
                f.read_text(encoding="utf-8"), self.max_response_chars, self.max_docstring_chars
            ):
                yield {**record, "file": f.relative_to(root).as_posix()}
                count += 1
                if count >= self.max_examples:
                    return


def file_records(source: str, max_response_chars: int, max_docstring_chars: int) -> Iterator[dict[str, str]]:
    """`{"instruction", "output"}` for the top-level functions and class methods of one module's source."""
    with warnings.catch_warnings():  # old stdlib modules hold invalid escape sequences
        warnings.simplefilter("ignore")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            return
    # ast numbers lines at "\n" only (the text was read with universal newlines); str.splitlines would also
    # split at a form feed, U+2028 and the like and shift every line after one
    lines = [line + "\n" for line in source.split("\n")]
    for node in tree.body:
        if isinstance(node, _Function):
            candidates = [(node, None)]
        elif isinstance(node, ast.ClassDef):
            candidates = [(m, node.name) for m in node.body if isinstance(m, _Function)]
        else:
            continue
        for fn, owner in candidates:
            docstring = ast.get_docstring(fn)
            if not docstring or len(docstring) > max_docstring_chars:
                continue
            response = _without_docstring(fn, lines)
            if response is None or len(response) > max_response_chars:
                continue
            signature = f"{fn.name}({ast.unparse(fn.args)})" + (f" -> {ast.unparse(fn.returns)}" if fn.returns else "")
            what = f"method `{signature}` of the class `{owner}`" if owner else f"function `{signature}`"
            yield {"instruction": f"Write the Python {what}:\n\n{docstring}", "output": response}


def _without_docstring(fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """The function's source (decorators included, dedented) without its docstring lines, or None when the
    docstring shares a line with other code or nothing but the docstring is left."""
    doc = fn.body[0]
    if len(fn.body) < 2 or doc.lineno == fn.lineno or fn.body[1].lineno == doc.end_lineno:
        return None
    if lines[doc.lineno - 1][: doc.col_offset].strip() or lines[doc.end_lineno - 1][doc.end_col_offset :].strip():
        return None
    start = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
    kept = lines[start - 1 : doc.lineno - 1] + lines[doc.end_lineno : fn.end_lineno]
    text = textwrap.dedent("".join(kept)).rstrip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ast.parse(text)
        except SyntaxError:
            return None
    return text
