"""``litliger evaluate``: mean loss and perplexity of a checkpoint over a data module's validation split, and
the scoring functions an ``lm_eval`` model needs (``LitligerLM``, only when lm-evaluation-harness is installed).

The loss is the summed next-token cross-entropy over every target token of the split (a text corpus: every
token after the first of each block; instruction data: the response tokens, prompts masked as in training)
divided by their count; perplexity is its exp. The validation loader is not shuffled, so two runs agree.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import DataModule, Instructions, PythonStdlib
from .engine.args import check_positive
from .generate import Precision, load_for_inference, recorded_prompt_style


@torch.no_grad()
def split_loss(model: nn.Module, loader, *, device: str | torch.device, max_batches: int | None = None) -> dict:
    """Summed loss, target count and batches over ``loader``: token blocks (B, T + 1) or instruction batches
    (``input_ids`` and ``targets`` with -100 where nothing is predicted)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = batches = 0
    for batch in loader:
        if max_batches is not None and batches >= max_batches:
            break
        if isinstance(batch, dict):
            idx, targets = batch["input_ids"].to(device), batch["targets"].to(device)
        else:
            batch = batch.to(device)
            idx, targets = batch[:, :-1], batch[:, 1:]
        total += model(idx, targets=targets, reduction="sum").double()
        count += int((targets != -100).sum())
        batches += 1
    return {"loss_sum": total.item(), "tokens": count, "batches": batches}


def main(
    checkpoint_dir: Path,
    data: DataModule | None = None,
    max_seq_length: int | None = None,
    batch_size: int = 4,
    max_batches: int | None = None,
    out_file: Path | None = None,
    precision: Precision = "auto",
    device: str = "auto",
) -> dict[str, Any]:
    """``litliger evaluate``: the checkpoint's mean loss and perplexity on ``data``'s validation split, as JSON
    on stdout and in ``out_file``.

    Args:
        checkpoint_dir: a checkpoint folder or a finetuning step folder, with its tokenizer.
        data: any DataModule with a validation split; default the embedded corpus (the standard library).
            Instruction data is formatted by the finetune's saved prompt style when the checkpoint has one.
        max_seq_length: tokens per sequence (default the model's block_size).
        batch_size: sequences per forward.
        max_batches: evaluate only the first N batches (default all).
        out_file: also write the JSON here.
        precision: the weights' dtype (auto: bf16-true on GPUs that support it, else 32-true).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    """
    check_positive("batch_size", batch_size, "set how many sequences go in one forward")
    check_positive("max_seq_length", max_seq_length, "set the tokens per sequence", optional=True)
    check_positive("max_batches", max_batches, "set a number of batches, or leave it unset for all", optional=True)
    data = data if data is not None else PythonStdlib()
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
    if isinstance(data, Instructions):
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
        "batches": sums["batches"],
        "tokens": sums["tokens"],
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "seconds": round(time.perf_counter() - start, 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if out_file is not None:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(text + "\n")
    return result


def _no_val_split(data: DataModule) -> ValueError:
    return ValueError(
        f"{type(data).__name__} has no validation split, in --data; set --data.val_split_fraction above 0"
    )


# --- scoring for lm-evaluation-harness ---------------------------------------------------------------------


@torch.no_grad()
def continuation_logprob(model: nn.Module, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log P(continuation | context) and whether every continuation token is the greedy choice. The context is
    cut from the left so that both fit the model (the continuation is scored whole)."""
    if not continuation:
        return 0.0, True
    ids = (context + continuation)[-(model.max_seq_length + 1) :]
    idx = torch.tensor([ids[:-1]], device=model.transformer.wte.weight.device)
    logprobs = torch.log_softmax(model(idx)[0, -len(continuation) :].float(), dim=-1)  # (n, V)
    target = torch.tensor(continuation, device=logprobs.device)
    total = logprobs.gather(1, target[:, None]).sum().item()
    return total, bool((logprobs.argmax(dim=-1) == target).all())


def rolling_logprob(model: nn.Module, ids: list[int], first: int) -> float:
    """log P(ids) of a whole text: the first token given ``first`` (BOS or EOS), then windows of the model's
    max_seq_length, each scoring only its own tokens with up to a window of context before them (lm_eval's
    loglikelihood_rolling)."""
    tokens, window, total = [first, *ids], model.max_seq_length, 0.0
    for start in range(0, len(ids), window):
        end = min(start + window, len(ids))
        # tokens[k] precedes ids[k]: the inputs tokens[end - window .. end - 1] predict ids[start:end]
        total += continuation_logprob(model, tokens[max(0, end - window) : start + 1], ids[start:end])[0]
    return total


def __getattr__(name: str):
    # LitligerLM subclasses lm_eval's LM: import lm_eval only when it is asked for
    if name == "LitligerLM":
        from .lm_eval_model import LitligerLM

        return LitligerLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
