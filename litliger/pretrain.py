"""``litliger pretrain``: pretrain a GPT from scratch (or continue from a checkpoint) with Lightning Fabric.

setup (parse, build Fabric) -> main (config, tokenizer, model, optimizer, data, resume) -> engine.fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L

from .checkpoint import MODEL_FILE, load_model_weights, read_config, write_model_files
from .checksums import verify_checksums
from .config import Config
from .data import DataModule, PythonStdlib, infinite_batches
from .engine import (
    EvalArgs,
    FitSetup,
    OptimizerArgs,
    TrainArgs,
    build_optimizer,
    check_resumable,
    fit,
    make_fabric,
    make_loggers,
    on_rank_zero,
    resolve_resume_on_all_ranks,
    setup_model,
    training_session,
    unwrap,
)
from .generate import SampleArgs
from .model import GPT
from .recipe import data_loaders, print_sample, resolve_tokenizer, restore_progress


def setup(
    model_name: str | None = None,
    model_config: Config | None = None,
    out_dir: Path = Path("out/pretrain"),
    precision: Literal["bf16-mixed", "bf16-true", "16-true", "32-true"] | None = None,
    initial_checkpoint_dir: Path | None = None,
    resume: bool | Literal["auto"] | Path = False,
    data: DataModule | None = None,
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    optimizer: OptimizerArgs = OptimizerArgs(),
    devices: int = 1,
    num_nodes: int = 1,
    accelerator: Literal["auto", "cpu", "cuda", "gpu"] = "auto",
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    tokenizer_dir: Path | None = None,
    logger: Literal["csv", "tensorboard", "wandb"] = "csv",
    seed: int = 42,
    sample: SampleArgs = SampleArgs(),
    compile: bool = False,
) -> Path:
    """Pretrain a model.

    Args:
        model_name: a name from the config registry (``litliger.configs.CONFIGS``).
        model_config: a full model config instead of ``model_name``.
        out_dir: where checkpoints (step-XXXXXXXX/, final/), metrics.jsonl and logs go.
        precision: default bf16-mixed on GPUs that support it, else 32-true.
        initial_checkpoint_dir: start from these weights (a litliger checkpoint folder), not from random init.
        resume: continue a run: ``auto`` (the newest complete checkpoint in out_dir, or a fresh start), a
            checkpoint folder, or false.
        data: a DataModule; default the embedded corpus (the Python standard library's source).
        tokenizer_dir: a folder with tokenizer.json; default the checkpoint's, else a byte-level BPE trained
            on the training data with the model's vocab_size.
        seed: seeds weight init (per parameter name), data order and every RNG.
        compile: run the model under ``torch.compile`` (off by default; the first steps pay for compiling).
    """
    out_dir = Path(out_dir)
    fabric = make_fabric(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        loggers=make_loggers(logger, out_dir, run_name=out_dir.name),
    )
    fabric.launch()
    return main(
        fabric,
        config=resolve_config(model_name, model_config, initial_checkpoint_dir),
        out_dir=out_dir,
        initial_checkpoint_dir=initial_checkpoint_dir,
        resume=resume,
        data=data if data is not None else PythonStdlib(),
        train=train,
        eval=eval,
        optimizer_args=optimizer,
        tokenizer_dir=tokenizer_dir,
        seed=seed,
        sample=sample,
        compile=compile,
    )


def resolve_config(model_name: str | None, model_config: Config | None, initial_checkpoint_dir: Path | None) -> Config:
    if model_name is not None and model_config is not None:
        raise ValueError("give either model_name or model_config, not both")
    if initial_checkpoint_dir is not None:
        config = read_config(initial_checkpoint_dir)
        if model_config is not None and model_config != config:
            raise ValueError(f"model_config differs from the config of initial_checkpoint_dir={initial_checkpoint_dir}")
        return config
    if model_config is not None:
        return model_config
    if model_name is not None:
        return Config.from_name(model_name)
    raise ValueError("say which model to train: --model_name NAME (see litliger.configs) or --model_config")


def main(
    fabric: L.Fabric,
    *,
    config: Config,
    out_dir: Path,
    initial_checkpoint_dir: Path | None,
    resume: bool | str | Path,
    data: DataModule,
    train: TrainArgs,
    eval: EvalArgs,
    optimizer_args: OptimizerArgs,
    tokenizer_dir: Path | None,
    seed: int,
    sample: SampleArgs,
    compile: bool = False,
) -> Path:
    seq_len = train.max_seq_length or config.block_size
    if seq_len > config.block_size:
        raise ValueError(
            f"train.max_seq_length={seq_len} exceeds the model's block_size={config.block_size}, in "
            "--train.max_seq_length; use a value <= block_size"
        )
    total = train.total_steps(train.global_batch_size * seq_len)
    train.gradient_accumulation_steps(fabric.world_size)  # bad batch sizes fail before any work is done
    with training_session(fabric, out_dir) as signals:
        resume_dir = resolve_resume_on_all_ranks(fabric, resume, out_dir)
        if resume_dir is not None:
            check_resumable(resume_dir, config, fabric.world_size)
        elif initial_checkpoint_dir is not None:
            on_rank_zero(fabric, lambda: verify_checksums(Path(initial_checkpoint_dir), training_state=False))
        fabric.seed_everything(seed)
        tokenizer = resolve_tokenizer(
            fabric, config, tokenizer_dir=tokenizer_dir, checkpoints=[resume_dir, initial_checkpoint_dir], data=data
        )

        def build() -> GPT:
            model = GPT(config)
            model.max_seq_length = seq_len
            return model

        load_from = resume_dir if resume_dir is not None else initial_checkpoint_dir
        model = setup_model(
            fabric,
            build,
            seed=seed,
            resuming=resume_dir is not None,
            load=(lambda m: load_model_weights(m, load_from)) if load_from is not None else None,
            compile=compile,
        )
        optimizer = fabric.setup_optimizers(build_optimizer(model, optimizer_args))
        progress, loader_state = restore_progress(fabric, resume_dir, model=model, optimizer=optimizer)

        train_loader = val_loader = None
        if progress.step < total or (resume_dir is not None and resume_dir.name != "final"):
            # a run stopped during its final validation still validates and writes final/ on resume
            train_loader, val_loader = data_loaders(
                fabric, data, tokenizer, batch_size=train.micro_batch_size, seq_len=seq_len, loader_state=loader_state
            )
        n_params = sum(p.numel() for p in unwrap(model).parameters())
        fabric.print(f"model {config.name or 'custom'}: {n_params / 1e6:.2f}M parameters, {total} steps")

        def write_files(folder: Path, tensors: dict, final: bool) -> list[str]:
            write_model_files(folder, tensors, config, tokenizer.save)
            return [MODEL_FILE]

        path = fit(
            fabric,
            model,
            optimizer,
            batches=infinite_batches(train_loader) if train_loader is not None else iter(()),
            loader_state=(lambda: train_loader.state_dict()) if train_loader is not None else (lambda: None),
            val_loader=val_loader,
            train=train,
            eval=eval,
            setup=FitSetup(
                config=config,
                out_dir=out_dir,
                seq_len=seq_len,
                max_lr=optimizer_args.lr,
                total_steps=total,
                write_files=write_files,
                signals=signals,
                resumed_from=resume_dir,
            ),
            progress=progress,
        )
        if sample.max_new_tokens > 0 and path.name == "final":
            print_sample(fabric, model, tokenizer, sample, seq_len=seq_len, seed=seed)
    return path
