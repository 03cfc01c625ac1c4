"""A PEFT LoRA folder -> a litliger finetune step folder on a litliger base (``convert_from_hf ADAPTER OUT --base``).

Every adapted litliger Linear gets one adapter that computes exactly what PEFT's adapters on its Hugging Face
modules compute:

- one module (o_proj, gate_proj, c_attn, query_key_value, ...): A copied, B's rows put in litliger's order
  (peft_map.py);
- q_proj, k_proj, v_proj -> the fused ``attn.qkv``: when the adapted ones share one A (as an export by litliger
  writes them), A and B stacked by rows (rank r, a module left out gives zero rows); otherwise A = [A_q; A_k; A_v]
  and a block-diagonal B (rank the sum of their ranks), so B A = [B_q A_q; B_k A_k; B_v A_v];
- a layer of an adapted group (qkv, proj, mlp, lm_head) that PEFT left alone (only q and v; only some layers)
  gets A = 0 and B = 0.

litliger has one rank per finetune: adapters of a smaller rank get zero rows of A and zero columns of B up to the
largest (their product, and so the function, is unchanged; in training such rows get no gradient), and alpha is
chosen so that alpha / rank is PEFT's scale (lora_alpha / r, or lora_alpha / sqrt(r) with rslora).
``modules_to_save`` tensors become trained tensors of the step folder. Anything else that changes the function
(DoRA, per-layer ranks or alphas, trained biases, LoRA on embeddings, other PEFT types) is refused in one line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..checkpoint.finetuned import finetune_meta, write_finetune_files
from ..checkpoint.io import atomic_dir, read_config, verified_base_identity
from ..checkpoint.safety import check_output_dir
from ..model.config import Config
from ..model.gpt import GPT
from ..model.lora import TARGETS, LoRAArgs, apply_lora
from ..util.files import read_json_object
from .hf_config import config_to_hf
from .peft_map import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ADAPTER_WEIGHTS_BIN,
    LORA_A,
    LORA_B,
    PEFT_PREFIX,
    AdaptableLayer,
    adaptable_layers,
    canonical_module_name,
)
from .weight_maps import family_map, listing, model_shapes

# LoraConfig fields that change what the adapter computes and that litliger's LoRA does not have: each must be
# unset (None, False, empty)
_UNSUPPORTED = {
    "use_dora": "DoRA (a learned magnitude per output)",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QALoRA's pooled input",
    "use_bdlora": "block-diagonal LoRA",
    "layer_replication": "replicated layers",
    "target_parameters": "LoRA on parameters (not modules)",
    "trainable_token_indices": "trainable token rows",
    "alora_invocation_tokens": "activated LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}
# PEFT's tensor names: LoRA on a linear layer, and on an embedding (which litliger's LoRA does not adapt: named as
# an adapted module it has no layer for)
_LORA_LEAVES = ((LORA_A, "A"), (LORA_B, "B"), ("lora_embedding_A", "A"), ("lora_embedding_B", "B"))
_MERGE_HINT = "merge it with PEFT (merge_and_unload), save the model and convert that with convert_from_hf"


def is_peft_folder(folder: str | Path) -> bool:
    """A PEFT adapter folder: it holds adapter_config.json."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def convert_from_peft(
    adapter_dir: str | Path, out_dir: str | Path, base: str | Path, dtype: torch.dtype | None = None, *, overwrite: bool
) -> dict[str, torch.Tensor]:
    """Write the PEFT LoRA adapter in ``adapter_dir`` as a litliger finetune step folder ``out_dir`` on the
    litliger checkpoint folder ``base`` (the model the adapter was trained on, converted with convert_from_hf);
    returns the trained tensors written. Written atomically, with the output-folder rules of every conversion.
    ``convert_from_hf(adapter_dir, out_dir, base=...)`` is the entry point (it resolves ``dtype`` and prints)."""
    adapter_dir, base = Path(adapter_dir), Path(base)
    check_output_dir(out_dir, inputs=[adapter_dir, base], overwrite=overwrite)
    settings = read_adapter_config(adapter_dir)
    config = read_config(base)
    family = config_to_hf(config)["model_type"]
    digest = verified_base_identity(base)
    raw = _read_adapter_weights(adapter_dir)
    lora, saved = _split_keys(raw, settings, adapter_dir)
    layers = adaptable_layers(config, family)
    adapters = _fused_adapters(lora, layers, family, adapter_dir, config, settings["r"])
    rank = max(a.shape[0] for a, _ in adapters.values())
    targets = tuple(t for t in TARGETS if any(layers[name].target == t for name in adapters))
    scale = settings["lora_alpha"] / (math.sqrt(settings["r"]) if settings.get("use_rslora") else settings["r"])
    exact = rank == settings["r"] and not settings.get("use_rslora")
    args = LoRAArgs(
        r=rank,
        alpha=settings["lora_alpha"] if exact else scale * rank,  # alpha / rank is PEFT's scale
        dropout=float(settings.get("lora_dropout") or 0.0),
        targets=targets,
    )
    tensors = _padded(adapters, layers, args, dtype or next(iter(raw.values())).dtype)
    tensors.update(_saved_tensors(saved, config, family, adapter_dir))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    with torch.device("meta"):
        model = GPT(config)
    apply_lora(model, args)
    trainable = [name for name, _ in model.named_parameters() if name in tensors]
    meta = finetune_meta(
        method="lora", lora=args, trainable=trainable, base_dir=base, base_digest=digest, prompt_style=None
    )
    meta["imported"] = {
        "format": "peft",
        "adapter_dir": str(adapter_dir.resolve()),
        **{k: settings.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules", "modules_to_save")},
    }
    with atomic_dir(out_dir) as tmp:
        write_finetune_files(tmp, tensors, meta=meta, config=config, final=False)
        check_output_dir(out_dir, inputs=[adapter_dir, base], overwrite=overwrite)  # again: it may have changed
    return {name: tensors[name] for name in trainable}


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json, checked: a LoRA litliger can hold exactly, else one line naming the setting."""
    path = adapter_dir / ADAPTER_CONFIG
    settings = read_json_object(path)  # the folder was recognised by this file: present
    peft_type = settings.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"peft_type={peft_type!r} is not LoRA, in {path}; litliger imports LoRA adapters only")
    for key in ("r", "lora_alpha"):
        value = settings.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{key}={value!r} is not a positive number, in {path}; fix the adapter's config")
    for key, what in _UNSUPPORTED.items():
        if settings.get(key):
            raise ValueError(f"{key}={settings[key]!r} ({what}) is not litliger's LoRA, in {path}; {_MERGE_HINT}")
    for key in ("rank_pattern", "alpha_pattern"):
        if settings.get(key):
            raise ValueError(
                f"{key}={settings[key]} gives some layers their own rank or alpha, in {path}; litliger's LoRA has "
                f"one rank and alpha for every adapter: {_MERGE_HINT}"
            )
    if settings.get("bias", "none") != "none":
        raise ValueError(
            f"bias={settings['bias']!r} trains biases beside the adapters, in {path}; litliger imports bias='none' "
            f"adapters: {_MERGE_HINT}"
        )
    return settings


def _read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    for name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN):
        path = adapter_dir / name
        if path.is_file():
            if name == ADAPTER_WEIGHTS:
                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"no adapter weights in {adapter_dir} ({ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN}); copy the whole PEFT folder"
    )


def _split_keys(
    raw: dict[str, torch.Tensor], settings: dict[str, Any], where: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """PEFT's tensors as {Hugging Face module: {"A": .., "B": ..}} and modules_to_save's {Hugging Face name: ..}."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    saved = {}
    for key, tensor in raw.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{key} does not start with {PEFT_PREFIX}, in {where}; is it a causal LM's PEFT adapter?")
        name = key.removeprefix(PEFT_PREFIX)
        for leaf, half in _LORA_LEAVES:
            if name.endswith(f".{leaf}"):
                lora.setdefault(name.removesuffix(f".{leaf}"), {})[half] = tensor
                break
        else:
            saved[name] = tensor
    # an adapted embedding's copy of its own weight (PEFT's save_embedding_layers): refused with the embedding
    saved = {n: t for n, t in saved.items() if n.removesuffix(".base_layer.weight") not in lora}
    if saved and not settings.get("modules_to_save"):
        raise ValueError(
            f"{listing(list(saved))} are neither LoRA tensors of a linear layer nor modules_to_save weights, in "
            f"{where}; litliger imports LoRA on linear layers (and modules_to_save)"
        )
    half = sorted(m for m, pair in lora.items() if len(pair) == 1)
    if half:
        raise ValueError(f"LoRA modules {listing(half)} lack lora_A or lora_B, in {where}; copy the whole PEFT folder")
    if not lora:
        raise ValueError(f"no LoRA tensors (lora_A / lora_B), in {where}; is it a LoRA adapter?")
    return lora, saved


def _fused_adapters(
    lora: dict[str, dict[str, torch.Tensor]],
    layers: dict[str, AdaptableLayer],
    family: str,
    where: Path,
    config: Config,
    rank: int,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """litliger module name -> (A, B) of every layer PEFT adapted, exact (see the module docstring)."""
    owner = {}  # Hugging Face module (either spelling) -> (its litliger layer, its place among the layer's modules)
    for layer in layers.values():
        for i, module in enumerate(layer.modules):
            owner[module] = owner[canonical_module_name(family, module)] = (layer, i)
    unknown = sorted(m for m in lora if m not in owner)
    if unknown:
        tied = " (the LM head is the tied embedding in this base)" if config.tie_embeddings else ""
        raise ValueError(
            f"the adapter adapts {listing(unknown)}, which this base has no LoRA layer for{tied}, in {where}; "
            "litliger adapts the attention's qkv and output projections, the MLP's projections and an untied LM head"
        )
    members: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for module, pair in lora.items():
        layer, i = owner[module]
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape != (b.shape[1], layer.in_features) or b.shape[0] != layer.rows[i]:
            raise ValueError(
                f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the base's layer "
                f"({layer.in_features} in, {layer.rows[i]} out), in {where}; give the --base the adapter was trained on"
            )
        if a.shape[0] != rank:  # the scale is lora_alpha / r: a tensor of another rank would be scaled wrongly
            raise ValueError(
                f"{module} has rank {a.shape[0]} but r={rank}, in {where / ADAPTER_CONFIG}; fix the adapter's config"
            )
        members.setdefault(layer.name, {})[i] = pair
    return {name: _fuse(layers[name], parts) for name, parts in members.items()}


def _fuse(layer: AdaptableLayer, parts: dict[int, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One exact (A, B) for the Hugging Face modules of one litliger layer (``parts``: module index -> A, B)."""
    first = next(iter(parts.values()))["A"]
    shared = all(torch.equal(p["A"], first) for p in parts.values())
    if shared:  # one A: B's rows side by side (zero rows for a module without an adapter)
        zeros = lambda rows: first.new_zeros(rows, first.shape[0])
        return first, layer.join_b([parts[i]["B"] if i in parts else zeros(rows) for i, rows in enumerate(layer.rows)])
    a = torch.cat([parts[i]["A"] for i in sorted(parts)])  # block-diagonal B: each module's B on its own A rows
    bs, col = [], 0
    for i, rows in enumerate(layer.rows):
        b = a.new_zeros(rows, a.shape[0])
        if i in parts:
            r = parts[i]["B"].shape[1]
            b[:, col : col + r] = parts[i]["B"]
            col += r
        bs.append(b)
    return a, layer.join_b(bs)


def _padded(
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
    layers: dict[str, AdaptableLayer],
    args: LoRAArgs,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """lora_a / lora_b of every layer of the adapted targets at rank ``args.r``: zero rows of A and columns of B
    below it, zeros for a layer PEFT left alone."""
    tensors = {}
    for name, layer in layers.items():
        if layer.target not in args.targets:
            continue
        a, b = adapters.get(name, (torch.zeros(0, layer.in_features, dtype=dtype), None))
        if b is None:
            b = torch.zeros(layer.out_features, 0, dtype=dtype)
        pad = args.r - a.shape[0]
        tensors[f"{name}.lora_a"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a.contiguous()
        tensors[f"{name}.lora_b"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1) if pad else b.contiguous()
    return tensors


def _saved_tensors(saved: dict[str, torch.Tensor], config: Config, family: str, where: Path) -> dict[str, torch.Tensor]:
    """modules_to_save's Hugging Face tensors as litliger parameters, through the family's weight map."""
    if not saved:
        return {}
    fmap = family_map(family, config)
    saved = {fmap.aliases(f"{canonical_module_name(family, n.rpartition('.')[0])}.{n.rpartition('.')[2]}"): t
             for n, t in saved.items()}  # fmt: skip
    if config.tie_embeddings and fmap.embedding in saved:
        raise ValueError(
            f"modules_to_save holds {fmap.embedding}, the embedding this base ties to its LM head, in {where}; "
            f"litliger ties them, PEFT's copy unties them: {_MERGE_HINT}"
        )
    shapes, tensors, used = model_shapes(config), {}, set()
    for entry in fmap.entries:
        present = [s in saved for s in entry.sources]
        if not any(present):
            continue
        if not all(present):
            missing = [s for s, p in zip(entry.sources, present, strict=True) if not p]
            raise ValueError(f"modules_to_save lacks {missing} beside the rest of {entry.target}, in {where}")
        value = entry.join([saved[s] for s in entry.sources])
        if tuple(value.shape) != shapes[entry.target]:
            raise ValueError(
                f"modules_to_save {list(entry.sources)} give {entry.target} the shape {tuple(value.shape)}, the base "
                f"has {shapes[entry.target]}, in {where}; give the --base the adapter was trained on"
            )
        tensors[entry.target] = value.contiguous()
        used.update(entry.sources)
    unknown = sorted(set(saved) - used)
    if unknown:
        raise ValueError(f"modules_to_save tensors {listing(unknown)} have no place in this base, in {where}")
    return tensors
