"""litliger checkpoint folder -> one GGUF file for llama.cpp (and what runs on it: Ollama, LM Studio, ...).

The weights take the path llama.cpp's own converter takes: the Hugging Face tensors of the family
(``to_hf.state_dict_to_hf``, the maps tested against transformers), then convert_hf_to_gguf.py's changes per
architecture and the names of gguf's own ``TensorNameMap``:

    family (config_to_hf)    GGUF architecture    what changes on the way
    llama, mistral           llama                q, k rows permuted per head (llama.cpp's rope rotates pairs)
    qwen2, qwen3             qwen2, qwen3         nothing
    gemma                    gemma                norm weights w -> 1 + w (llama.cpp's RMSNorm scales by w)
    gpt_neox                 gptneox              query_key_value rows back from per head [q k v] to [q | k | v]
    gpt2                     gpt2                 Conv1D weights transposed back to (out, in)

Tensor types follow convert_hf_to_gguf.py too: norms, biases, 1-D tensors and position embeddings stay f32, the
rest is ``dtype`` (q8_0 through gguf's own quantizer, falling back to f16 for a row length it cannot block).
The tokenizer and chat template go in the metadata (``gguf_tokenizer.py``). Fields llama.cpp cannot express
are refused with one line naming the field (``gguf_family``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.finetuned import exported_tensors, input_folders
from ..checkpoint.io import atomic_file, read_config
from ..checkpoint.layout import CONFIG_FILE
from ..checkpoint.safety import check_output_file
from ..model.config import Config
from .from_hf import main_dtype
from .gguf_tokenizer import gguf_vocab
from .hf_config import config_to_hf
from .to_hf import state_dict_to_hf

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
_STORED = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
# the GGUF architecture (gguf.MODEL_ARCH member) that runs each family
ARCHITECTURES = {
    "llama": "LLAMA",
    "mistral": "LLAMA",
    "qwen2": "QWEN2",
    "qwen3": "QWEN3",
    "gemma": "GEMMA",
    "gpt_neox": "GPTNEOX",
    "gpt2": "GPT2",
}
INSTALL = 'pip install "litliger[gguf]"'


def convert_to_gguf(
    checkpoint_dir: str | Path, out_file: str | Path, dtype: str | None = None, *, overwrite: bool = False
) -> Path:
    """Write the litliger checkpoint ``checkpoint_dir`` as the GGUF file ``out_file`` for llama.cpp.

    The file holds the weights, the hyperparameters, the tokenizer (tokens, types, merges, the pre-tokenizer's
    name, bos/eos/pad ids, add_bos) and the chat template. A finetuning step folder is merged on the way (its
    base + trained tensors, LoRA folded in). Prints one line on success: ``wrote <n> tensors (<dtype>) to
    <out_file>``. Written atomically (a hidden temporary file beside ``out_file``, renamed at the end); an
    existing file is replaced only with ``overwrite``, and a path inside the checkpoint, another checkpoint or a
    training run is refused always. Raises ``ValueError`` naming the field for a model llama.cpp cannot run as
    trained (e.g. ``sliding_window``) and for a tokenizer it cannot reproduce. Needs the ``gguf`` package.

    Args:
        checkpoint_dir: a litliger checkpoint folder, or a finetuning step folder (merged while converting).
        out_file: the .gguf file to write (a new file, else ``--overwrite true``).
        dtype: the type of the weight matrices: f32, f16, bf16 or q8_0 (8-bit blocks, about a quarter of f32);
            default: the checkpoint's stored dtype (f32, f16 or bf16). Norms and biases are always f32.
        overwrite: replace an existing ``out_file`` (never a path inside a checkpoint or a training run).
    """
    if dtype is not None and dtype not in GGUF_DTYPES:
        raise ValueError(
            f"got {dtype}, not a GGUF type litliger writes, in --dtype; use one of {', '.join(GGUF_DTYPES)}"
        )
    gguf = _import_gguf()
    checkpoint_dir, out_file = Path(checkpoint_dir), Path(out_file)
    inputs = input_folders(checkpoint_dir)
    check_output_file(out_file, inputs=inputs, overwrite=overwrite)
    config = read_config(checkpoint_dir)
    family = gguf_family(config, checkpoint_dir / CONFIG_FILE)
    vocab = gguf_vocab(checkpoint_dir, config.padded_vocab_size)  # refuses a tokenizer before the weights load

    state = exported_tensors(checkpoint_dir)  # a finetune step folder merged as merge_lora merges it
    dtype = dtype or _STORED.get(main_dtype(state), "f32")
    hf = state_dict_to_hf(state, config, family)
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[family])
    qtype = getattr(gguf.GGMLQuantizationType, dtype.upper())
    ftype = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[dtype]
    with atomic_file(out_file, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(config.name or checkpoint_dir.resolve().name)
        _add_hparams(writer, config, family, gguf)
        writer.add_file_type(getattr(gguf.LlamaFileType, ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(writer)
        n = 0
        for name, data in gguf_tensors(hf, config, family, arch, gguf):  # one float32 tensor at a time
            kind = _tensor_type(name, data, qtype, gguf)
            try:
                raw = gguf.quants.quantize(data, kind)
            except gguf.QuantError:  # a row length q8_0 cannot block (not a multiple of 32): f16, as llama.cpp does
                kind = gguf.GGMLQuantizationType.F16
                raw = gguf.quants.quantize(data, kind)
            writer.add_tensor(name, raw, raw_dtype=kind)
            n += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        check_output_file(out_file, inputs=inputs, overwrite=overwrite)  # again: it may have changed meanwhile
    print(f"wrote {n} tensors ({dtype}) to {out_file}")
    return out_file


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise ValueError(f"convert_to_gguf needs the gguf package, in the installation; {INSTALL}") from e
    return gguf


def gguf_family(config: Config, where: str | Path) -> str:
    """The family whose GGUF architecture runs ``config`` exactly as litliger does (``ARCHITECTURES``).

    ``config_to_hf`` refuses what no family can express; on top, what llama.cpp's architecture for the family
    lacks is refused here with one line naming the field (``where``: the model_config.yaml).
    """
    family = config_to_hf(config)["model_type"]
    arch = ARCHITECTURES[family].lower()

    def refuse(field: str, why: str) -> ValueError:
        return ValueError(
            f"{field}={getattr(config, field)!r} cannot be written to GGUF: {why}, in {where}; "
            "convert_to_hf writes this model for transformers"
        )

    if config.sliding_window is not None and config.sliding_window < config.block_size:
        raise refuse("sliding_window", f"llama.cpp's {arch} architecture attends to every earlier position")
    if family == "gemma" and not config.tie_embeddings:
        raise refuse("tie_embeddings", "llama.cpp's gemma architecture always uses the token embedding as its head")
    if config.rope_scaling is not None and config.rope_scaling["type"] == "llama3" and arch != "llama":
        raise refuse("rope_scaling", f"llama.cpp reads llama3 frequency factors in its llama architecture, not {arch}")
    if family == "qwen2" and config.n_head * config.head_size != config.n_embd:
        raise refuse("head_size", "llama.cpp's qwen2 architecture needs n_head * head_size == n_embd")
    return family


def gguf_tensors(
    hf: dict[str, torch.Tensor], config: Config, family: str, arch: Any, gguf: Any
) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of every tensor, from the family's Hugging Face tensors (consumed as they are
    used), changed as convert_hf_to_gguf.py changes them and named by gguf's ``TensorNameMap`` for ``arch``."""
    names = gguf.get_tensor_name_map(arch, config.n_layer)
    templates = [gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]]  # the tensors llama.cpp's arch has
    known = {t.format(bid=i) for t in templates for i in range(config.n_layer)} | set(templates)
    c = config
    for hf_name in list(hf):
        t = hf.pop(hf_name).float()
        if family in ("llama", "mistral"):  # llama.cpp's llama rope rotates (2i, 2i+1), transformers' (i, i + d/2)
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                t = _permute(t, c.n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                t = _permute(t, c.n_query_groups)
        elif family == "gemma" and hf_name.endswith("norm.weight"):
            t = t + 1  # transformers' Gemma scales by (1 + w); llama.cpp's RMSNorm by its weight
        elif family == "gpt_neox" and "query_key_value" in hf_name:
            t = t.reshape(c.n_head, 3, c.head_size, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
        elif family == "gpt2" and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or name.rsplit(".", 1)[0] not in known:
            raise AssertionError(f"{hf_name} has no tensor in llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} architecture")
        data = t.contiguous().numpy()
        yield name, data
        if name == "token_embd.weight" and family == "gpt_neox" and c.tie_embeddings:
            yield "output.weight", data  # llama.cpp's gptneox always reads a head: the tied one is the embedding
    if c.rope_scaling is not None and c.rope_scaling["type"] == "llama3":
        yield "rope_freqs.weight", _llama3_factors(c).numpy()


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's ``LlamaModel.permute``: each head's rows (x_0..x_{d/2-1}, y_0..) -> (x_0, y_0, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(config: Config) -> torch.Tensor:
    """Llama 3's per-frequency divisors (``rope_freqs``), as convert_hf_to_gguf.py computes them."""
    s = config.rope_scaling
    dim = config.rope_n_elem
    freqs = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen = s["original_max_seq_len"] / s["low_freq_factor"]
    high_wavelen = s["original_max_seq_len"] / s["high_freq_factor"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(s["factor"])
        else:
            smooth = (s["original_max_seq_len"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _tensor_type(name: str, data: np.ndarray, qtype: Any, gguf: Any) -> Any:
    """convert_hf_to_gguf.py's rule: 1-D tensors, norms, biases and position embeddings are f32, the rest ``qtype``."""
    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    if name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight":
        return gguf.GGMLQuantizationType.F32
    return qtype


def _add_hparams(writer: Any, config: Config, family: str, gguf: Any) -> None:
    """The ``<arch>.*`` keys llama.cpp reads for the family (convert_hf_to_gguf.py's ``set_gguf_parameters``)."""
    c = config
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_query_groups)
    if family not in ("gpt2", "gpt_neox"):
        writer.add_key_length(c.head_size)
        writer.add_value_length(c.head_size)
    if c.norm_class == "RMSNorm":
        writer.add_layer_norm_rms_eps(c.norm_eps)
    else:
        writer.add_layer_norm_eps(c.norm_eps)
    if c.rotary_fraction:
        writer.add_rope_dimension_count(c.rope_n_elem)
        writer.add_rope_freq_base(c.rope_base)
    if c.rope_scaling is not None and c.rope_scaling["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_scaling["factor"])
    if family == "gpt_neox":
        writer.add_parallel_residual(c.parallel_residual)
    if ARCHITECTURES[family] == "LLAMA":
        writer.add_vocab_size(c.padded_vocab_size)
