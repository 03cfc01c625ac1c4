"""Hugging Face model folder -> litliger checkpoint folder (model.safetensors + model_config.yaml + tokenizer)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import torch

from ..checkpoint.io import atomic_dir, copy_tokenizer_files, write_model_files
from ..checkpoint.safety import check_output_dir
from ..model.config import Config
from .from_peft import convert_from_peft, is_peft_folder
from .hf_config import config_from_hf, hf_family, read_hf_config
from .hf_files import HFWeights
from .weight_maps import FamilyMap, family_map, listing, model_shapes

GENERATION_CONFIG = "generation_config.json"
DTYPE_NAMES = ("bfloat16", "float16", "float32")  # what --dtype takes (also any floating torch.<name>)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``--dtype`` as a torch dtype: a floating ``torch.dtype``, or its name, plain (``bfloat16``) or as an
    import path (``torch.bfloat16``); None keeps the stored dtypes. Anything else is a one-line ValueError."""
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if dtype is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    raise ValueError(
        f"got {dtype}, not a floating-point dtype, in --dtype; use one of {', '.join(DTYPE_NAMES)} "
        "(or torch.<name> of another floating-point dtype)"
    )


def written(tensors: dict[str, torch.Tensor], folder: str | Path) -> None:
    """The one line a conversion prints on success: how many tensors, their main dtype, and where."""
    print(f"wrote {len(tensors)} tensors ({main_dtype(tensors)}) to {folder}")


def main_dtype(tensors: dict[str, torch.Tensor]) -> str:
    """The floating dtype holding most of the elements, as config.json spells it ("bfloat16")."""
    counts = Counter({t.dtype: 0 for t in tensors.values() if t.is_floating_point()})
    for t in tensors.values():
        if t.is_floating_point():
            counts[t.dtype] += t.numel()
    return str(counts.most_common(1)[0][0]).removeprefix("torch.")


def convert_from_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | str | None = None,
    *,
    base: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert the Hugging Face model in ``hf_dir`` into the litliger checkpoint folder ``out_dir``; or, when
    ``hf_dir`` is a PEFT LoRA adapter (it holds adapter_config.json), into a finetune step folder on the litliger
    checkpoint ``base`` (``convert_from_peft``).

    Reads config.json and the weights (safetensors or .bin, sharded or not), maps every weight through the
    family's explicit map, and writes ``out_dir`` atomically: on any error nothing is left behind and an
    existing ``out_dir`` is untouched. Tensors keep their stored dtype unless ``dtype`` is given. Prints one
    line on success: ``wrote <n> tensors (<dtype>) to <out_dir>``.
    Publishing replaces ``out_dir`` whole, so a non-empty one is refused unless ``overwrite``, and the input,
    a folder around or inside it, or a training run's folder is refused always (see ``check_output_dir``).
    Raises ``ValueError`` naming any missing, unknown or mis-shaped weight, and any config.json setting the
    litliger model cannot express.

    Args:
        hf_dir: a Hugging Face model folder: config.json, the weights (safetensors or .bin) and tokenizer files.
        out_dir: the litliger checkpoint folder to write (a new or empty one, else ``--overwrite true``).
        dtype: cast floating-point tensors to this dtype: bfloat16, float16 or float32 (a torch.dtype, or
            torch.<name>, also works); default: keep them.
        base: for a PEFT adapter folder: the litliger checkpoint folder of the model it adapts (converted with
            convert_from_hf); the output is a finetune step folder on it.
        overwrite: replace a non-empty ``out_dir`` (never the input, a folder around or inside it, or a run).
    """
    dtype = resolve_dtype(dtype)
    hf_dir = Path(hf_dir)
    if is_peft_folder(hf_dir):
        if base is None:
            raise ValueError(
                f"{hf_dir} is a PEFT adapter (adapter_config.json), in --base; name the litliger checkpoint folder "
                "of the model it adapts with --base (convert that model with convert_from_hf first)"
            )
        written(convert_from_peft(hf_dir, out_dir, base, dtype, overwrite=overwrite), out_dir)
        return Path(out_dir)
    if base is not None:
        raise ValueError(
            f"{hf_dir} is not a PEFT adapter folder (no adapter_config.json), in --base; --base is for adapters: "
            "drop it to convert a full model"
        )
    check_output_dir(out_dir, inputs=[hf_dir], overwrite=overwrite)
    hf = read_hf_config(hf_dir)
    family = hf_family(hf)
    config = config_from_hf(hf, name=hf_dir.resolve().name)
    with HFWeights(hf_dir) as weights:
        config = _with_embedding_rows(config, weights, family)
        state_dict = state_dict_from_hf(weights, config, family, dtype)
    with atomic_dir(out_dir) as tmp:
        write_model_files(tmp, state_dict, config, save_tokenizer=lambda folder: copy_hf_tokenizer(hf_dir, folder, hf))
        check_output_dir(out_dir, inputs=[hf_dir], overwrite=overwrite)  # again: it may have changed meanwhile
    written(state_dict, out_dir)
    return Path(out_dir)


def _with_embedding_rows(config: Config, weights: HFWeights, family: str) -> Config:
    """``padded_vocab_size`` is the number of embedding rows actually stored."""
    fmap = family_map(family, config)
    stored = _canonical_names(weights.keys(), fmap, weights.hf_dir)
    if fmap.embedding not in stored:
        raise ValueError(f"{weights.hf_dir}: the token embedding {fmap.embedding} is missing")
    rows = weights.shape(stored[fmap.embedding])[0]
    if rows == config.padded_vocab_size:
        return config
    return dataclasses.replace(config, padded_vocab_size=rows, vocab_size=min(config.vocab_size, rows))


def _canonical_names(keys: list[str], fmap: FamilyMap, where: Path) -> dict[str, str]:
    """Canonical Hugging Face name -> the name as stored (some families have older spellings)."""
    stored: dict[str, str] = {}
    for key in keys:
        name = fmap.aliases(key)
        if name in stored:
            raise ValueError(f"{where}: {stored[name]!r} and {key!r} are the same weight stored twice")
        stored[name] = key
    return stored


def state_dict_from_hf(
    weights: HFWeights, config: Config, family: str, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every litliger parameter of ``GPT(config)``, each produced exactly once from the Hugging Face tensors.

    Every stored Hugging Face tensor must be consumed by the map, be a listed ignorable buffer, or be a
    stored copy of a tied head equal to the embedding; anything else is an error that names it.
    """
    where = weights.hf_dir
    fmap = family_map(family, config)
    stored = _canonical_names(weights.keys(), fmap, where)
    needed = {s for e in fmap.entries for s in e.sources}
    missing = needed - set(stored)
    if missing:
        raise ValueError(f"{where}: missing weights {listing(missing)} needed by the {family} map")
    tied_copy = {fmap.head} if config.tie_embeddings else set()
    unknown = {n for n in stored if n not in needed and n not in tied_copy and not fmap.is_ignorable(n)}
    if unknown:
        raise ValueError(
            f"{where}: unknown weights {listing({stored[n] for n in unknown})}: the {family} map has no place for "
            "them (converting would silently drop them)"
        )
    head_copy, embedding = stored.get(fmap.head), stored[fmap.embedding]
    if config.tie_embeddings and head_copy and not torch.equal(weights.get(head_copy), weights.get(embedding)):
        raise ValueError(f"{where}: tie_word_embeddings is true but the stored {head_copy} differs from {embedding}")

    shapes = model_shapes(config)
    state_dict: dict[str, torch.Tensor] = {}
    for entry in fmap.entries:  # one litliger tensor at a time: only its sources are read
        sources = [stored[s] for s in entry.sources]
        try:
            value = entry.join([weights.get(s) for s in sources])
        except RuntimeError as e:
            raise ValueError(f"{where}: cannot build {entry.target} from {sources}: {e}") from e
        if entry.target not in shapes or tuple(value.shape) != shapes[entry.target]:
            raise ValueError(
                f"{where}: {sources} give {entry.target} the shape {tuple(value.shape)}, but the model "
                f"expects {shapes.get(entry.target)}; config.json and the weights disagree"
            )
        if entry.target in state_dict:
            raise AssertionError(f"{entry.target} is produced twice by the {family} map")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state_dict[entry.target] = value
    unfilled, extra = set(shapes) - set(state_dict), set(state_dict) - set(shapes)
    if unfilled or extra:
        raise AssertionError(
            f"the {family} map does not fill the model exactly: unfilled {listing(unfilled)}, "
            f"not in the model {listing(extra)}"
        )
    return state_dict


def copy_hf_tokenizer(hf_dir: Path, folder: Path, hf: dict) -> None:
    """Tokenizer files, plus generation_config.json so the tokenizer loader can find bos/eos ids.

    generation_config.json is copied when present; otherwise the bos/eos ids of config.json (if any) are
    written into one, since a litliger folder holds no config.json.
    """
    copy_tokenizer_files(hf_dir, folder)
    source = hf_dir / GENERATION_CONFIG
    if source.is_file():
        shutil.copy2(source, folder / GENERATION_CONFIG)
        return
    ids = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    if ids:
        with open(folder / GENERATION_CONFIG, "w", encoding="utf-8") as f:
            json.dump(ids, f, indent=2)
