"""The objectives of ``litliger finetune --loss``: preference alignment (dpo, simpo, orpo) and distillation (kd).

Each is a loss function for the one engine (``engine.fit``): it runs the model's forward with a ``head_fn``
(``GPT.forward``), so the LM head's loss is a fused op of ``litliger.kernels`` and no (tokens x vocab) logits
exist, and it returns the loss summed over the engine's units (pairs for preferences, target tokens for
distillation) with the metrics TRL users know (rewards/*, logps/*), which the engine logs.

DPO's reference log-probs come from one of two places (``--pref.reference``):

- ``adapters``: a LoRA finetune's own model with its adapters switched off (one copy of the weights), run under
  no_grad in eval mode before each policy forward;
- ``precomputed``: one pass of the initial model over every pair before training (a full finetune, or LoRA with
  ``train.trainable`` extras, whose adapters-off model is not the initial one). The table is stored in the data
  cache under ``reference/<key>``, the key a digest of the base weights' tensor digest, the pairs' token
  fingerprint per split, max_seq_length, the precision and the prompt style: a changed base or data misses it.
  The pass runs on a model of its own, built and loaded from the base and freed before the training model
  exists, so training never holds two models.

Distillation loads the teacher frozen (FSDP2-sharded like the student under ``--strategy fsdp``, a plain copy per
device otherwise), runs its forward under no_grad per micro-batch for its final hidden states, and gives the
student's head ``fused_linear_distillation`` with the teacher's head weight (gathered once when sharded).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from ..checkpoint.io import load_tensors, read_config
from ..checkpoint.layout import MODEL_FILE
from ..data import Tokenizer
from ..data.base import batch_inputs
from ..data.cache import cache_root, json_digest, publish_dir
from ..data.preferences import Preferences
from ..engine import LossFn, TrainArgs, reshard, setup_model, unwrap
from ..kernels import (
    DISTILLATION_LOSSES,
    fused_linear_cross_entropy,
    fused_linear_distillation,
    fused_linear_preference,
)
from ..model.config import Config
from ..model.gpt import GPT
from ..model.lora import adapters_disabled
from ..util.checks import check_at_least, check_between, check_choice, check_positive, fail

OBJECTIVES = ("sft", "dpo", "simpo", "orpo", "kd")
PREFERENCE_OBJECTIVES = ("dpo", "simpo", "orpo")
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.1}
REFERENCES = ("auto", "adapters", "precomputed")
# the stats of fused_linear_preference, under the names TRL's trainers log
METRICS = {
    "rewards_chosen": "rewards/chosen",
    "rewards_rejected": "rewards/rejected",
    "rewards_accuracy": "rewards/accuracy",
    "rewards_margin": "rewards/margin",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
}
_REFERENCE_FORMAT = 1


@dataclass(frozen=True)
class PreferenceArgs:
    """``--pref.*``: the preference losses' hyperparameters (``--loss dpo|simpo|orpo``)."""

    beta: float | None = None
    """the preference term's strength (default per loss: dpo 0.1, simpo 2.0, orpo 0.1)."""
    loss_type: str = "sigmoid"
    """dpo: sigmoid (DPO) or ipo (IPO, on summed log-ratios)."""
    label_smoothing: float = 0.0
    """dpo sigmoid: the assumed share of flipped labels, in [0, 0.5) (conservative DPO)."""
    gamma: float = 1.0
    """simpo: the target reward margin (SimPO's gamma)."""
    reference: str = "auto"
    """dpo: where the reference log-probs come from: adapters (LoRA with its adapters off), precomputed (one pass
    of the initial model before training, cached), or auto (adapters for LoRA without train.trainable extras)."""

    def __post_init__(self) -> None:
        check_positive("pref.beta", self.beta, "set a positive strength, e.g. 0.1", optional=True)
        check_choice("pref.loss_type", self.loss_type, ("sigmoid", "ipo"))
        check_between("pref.label_smoothing", self.label_smoothing, 0, 0.5, "use e.g. 0.1, or 0", high_open=True)
        if not math.isfinite(self.gamma):
            fail("pref.gamma", self.gamma, "a finite margin", "use e.g. 1.0", None)
        check_choice("pref.reference", self.reference, REFERENCES)
        if self.loss_type == "ipo" and self.label_smoothing:
            fail("pref.label_smoothing", self.label_smoothing, "0 with pref.loss_type ipo", "drop one of them", None)

    def beta_for(self, objective: str) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[objective]

    def options(self, objective: str) -> dict[str, Any]:
        if objective == "dpo":
            return {"loss_type": self.loss_type, "label_smoothing": self.label_smoothing}
        return {"gamma": self.gamma} if objective == "simpo" else {}

    def to_dict(self, objective: str) -> dict[str, Any]:
        return {"beta": self.beta_for(objective), **self.options(objective)}


@dataclass(frozen=True)
class DistillArgs:
    """``--kd.*``: the distillation loss (``--loss kd``)."""

    loss: str = "jsd"
    """jsd (generalised Jensen-Shannon), forward_kl (KL(teacher || student)) or reverse_kl (KL(student || teacher))."""
    beta: float = 0.5
    """jsd: the mixture weight of the teacher, in (0, 1); 0.5 is the symmetric JSD."""
    temperature: float = 1.0
    """both distributions are softmax(logits / temperature)."""
    hard_weight: float = 0.0
    """weight of the usual cross-entropy on the targets, added to the divergence (0: none)."""

    def __post_init__(self) -> None:
        check_choice("kd.loss", self.loss, DISTILLATION_LOSSES)
        fix = "use e.g. 0.5; forward_kl and reverse_kl are the ends"
        check_between("kd.beta", self.beta, 0, 1, fix, low_open=True, high_open=True)
        check_positive("kd.temperature", self.temperature, "use e.g. 1.0 or 2.0")
        check_at_least("kd.hard_weight", self.hard_weight, 0, "use 0 for pure distillation")


def planned_train(train: TrainArgs, objective: str) -> TrainArgs:
    """What the memory plan must see of ``train``: a preference batch of B pairs holds 2B sequences."""
    if objective not in PREFERENCE_OBJECTIVES:
        return train
    return replace(train, micro_batch_size=2 * train.micro_batch_size, global_batch_size=2 * train.global_batch_size)


def reference_mode(objective: str, method: str, extras: tuple[str, ...], pref: PreferenceArgs) -> str | None:
    """Where DPO's reference log-probs come from for this run (None: the objective needs none)."""
    if objective != "dpo":
        return None
    mode = pref.reference
    if mode == "auto":
        return "adapters" if method == "lora" and not extras else "precomputed"
    if mode == "adapters" and method != "lora":
        raise ValueError(
            "pref.reference='adapters' switches LoRA adapters off, but --method full has none, in "
            "--pref.reference; use precomputed (or auto)"
        )
    if mode == "adapters" and extras:
        raise ValueError(
            f"pref.reference='adapters' cannot form the reference with train.trainable={list(extras)}: those "
            "parameters train too, so the adapters-off model is not the initial one, in --pref.reference; use "
            "precomputed (or auto)"
        )
    return mode


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode inside (no dropout), the previous mode after."""
    previous = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(previous)


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows,) summed log-probs of each row's targets, through the fused head (no logits held)."""
    targets = batch["targets"]

    def head(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return -fused_linear_cross_entropy(x, weight, targets, bias, reduction="none").sum(-1)

    return model(batch["input_ids"], head_fn=head)


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    """The engine's unit for preference losses: pairs (the batch holds 2B rows)."""
    return batch["input_ids"].shape[0] // 2


def preference_loss_fn(objective: str, pref: PreferenceArgs, reference: str | None) -> LossFn:
    """The engine's loss function for ``objective``: the mean-over-pairs loss times the pairs (a sum), and the
    stats summed over pairs (the engine divides by the pair count)."""
    beta, options = pref.beta_for(objective), pref.options(objective)

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = batch["targets"]
        ref = None
        if reference == "adapters":
            with torch.no_grad(), adapters_disabled(unwrap(model)), evaluating(model):
                ref = sequence_logps(model, batch)
        elif reference == "precomputed":
            ref = batch["ref_logps"].to(torch.float32)

        def head(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
            return fused_linear_preference(
                x, weight, targets, bias, loss=objective, beta=beta, ref_logps=ref, **options
            )  # fmt: skip

        loss, stats = model(batch["input_ids"], head_fn=head)
        pairs = pair_count(batch)
        return loss * pairs, {METRICS[k]: stats[k].sum() for k in METRICS}

    return loss_fn


# --- DPO's precomputed reference ---------------------------------------------------------------------------------


def reference_key(base_digest: str, data: Preferences, seq_len: int, precision: str) -> str:
    """What a reference table depends on: the base's weights, the pairs' tokens per split, and how they are run."""
    parts = {
        "format": _REFERENCE_FORMAT,
        "base_tensors_sha256": base_digest,
        "train": data.fingerprint("train"),
        "val": data.fingerprint("val"),
        "max_seq_length": seq_len,
        "precision": precision,
        "prompt_style": data.style.to_dict() if data.style is not None else None,
    }
    return json_digest(parts)[:32]


def reference_logps(
    fabric: L.Fabric,
    data: Preferences,
    build_reference: Callable[[], nn.Module],
    *,
    key: str,
) -> dict[str, np.ndarray]:
    """``{"train", "val"}`` -> (pairs, 2) reference log-probs, read from the cache entry ``key`` or computed by the
    model ``build_reference()`` sets up (every rank runs every pair: FSDP needs the same forwards on all) and
    published by each node's first rank (atomically: a stopped pass leaves no table)."""
    entry = cache_root() / "reference" / key
    # every rank must make the same choice (computing runs collectives under FSDP): read only when every rank's
    # cache (node-local, or shared) has the table
    found = torch.tensor(float((entry / "meta.json").is_file()), device=fabric.device)
    if fabric.world_size > 1:
        found = fabric.all_reduce(found, reduce_op="min")
    if not bool(found):
        model = build_reference()
        tables = {split: _logps_of_split(fabric, model, data, split) for split in ("train", "val")}
        del model
        gc.collect()
        if fabric.device.type == "cuda":
            torch.cuda.empty_cache()
        if fabric.local_rank == 0:  # one writer per node (node-local caches); publish_dir keeps the first entry
            with publish_dir(entry) as tmp:
                for split, table in tables.items():
                    np.save(tmp / f"{split}.npy", table)
                meta = {"key": key, "pairs": {s: len(t) for s, t in tables.items()}}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        fabric.barrier()
        fabric.print(f"reference log-probs: computed for {sum(len(t) for t in tables.values())} pairs -> {entry}")
        return tables
    fabric.print(f"reference log-probs: read from {entry}")
    return {split: np.load(entry / f"{split}.npy", allow_pickle=False) for split in ("train", "val")}


@torch.no_grad()
def _logps_of_split(fabric: L.Fabric, model: nn.Module, data: Preferences, split: str) -> np.ndarray:
    n_pairs = len(data.examples(split)) // 2
    table = np.zeros((n_pairs, 2), dtype=np.float64)
    with evaluating(model):
        for batch in data.pair_loader(split):
            pairs = batch["pair_index"].numpy()
            batch = {k: v.to(fabric.device) for k, v in batch.items()}
            logps = sequence_logps(model, batch).double().cpu().numpy()
            table[pairs] = np.stack([logps[: len(pairs)], logps[len(pairs) :]], axis=1)  # (B, 2): chosen, rejected
    reshard(model)
    return table


# --- distillation ------------------------------------------------------------------------------------------------


def check_teacher(teacher_dir: Path | None, student: Config, tokenizer: Tokenizer, seq_len: int) -> Config:
    """The teacher's config, after checking that it can teach this student: a checkpoint folder, the same
    tokenizer and vocabulary, and a block size that covers the training sequences."""
    if teacher_dir is None:
        raise ValueError("--loss kd needs a teacher, in --teacher_dir; name the teacher's checkpoint folder")
    teacher_dir = Path(teacher_dir)
    if not (teacher_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"{teacher_dir} is not a checkpoint folder ({MODEL_FILE} missing), in --teacher_dir; name the teacher's "
            "checkpoint folder"
        )
    config = read_config(teacher_dir)
    if config.vocab_size != student.vocab_size:
        raise ValueError(
            f"the teacher {teacher_dir} has vocab_size {config.vocab_size}, the student {student.vocab_size}: "
            "distillation compares their distributions token by token, in --teacher_dir; use a teacher with the "
            "student's tokenizer"
        )
    theirs = Tokenizer.from_dir(teacher_dir).fingerprint
    if theirs != tokenizer.fingerprint:
        raise ValueError(
            f"the teacher {teacher_dir} has another tokenizer than the student (fingerprint {theirs[:12]} vs "
            f"{tokenizer.fingerprint[:12]}), in --teacher_dir; use a teacher with the student's tokenizer"
        )
    if config.block_size < seq_len:
        raise ValueError(
            f"the teacher's block_size {config.block_size} is shorter than the training sequences ({seq_len}), in "
            "--teacher_dir; lower --train.max_seq_length"
        )
    return config


@dataclass
class Teacher:
    """The frozen teacher: its model (sharded under FSDP) and its LM head's full (weight, bias)."""

    model: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None

    def hidden(self, fabric: L.Fabric, idx: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad(), fabric.autocast():
            return self.model(idx, document_ids=document_ids, head_fn=lambda x, w, b: x)


def setup_teacher(fabric: L.Fabric, teacher_dir: Path, config: Config, seed: int) -> Teacher:
    """Build, shard (FSDP) and load the teacher, every parameter frozen, in eval mode."""

    def build() -> nn.Module:
        model = GPT(config)
        model.requires_grad_(False)
        return model

    def load(model: nn.Module) -> None:
        names = {name for name, _ in model.named_parameters()}
        load_tensors(model, Path(teacher_dir) / MODEL_FILE, expected=names)

    model = setup_model(fabric, build, seed=seed, resuming=True, load=load, frozen=True)
    model.eval()
    weight, bias = unwrap(model).head()
    return Teacher(model, _full(weight), None if bias is None else _full(bias))


def _full(t: torch.Tensor) -> torch.Tensor:
    """A detached full copy of a (possibly FSDP2-sharded) parameter."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def distill_loss_fn(fabric: L.Fabric, teacher: Teacher, kd: DistillArgs, vocab_size: int) -> LossFn:
    """The engine's loss function for ``--loss kd``: the distillation loss summed over the batch's target tokens
    (any batch: token blocks or instruction examples, with document ids when the data masks documents)."""

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        idx, targets, document_ids = batch_inputs(batch)
        x_teacher = teacher.hidden(fabric, idx, document_ids)

        def head(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return fused_linear_distillation(
                x, weight, x_teacher, teacher.weight, targets, loss=kd.loss, beta=kd.beta,
                temperature=kd.temperature, hard_weight=kd.hard_weight, student_bias=bias,
                teacher_bias=teacher.bias, vocab_size=vocab_size,
            )  # fmt: skip

        loss = model(idx, document_ids=document_ids, head_fn=head)
        return loss * (targets != -100).sum()

    return loss_fn
