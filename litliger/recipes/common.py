"""What the pretrain and finetune recipes share: the tokenizer, the data loaders, the end-of-run sample.

Each recipe reads ``setup -> main -> engine.fit``; the steps they have in common live here once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from ..data import DataModule, PromptStyle, Tokenizer
from ..engine import OptimizerArgs, PlanArgs, Progress, TrainArgs, is_fsdp, load_training_state, reshard
from ..engine.args import parse_bytes
from ..engine.memory_plan import Plan, format_plan, gib, plan_memory
from ..inference.generate import complete, respond
from ..inference.sampling import SampleArgs
from ..model.config import Config
from ..model.documents import attention_path


def resolve_tokenizer(
    fabric: L.Fabric, config: Config, *, tokenizer_dir: Path | None, checkpoints: list[Path | None], data: DataModule
) -> Tokenizer:
    """``tokenizer_dir``'s tokenizer, else the first checkpoint's that has one, else a byte-level BPE of
    ``config.vocab_size`` trained on the training data (rank 0 trains it; the others read the cache)."""
    if tokenizer_dir is not None:
        if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"tokenizer_dir {tokenizer_dir} holds no tokenizer.json, in --tokenizer_dir; name a folder that holds "
                "one (a checkpoint folder does), or leave it out to use the checkpoint's or train one"
            )
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
    elif source := next((c for c in checkpoints if c is not None and (Path(c) / "tokenizer.json").is_file()), None):
        tokenizer = Tokenizer.from_dir(source)
    else:
        with fabric.rank_zero_first(local=False):
            tokenizer = data.train_tokenizer(config.vocab_size)
    if tokenizer.vocab_size > config.padded_vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model {config.name!r} has only "
            f"{config.padded_vocab_size} embedding rows; use a model config with vocab_size >= {tokenizer.vocab_size}"
        )
    return tokenizer


def restore_progress(
    fabric: L.Fabric, resume_dir: Path | None, *, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[Progress, dict[str, Any] | None]:
    """The counters and the data position to continue from (a fresh run: zero and None); restores the
    optimizer and this rank's RNG from ``resume_dir``."""
    if resume_dir is None:
        return Progress(), None
    restored = load_training_state(fabric, resume_dir, model=model, optimizer=optimizer)
    progress = Progress(step=restored["state"]["step"], tokens=restored["state"]["tokens"])
    fabric.print(f"resumed from {resume_dir} at step {progress.step}")
    return progress, restored["dataloader"]


def data_loaders(
    fabric: L.Fabric,
    data: DataModule,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    loader_state: dict[str, Any] | None,
) -> tuple[Any, Any]:
    """Connect, prepare (each node's local rank 0 first) and set up ``data``; the training loader positioned
    at ``loader_state`` (a resume) and the validation loader (or None).

    With ``data.reset`` (``--data.reset true``) a resume keeps the model, optimizer and counters but starts
    the data from its beginning: a new phase with a new mixture.

    Preparing once per node serves a data cache on a node-local disk as well as one on a shared
    filesystem (there the first node publishes the cache entry and the others find it, or build the same
    entry and keep the first: entries are content-addressed and published atomically).
    """
    data.connect(tokenizer, batch_size=batch_size, max_seq_length=seq_len)
    if data.document_eos() is not None or getattr(data, "packing", False):
        with torch.enable_grad():  # training's attention path; refused now, before any work, when it cannot train
            path = attention_path(fabric.device)
        what = "packed examples" if getattr(data, "packing", False) else "documents (split at EOS)"
        fabric.print(f"document masking: attention stays inside {what}, positions restart at each ({path} attention)")
    with fabric.rank_zero_first(local=True):
        data.prepare_data()
    data.setup()
    train_loader = data.train_dataloader()
    position_loader(fabric, data, train_loader, loader_state)
    return train_loader, data.val_dataloader()


def position_loader(fabric: L.Fabric, data: DataModule, train_loader: Any, loader_state: dict[str, Any] | None) -> None:
    """Continue ``train_loader`` where a resumed run's ``loader_state`` left it (unless ``data.reset``)."""
    if loader_state is not None and data.reset:
        fabric.print("data.reset: the data starts from its beginning (the checkpoint's data position is not used)")
    elif loader_state is not None:
        train_loader.load_state_dict(loader_state)


def print_sample(
    fabric: L.Fabric,
    model: nn.Module,
    tokenizer: Tokenizer,
    sample: SampleArgs,
    *,
    prompt: str | None = None,
    seq_len: int,
    seed: int,
) -> str:
    """Sample ``sample.max_new_tokens`` tokens after ``prompt`` (default ``sample.prompt``) and print them."""
    text = complete(
        model,
        tokenizer,
        sample.prompt if prompt is None else prompt,
        sample.max_new_tokens,
        max_seq_length=seq_len,
        device=fabric.device,
        temperature=sample.temperature,
        top_k=sample.top_k,
        top_p=sample.top_p,
        seed=seed,
    )
    reshard(model)
    fabric.print(f"--- sample ---\n{text}\n---")
    return text


def print_response(
    fabric: L.Fabric,
    model: nn.Module,
    tokenizer: Tokenizer,
    style: PromptStyle,
    conversation: list[dict[str, str]],
    sample: SampleArgs,
    *,
    seq_len: int,
    seed: int,
) -> str:
    """Answer the last user turn of ``conversation`` as the finetune's prompt style formats it and print
    the instruction and the answer."""
    prompt_messages = conversation[:-1] if conversation[-1]["role"] == "assistant" else conversation
    answer = respond(
        model,
        tokenizer,
        style,
        prompt_messages,
        sample.max_new_tokens,
        max_seq_length=seq_len,
        device=fabric.device,
        temperature=sample.temperature,
        top_k=sample.top_k,
        top_p=sample.top_p,
        seed=seed,
    )
    reshard(model)
    fabric.print(f"--- held-out instruction ---\n{prompt_messages[-1]['content']}\n--- response ---\n{answer}\n---")
    return answer


# --- the memory plan of a run (engine/memory_plan.py; `litliger plan` is recipes/plan.py) ---------------------


PLANNABLE = ("32-true", "bf16-mixed", "bf16-true")


def kv_cache_bytes(config: Config, seq_len: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for one sequence of ``seq_len`` tokens (generation, batch 1)."""
    return 2 * config.n_layer * config.n_query_groups * config.head_size * seq_len * dtype_bytes


def device_memory(plan: PlanArgs, device: torch.device | None) -> int | None:
    """The memory a plan is held against: ``--plan.device_memory``, else ``device``'s when it is a GPU."""
    if plan.device_memory:
        return parse_bytes(plan.device_memory)
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def plan_run(
    config: Config,
    build: Callable[[], nn.Module],
    train: TrainArgs,
    optimizer: OptimizerArgs,
    *,
    precision: str,
    seq_len: int,
    strategy: str,
    world: int,
    memory: int | None,
    search: bool,
) -> Plan:
    """The memory plan of a run that builds its model with ``build`` (engine/memory_plan.py)."""
    if precision not in PLANNABLE:
        raise ValueError(f"precision={precision!r} cannot be planned, in --precision; use one of {PLANNABLE}")
    dtype_bytes = 4 if precision == "32-true" else 2
    result = plan_memory(
        build, micro_batch_size=train.micro_batch_size, seq_len=seq_len, vocab_size=config.padded_vocab_size,
        n_layer=config.n_layer, precision=precision, strategy=strategy, world_size=world,
        checkpointing=train.activation_checkpointing, optimizer=optimizer, device_memory=memory, search=search,
        kv_cache=kv_cache_bytes(config, seq_len, dtype_bytes),
    )  # fmt: skip
    result.settings["model"] = config.name
    return result


def does_not_fit(plan: Plan) -> str:
    s = plan.settings
    return (
        f"the memory plan does not fit: a peak of {gib(plan.per_device['peak'])} per device against "
        f"{gib(plan.device_memory)} (micro batch {s['micro_batch_size']} x {s['seq_len']}, "
        f"{s['activation_checkpointing']} checkpointing); lower --train.micro_batch_size, use "
        "--train.activation_checkpointing full, or --strategy fsdp on more devices"
    )


def report_memory_plan(
    fabric: L.Fabric,
    config: Config,
    build: Callable[[], nn.Module],
    *,
    train: TrainArgs,
    optimizer: OptimizerArgs,
    seq_len: int,
    plan: PlanArgs,
) -> None:
    """Print this run's memory plan; a plan that does not fit is a warning with the numbers (an error with
    ``--plan.strict``), before any work."""
    precision = fabric.litliger_precision
    if precision not in PLANNABLE:
        fabric.print(f"memory plan: not available for precision {precision}")
        return
    memory = device_memory(plan, fabric.device)
    strategy = "fsdp" if is_fsdp(fabric) else "ddp"
    result = plan_run(config, build, train, optimizer, precision=precision, seq_len=seq_len, strategy=strategy,
                      world=fabric.world_size, memory=memory, search=False)  # fmt: skip
    fabric.print(format_plan(result))
    if result.fits is False:
        if plan.strict:
            raise ValueError(does_not_fit(result) + ", in --plan.strict")
        fabric.print("warning: " + does_not_fit(result))
