"""``litliger evaluate``: mean loss and perplexity of a checkpoint over a data module's validation split, and
the scoring functions an ``lm_eval`` model needs (``LitligerLM``, only when lm-evaluation-harness is installed).

The loss is the summed next-token cross-entropy over every target token of the split (a text corpus: every
token after the first of each block; instruction data: the response tokens, prompts masked as in training)
divided by their count; perplexity is its exp. The validation loader is not shuffled, so two runs agree.

A checkpoint written by a training run holds ``run.yaml``: the run's data module and validation settings. By
default they are used, so the command reports the run's own validation loss for these weights (the same
batches: the first ``eval.max_iters`` batches of ``train.micro_batch_size`` sequences of the run's
``max_seq_length`` tokens); ``--data``, ``--max_seq_length``, ``--batch_size`` and ``--max_batches`` override
them. Only a ``litliger.data`` class is rebuilt from the record.

Preference pairs (a dpo/simpo/orpo run's data) are scored the same way: the next-token loss of both answers of
every held-out pair. That is not the run's preference val_loss (which needs the reference and the pairing), but
it is the same number for any objective, so runs compare on it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ..checkpoint.layout import RUN_FILE, run_name
from ..data import DataModule, Instructions, Preferences, PythonStdlib
from ..data.base import data_from_record, read_run_record
from ..inference.loading import Precision, load_for_inference, recorded_prompt_style
from ..util.checks import check_at_least, check_positive
from ..util.files import check_out_file, write_atomically
from .scoring import split_loss


def main(
    checkpoint_dir: Path,
    data: DataModule | None = None,
    max_seq_length: int | None = None,
    batch_size: int | None = None,
    max_batches: int | None = None,
    out_file: Path | None = None,
    precision: Precision = "auto",
    device: str = "auto",
    tasks: str | list[str] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
) -> dict[str, Any]:
    """``litliger evaluate``: the checkpoint's mean loss and perplexity on ``data``'s validation split, or with
    ``--tasks`` lm-evaluation-harness tasks (``pip install 'litliger[eval]'``).

    Printed as JSON on stdout, and written to ``out_file`` when given. With ``--tasks``: lm_eval's table, and its
    results JSON written to ``out_file`` (default ``out/evaluate/<checkpoint name>/results.json``).

    Args:
        checkpoint_dir: a checkpoint folder or a finetuning step folder, with its tokenizer.
        data: any DataModule with a validation split; default the run's (recorded in the checkpoint's run.yaml),
            else the embedded corpus (the standard library). Instruction data is formatted by the finetune's
            saved prompt style when the checkpoint has one.
        max_seq_length: tokens per sequence (default the run's, else the model's block_size).
        batch_size: sequences per forward (default the run's micro batch size, else 4).
        max_batches: evaluate only the first N batches (default: with the run's data, the run's
            eval.max_iters, so the loss is the run's val_loss; else all).
        out_file: also write the JSON here (checked before any work; written whole or not at all).
        precision: the weights' dtype (auto: bf16-true on GPUs that support it, else 32-true).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        tasks: lm_eval task names, local task YAML files or folders of them, separated by commas as lm_eval takes
            them (``--tasks hellaswag,arc_easy``) or a list; runs them instead of the perplexity evaluation.
        limit: with tasks: at most this many examples per task (a number below 1: that fraction).
        num_fewshot: with tasks: examples in each prompt (default: each task's own).
    """
    check_positive("batch_size", batch_size, "set how many sequences go in one forward", optional=True)
    check_positive("max_seq_length", max_seq_length, "set the tokens per sequence", optional=True)
    check_positive("max_batches", max_batches, "set a number of batches, or leave it unset for all", optional=True)
    if tasks is not None:
        from .tasks import run_tasks

        if data is not None or max_seq_length is not None or max_batches is not None:
            raise ValueError("--tasks evaluates lm_eval tasks; --data, --max_seq_length and --max_batches are for "
                             "the perplexity evaluation: leave them out")  # fmt: skip
        check_positive("limit", limit, "set how many examples per task (or a fraction below 1)", optional=True)
        if num_fewshot is not None:
            check_at_least("num_fewshot", num_fewshot, 0, "set how many examples each prompt shows, or leave it out")
        name = run_name(Path(checkpoint_dir)).replace("/", "-")
        out_file = Path(out_file or Path("out/evaluate") / name / "results.json")
        names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
        return run_tasks(Path(checkpoint_dir), names, out_file=out_file, limit=limit, num_fewshot=num_fewshot,
                         batch_size=batch_size, device=device, precision=precision)  # fmt: skip
    if limit is not None or num_fewshot is not None:
        raise ValueError("--limit and --num_fewshot are for lm_eval tasks; add --tasks, or leave them out")
    if out_file is not None:
        check_out_file(
            Path(out_file), "give the path of a file to write the JSON to"
        )  # before any work: a path that cannot be written would lose it all
    run = read_run_record(Path(checkpoint_dir))
    recorded = run["validation"] if run is not None else {}
    if data is None and run is not None and run.get("data") is not None:
        data = data_from_record(run["data"], Path(checkpoint_dir) / RUN_FILE)
        max_batches = max_batches or recorded.get("max_batches")  # the run's prefix of its own validation split
    data = data if data is not None else PythonStdlib()
    batch_size = batch_size or recorded.get("batch_size") or 4
    max_seq_length = max_seq_length or recorded.get("max_seq_length")
    if getattr(data, "val_split_fraction", None) == 0:
        raise _no_val_split(data)
    model, tokenizer, device = load_for_inference(checkpoint_dir, device, precision)
    block_size = model.config.block_size
    if max_seq_length is not None and max_seq_length > block_size:
        raise ValueError(
            f"max_seq_length={max_seq_length} exceeds the model's block_size={block_size}, in --max_seq_length; "
            f"use at most {block_size}"
        )
    seq_len = max_seq_length or block_size
    if isinstance(data, Instructions | Preferences):
        style = recorded_prompt_style(checkpoint_dir)
        if style is not None:
            data.style = style  # the finetune's format, exactly as it trained
        else:
            data.select_prompt_style(Path(checkpoint_dir))
    data.connect(tokenizer, batch_size=batch_size, max_seq_length=seq_len)
    data.prepare_data()
    data.setup()
    loader = data.val_dataloader()
    if loader is None:
        raise _no_val_split(data)
    start = time.perf_counter()
    per_source: dict[str, dict] = {}
    if isinstance(loader, dict):  # a Mixture: one validation loader per source
        for name, source_loader in loader.items():
            part = split_loss(model, source_loader, device=device, max_batches=max_batches)
            per_source[name] = {**part, "loss": part["loss_sum"] / max(part["tokens"], 1)}
        sums = {k: sum(p[k] for p in per_source.values()) for k in ("loss_sum", "tokens", "batches")}
    else:
        sums = split_loss(model, loader, device=device, max_batches=max_batches)
    if sums["tokens"] == 0:
        raise ValueError(
            f"the validation split of {type(data).__name__} has no target tokens, in --data; give more data"
        )
    loss = sums["loss_sum"] / sums["tokens"]
    result = {
        "checkpoint_dir": str(checkpoint_dir),
        "data": type(data).__name__,
        "split": "val",
        "max_seq_length": seq_len,
        "batch_size": batch_size,
        "max_batches": max_batches,
        "batches": sums["batches"],
        "tokens": sums["tokens"],
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if per_source:
        result["sources"] = {n: {"loss": p["loss"], "tokens": p["tokens"]} for n, p in per_source.items()}
    text = json.dumps(result, indent=2)
    print(text)
    if out_file is not None:
        write_atomically(Path(out_file), text + "\n")
    return result


def _no_val_split(data: DataModule) -> ValueError:
    return ValueError(
        f"{type(data).__name__} has no validation split, in --data; set --data.val_split_fraction above 0"
    )


# --- scoring for lm-evaluation-harness ---------------------------------------------------------------------


def __getattr__(name: str):
    """``litliger.eval.evaluate.LitligerLM``, imported on first use: it needs lm-evaluation-harness, which
    nothing else needs (without it, a ModuleNotFoundError that says how to install it)."""
    if name == "LitligerLM":
        from .lm_eval import LitligerLM

        return LitligerLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
