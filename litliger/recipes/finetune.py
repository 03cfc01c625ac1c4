"""``litliger finetune``: LoRA or full finetuning of a checkpoint on instruction data, with Lightning Fabric.

setup (parse, build Fabric) -> main (base, tokenizer, model + adapters, optimizer, data, resume) -> engine.fit.
The engine, the init policy and the checkpoint writer are pretraining's; what differs is said here: which
parameters train (litliger/checkpoint/finetuned.py), that a step checkpoint holds only those, and that the loss of a
step is normalised by its number of response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from ..checkpoint.finetuned import check_same_finetune, finetune_meta, trained_tensors_file, write_finetune_files
from ..checkpoint.io import load_tensors, read_config, read_finetune_meta, verified_base_identity
from ..checkpoint.layout import MODEL_FILE
from ..data import (
    DataModule,
    Instructions,
    Preferences,
    PromptStyle,
    PythonDocstrings,
    PythonPreferences,
    Tokenizer,
    infinite_batches,
)
from ..data.base import run_record, write_run_record
from ..engine import (
    EvalArgs,
    FitSetup,
    OptimizerArgs,
    PlanArgs,
    TrainArgs,
    build_optimizer,
    check_memory_options,
    check_resumable,
    finished_run,
    fit,
    make_fabric,
    make_loggers,
    next_token_count,
    next_token_loss,
    on_rank_zero,
    resolve_resume_on_all_ranks,
    setup_model,
    training_session,
    unwrap,
)
from ..inference.sampling import SampleArgs
from ..model.config import Config
from ..model.gpt import GPT
from ..model.lora import METHODS, LoRAArgs, apply_lora, base_parameter_names, select_trainable
from ..util.checks import check_between, check_choice, check_positive
from .align import (
    OBJECTIVES,
    PREFERENCE_OBJECTIVES,
    DistillArgs,
    PreferenceArgs,
    check_teacher,
    distill_loss_fn,
    pair_count,
    planned_train,
    preference_loss_fn,
    reference_key,
    reference_logps,
    reference_mode,
    setup_teacher,
)
from .common import data_loaders, position_loader, print_response, report_memory_plan, restore_progress

PRETRAIN_HINT = "run the README's pretrain command first (litliger pretrain --config config_hub/pretrain/debug.yaml)"


@dataclass(frozen=True)
class FinetuneTrainArgs(TrainArgs):
    """``--train.*`` of finetuning: pretraining's, plus how many epochs and which extra parameters train."""

    global_batch_size: int = 16
    micro_batch_size: int = 4
    lr_warmup_steps: int = 10
    min_lr: float = 0.0
    save_interval: int | None = 100
    epochs: int | None = None
    """passes over the training set (train.max_steps takes precedence; neither: train.max_tokens)."""
    trainable: tuple[str, ...] = ()
    """glob patterns over full parameter names that also train with LoRA, e.g. ['*.norm_*']."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "trainable", tuple(self.trainable))  # a YAML list
        check_positive("train.epochs", self.epochs, "set the passes over the training set", optional=True)

    def finetune_steps(self, steps_per_epoch: int, tokens_per_step: int) -> int:
        """Optimizer steps: ``max_steps``, else ``epochs`` whole passes, else ``max_tokens``."""
        if self.max_steps is not None:
            return self.max_steps
        if self.epochs is not None:
            return self.epochs * steps_per_epoch
        if self.max_tokens is not None:
            return self.max_tokens // tokens_per_step
        raise ValueError("how long to finetune is not set, in --train.epochs / --train.max_steps; set one of them")


def setup(
    checkpoint_dir: Path | None = None,
    method: Literal["lora", "full"] = "lora",
    lora: LoRAArgs = LoRAArgs(),
    out_dir: Path = Path("out/finetune"),
    precision: Literal["bf16-mixed", "bf16-true", "16-true", "32-true"] | None = None,
    resume: bool | Literal["auto"] | Path = False,
    data: DataModule | None = None,
    train: FinetuneTrainArgs = FinetuneTrainArgs(),
    eval: EvalArgs = EvalArgs(interval=100, max_iters=20),
    optimizer: OptimizerArgs = OptimizerArgs(lr=2e-4, weight_decay=0.0),
    devices: int = 1,
    num_nodes: int = 1,
    accelerator: Literal["auto", "cpu", "cuda", "gpu"] = "auto",
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    logger: Literal["csv", "tensorboard", "wandb"] = "csv",
    seed: int = 42,
    sample: SampleArgs = SampleArgs(),
    compile: bool = False,
    plan: PlanArgs = PlanArgs(),
    loss: Literal["sft", "dpo", "simpo", "orpo", "kd"] = "sft",
    pref: PreferenceArgs = PreferenceArgs(),
    kd: DistillArgs = DistillArgs(),
    teacher_dir: Path | None = None,
) -> Path | None:
    """Finetune a checkpoint: on instruction data (sft), on preference pairs (dpo, simpo, orpo), or by distilling
    a teacher (kd).

    Args:
        checkpoint_dir: the base: a litliger checkpoint folder (pretrained, or converted from Hugging Face).
        method: ``lora`` (adapters on the ``lora.targets`` layers, the base frozen) or ``full`` (every parameter).
        lora: ``--lora.*``: rank, alpha, dropout and target layers of the adapters (method lora).
        out_dir: where step-XXXXXXXX/ (trained tensors only), final/ (plus the merged model) and metrics go.
        precision: the training precision (default bf16-mixed on GPUs that support it, else 32-true).
        resume: ``auto`` (the newest checkpoint in out_dir, or a fresh start), a checkpoint folder, or false.
        data: instruction data (``litliger.data.Instructions``; default the embedded ``PythonDocstrings``), preference
            pairs for dpo/simpo/orpo (``litliger.data.Preferences``; default the embedded ``PythonPreferences``), or,
            for sft and kd, any pretraining data module (continued pretraining on token blocks).
        train: ``--train.*``: pretraining's, plus ``train.epochs`` and ``train.trainable`` (more parameters by name).
        eval: ``--eval.*``: validation during training.
        optimizer: ``--optimizer.*``: the optimizer (AdamW by default) and its hyperparameters.
        devices: processes (GPUs, or CPU processes) per node.
        num_nodes: machines; more than 1 needs a launcher (torchrun or SLURM) on every node.
        accelerator: ``auto`` (CUDA when available), ``cpu``, or ``cuda`` / ``gpu``.
        strategy: across devices: ``auto``, ``ddp`` (a full copy per device) or ``fsdp`` (sharded, FSDP2).
        logger: where metrics go besides out_dir/metrics.jsonl (under out_dir/logs): csv, tensorboard or wandb.
        seed: seeds the adapters' init, data order and every RNG.
        sample: ``--sample.*``: with ``sample.max_new_tokens > 0``, answer a held-out instruction at the end.
        compile: run the model under ``torch.compile`` (off by default; the first steps pay for compiling).
        plan: ``--plan.*``: the memory plan printed at the start (``--plan.device_memory``, ``--plan.strict``).
        loss: the objective: sft (next-token loss on the targets), dpo, simpo, orpo (preference pairs; see
            tutorials/align.md) or kd (distillation from ``teacher_dir``).
        pref: ``--pref.*``: beta, loss_type, label_smoothing, gamma and the DPO reference (adapters, precomputed).
        kd: ``--kd.*``: the distillation loss (jsd, forward_kl, reverse_kl), beta, temperature and hard_weight.
        teacher_dir: ``--loss kd``: the teacher's checkpoint folder (the student's tokenizer and vocabulary).
    """
    if checkpoint_dir is None:
        raise ValueError("no base checkpoint given, in --checkpoint_dir; name the checkpoint folder to finetune")
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / MODEL_FILE).is_file():
        hint = PRETRAIN_HINT if "out/pretrain" in checkpoint_dir.as_posix() else "convert or pretrain a model first"
        raise FileNotFoundError(
            f"{checkpoint_dir} is not a checkpoint folder ({MODEL_FILE} missing), in --checkpoint_dir; {hint}"
        )
    check_between("seed", seed, 0, 2**32 - 1, "use a seed in [0, 4294967295]")
    check_choice("loss", loss, OBJECTIVES)
    if loss != "kd" and teacher_dir is not None:
        raise ValueError(f"--teacher_dir is for --loss kd, but this run's loss is {loss}; drop --teacher_dir")
    if data is None:
        data = PythonPreferences() if loss in PREFERENCE_OBJECTIVES else PythonDocstrings()
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
        checkpoint_dir=checkpoint_dir,
        method=method,
        lora=lora,
        out_dir=out_dir,
        resume=resume,
        data=data,
        train=train,
        eval=eval,
        optimizer_args=optimizer,
        seed=seed,
        sample=sample,
        compile=compile,
        plan=plan,
        objective=loss,
        pref=pref,
        kd=kd,
        teacher_dir=teacher_dir,
    )


def response_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["targets"] != -100).sum()


def target_count(batch: Any) -> int | torch.Tensor:
    """The target tokens of any batch: an instruction batch's targets != -100, a token block's B x T."""
    return response_tokens(batch) if isinstance(batch, dict) and "targets" in batch else next_token_count(batch)


def input_tokens(batch: Any) -> int:
    return batch["input_ids"].numel() if isinstance(batch, dict) and "input_ids" in batch else next_token_count(batch)


def check_data(data: DataModule, objective: str) -> None:
    """The data an objective trains on: preference pairs for dpo/simpo/orpo; instructions or token data otherwise."""
    if objective in PREFERENCE_OBJECTIVES:
        if not isinstance(data, Preferences):
            raise ValueError(
                f"--loss {objective} trains on preference pairs, got {type(data).__name__}, in --data; use "
                "litliger.data.Preferences (a .json/.jsonl file of prompt/chosen/rejected) or PythonPreferences"
            )
    elif isinstance(data, Preferences):
        raise ValueError(
            f"{type(data).__name__} holds preference pairs, which --loss {objective} does not train on, in --data; "
            "use --loss dpo, simpo or orpo, or instruction data"
        )


def main(
    fabric: L.Fabric,
    *,
    checkpoint_dir: Path,
    method: str,
    lora: LoRAArgs,
    out_dir: Path,
    resume: bool | str | Path,
    data: DataModule,
    train: FinetuneTrainArgs,
    eval: EvalArgs,
    optimizer_args: OptimizerArgs,
    seed: int,
    sample: SampleArgs,
    compile: bool = False,
    plan: PlanArgs = PlanArgs(),
    objective: str = "sft",
    pref: PreferenceArgs = PreferenceArgs(),
    kd: DistillArgs = DistillArgs(),
    teacher_dir: Path | None = None,
) -> Path | None:
    check_data(data, objective)
    conversational = isinstance(data, Instructions | Preferences)
    config = read_config(checkpoint_dir)
    seq_len = train.max_seq_length or config.block_size
    if seq_len > config.block_size:
        raise ValueError(
            f"train.max_seq_length={seq_len} exceeds the model's block_size={config.block_size}, in "
            "--train.max_seq_length; use a value <= block_size"
        )
    accum = train.gradient_accumulation_steps(fabric.world_size)
    check_memory_options(fabric, train.offload, train.activation_checkpointing, compile)
    lora_args = lora if method == "lora" else None
    reference = reference_mode(objective, method, train.trainable, pref)  # refused here when it cannot be formed
    with torch.device("meta"):  # the trainable names, for the record and the resume check
        _, trainable = build_finetune_model(config, method, lora_args, train.trainable)
    objective_meta = {"loss": objective}
    if objective in PREFERENCE_OBJECTIVES:
        objective_meta.update(pref.to_dict(objective), reference=reference)
    elif objective == "kd":
        objective_meta.update(kd=vars(kd), teacher_dir=str(Path(teacher_dir).resolve()) if teacher_dir else None)

    with training_session(fabric, out_dir) as signals:
        resume_dir = resolve_resume_on_all_ranks(fabric, resume, out_dir)
        base_digest = on_rank_zero(fabric, lambda: verified_base_identity(checkpoint_dir))
        tokenizer = Tokenizer.from_dir(checkpoint_dir)
        teacher_config = check_teacher(teacher_dir, config, tokenizer, seq_len) if objective == "kd" else None
        style = None
        if not conversational:
            pass  # token data: no prompt format
        elif resume_dir is not None and (saved_style := read_finetune_meta(resume_dir).get("prompt_style")):
            data.style = style = PromptStyle.from_dict(saved_style)  # format exactly as the run did so far
        else:
            style = data.select_prompt_style(checkpoint_dir)
        meta = finetune_meta(
            method=method,
            lora=lora_args,
            trainable=trainable,
            base_dir=checkpoint_dir,
            base_digest=base_digest,
            prompt_style=None if style is None else style.to_dict(),
            objective=objective_meta,
        )
        if resume_dir is not None:
            check_resumable(resume_dir, config, fabric.world_size)
            check_same_finetune(read_finetune_meta(resume_dir), meta, resume_dir)
        fabric.seed_everything(seed)

        def build() -> torch.nn.Module:
            model, _ = build_finetune_model(config, method, lora_args, train.trainable)
            model.max_seq_length = seq_len
            return model

        def load(model: torch.nn.Module, resumed: bool = resume_dir is not None) -> None:
            # the frozen base strictly (every base parameter in the file), then the trained tensors on resume
            base_names = base_parameter_names(model)
            reloaded = set(trainable) if resumed else set()
            load_tensors(model, checkpoint_dir / MODEL_FILE, expected=base_names, copy=base_names - reloaded)
            if resumed:
                load_tensors(model, trained_tensors_file(resume_dir), expected=set(trainable))

        # the data first: DPO's reference pass runs over it before the training model exists
        train_loader, val_loader = data_loaders(
            fabric, data, tokenizer, batch_size=train.micro_batch_size, seq_len=seq_len, loader_state=None
        )
        if conversational:
            fabric.print(data.summary())
        if isinstance(data, Instructions):
            fabric.print(data.padding_report())
        if reference == "precomputed":
            key = reference_key(base_digest, data, seq_len, fabric.litliger_precision)
            tables = reference_logps(
                fabric, data, key=key,
                build_reference=lambda: setup_model(fabric, build, seed=seed, resuming=False,
                                                    load=lambda m: load(m, resumed=False)),
            )  # fmt: skip
            train_loader.pair_values = tables["train"]
            if val_loader is not None:
                val_loader.pair_values = tables["val"]

        planned = planned_train(train, objective)  # preference batches: 2 x micro_batch_size sequences
        report_memory_plan(fabric, config, build, train=planned, optimizer=optimizer_args, seq_len=seq_len, plan=plan)
        if objective == "kd":
            fabric.print("memory plan: the frozen teacher's weights and forward are not in it")
        model = setup_model(
            fabric, build, seed=seed, resuming=resume_dir is not None, load=load, compile=compile,
            checkpointing=train.activation_checkpointing, offload=train.offload,
        )  # fmt: skip
        optimizer = fabric.setup_optimizers(build_optimizer(model, optimizer_args))
        progress, loader_state = restore_progress(fabric, resume_dir, model=model, optimizer=optimizer)
        position_loader(fabric, data, train_loader, loader_state)
        total = train.finetune_steps(max(1, len(train_loader) // accum), train.global_batch_size * seq_len)
        if resume_dir is not None and (finished := finished_run(fabric, out_dir, resume_dir, total)) is not None:
            return finished  # nothing trains, nothing is written; no end-of-run answer either
        n_train = sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in unwrap(model).parameters())
        fabric.print(
            f"{method} finetune{'' if objective == 'sft' else f' ({objective})'} of {checkpoint_dir}: {n_train:,} of "
            f"{n_all:,} parameters train "
            f"({100 * n_train / n_all:.2f}%), {total} steps"
        )
        loss_fn, count, val_loss_fn, val_count = next_token_loss, target_count, None, None
        if objective in PREFERENCE_OBJECTIVES:
            loss_fn, count = preference_loss_fn(objective, pref, reference), pair_count
            if reference:
                how = "adapters switched off" if reference == "adapters" else "the initial model, one pass first"
                fabric.print(f"DPO reference: {reference} ({how})")
        elif objective == "kd":
            teacher = setup_teacher(fabric, teacher_dir, teacher_config, seed)
            loss_fn = distill_loss_fn(fabric, teacher, kd, config.vocab_size)
            val_loss_fn, val_count = next_token_loss, target_count  # val_loss: the student's own next-token loss
            fabric.print(f"teacher {teacher_dir}: {kd.loss} (beta {kd.beta}, temperature {kd.temperature}, "
                         f"hard_weight {kd.hard_weight}); val_loss is the student's next-token loss")  # fmt: skip

        # what `litliger evaluate` needs to validate a checkpoint of this run as the run did
        record = run_record(data, max_seq_length=seq_len, batch_size=train.micro_batch_size, max_batches=eval.max_iters)
        path = fit(
            fabric,
            model,
            optimizer,
            batches=infinite_batches(train_loader),
            loader_state=train_loader.state_dict,
            val_loader=val_loader,
            train=train,
            eval=eval,
            setup=FitSetup(
                config=config,
                out_dir=out_dir,
                seq_len=seq_len,
                max_lr=optimizer_args.lr,
                total_steps=total,
                write_files=lambda folder, tensors, final: [
                    *write_finetune_files(folder, tensors, meta=meta, config=config, final=final),
                    write_run_record(folder, record),
                ],
                signals=signals,
                resumed_from=resume_dir,
                trainable_only=True,
                loss_fn=loss_fn,
                count_targets=count,
                tokens_in=input_tokens,
                val_loss_fn=val_loss_fn,
                val_count_targets=val_count,
            ),
            progress=progress,
        )
        held_out = (data.records.get("val") or data.records["train"]) if conversational else None
        if sample.max_new_tokens > 0 and path.name == "final" and held_out:
            print_response(fabric, model, tokenizer, style, held_out[0].messages, sample, seq_len=seq_len, seed=seed)
    return path


def build_finetune_model(
    config: Config, method: str, lora: LoRAArgs | None, patterns: tuple[str, ...] = ()
) -> tuple[GPT, list[str]]:
    """``GPT(config)`` (on the current default device; the engine uses meta) with adapters for ``lora``,
    ``requires_grad`` set on exactly the trainable set; returns the model and the trainable names."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a finetuning method, in --method; choose one of {METHODS}")
    model = GPT(config)
    if method == "lora":
        apply_lora(model, lora if lora is not None else LoRAArgs())
    trainable = select_trainable(model, method, patterns)
    chosen = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return model, trainable
