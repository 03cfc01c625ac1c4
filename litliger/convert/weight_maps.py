"""Explicit Hugging Face <-> litliger weight-name maps and tensor transforms, one per family.

Each ``WeightEntry`` produces one litliger parameter from one or more Hugging Face tensors and back:

- llama, mistral, qwen2, qwen3, gemma: q, k, v projections are concatenated into ``attn.qkv``
  (rows ``[q | k | v]``), everything else is copied as stored. Gemma's norm weights are stored as ``w``
  of ``(1 + w)`` on both sides (litliger's ``norm_offset=1``), so they copy unchanged.
- gpt_neox: ``query_key_value`` holds, per head, ``[q_h | k_h | v_h]`` (interleaved); litliger holds all
  q heads, then all k heads, then all v heads.
- gpt2: ``Conv1D`` stores ``weight`` as (in, out): transposed to ``Linear``'s (out, in).

The maps are built from the ``Config`` (biases, qk-norm, tied head exist or not), and the converters check
that they produce exactly the parameters of ``GPT(config)``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..model.config import Config

Join = Callable[[Sequence[torch.Tensor]], torch.Tensor]
Split = Callable[[torch.Tensor], list[torch.Tensor]]


@dataclass(frozen=True)
class WeightEntry:
    """``target`` (litliger name) = ``join(sources)``; ``split(target)`` gives the sources back, in order."""

    target: str
    sources: tuple[str, ...]
    join: Join
    split: Split


@dataclass(frozen=True)
class FamilyMap:
    """Everything a converter needs to know about one family's Hugging Face names."""

    entries: list[WeightEntry]
    embedding: str  # Hugging Face name of the token embedding
    head: str  # Hugging Face name of the LM head (may be stored even when tied to the embedding)
    ignorable: tuple[re.Pattern, ...] = ()  # buffers of older checkpoints, not parameters
    aliases: Callable[[str], str] = field(default=lambda name: name)  # other spellings -> the canonical name

    def is_ignorable(self, name: str) -> bool:
        return any(p.fullmatch(name) for p in self.ignorable)


# --- transforms ------------------------------------------------------------------------------------------


def _copy() -> tuple[Join, Split]:
    return (lambda ts: ts[0]), (lambda t: [t])


def _concat_rows(sizes: tuple[int, ...]) -> tuple[Join, Split]:
    def join(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        # each part on its own: a q that is too long and a k that is too short could still fill the total
        rows = tuple(t.shape[0] for t in ts)
        if rows != sizes:
            raise RuntimeError(f"the parts have {rows} rows, the config needs {sizes}")
        return torch.cat(list(ts), dim=0)

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        # split() returns views into one storage: clone so each Hugging Face tensor owns its memory
        return [p.clone() for p in t.split(sizes, dim=0)]

    return join, split


def _transpose() -> tuple[Join, Split]:
    return (lambda ts: ts[0].t().contiguous()), (lambda t: [t.t().contiguous()])


def _neox_qkv(n_head: int, head_size: int) -> tuple[Join, Split]:
    # Hugging Face rows: (n_head, 3, hs) -- per head q, k, v. litliger rows: (3, n_head, hs).
    def join(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        w = ts[0]
        return w.reshape(n_head, 3, head_size, *w.shape[1:]).transpose(0, 1).reshape(w.shape)

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        return [t.reshape(3, n_head, head_size, *t.shape[1:]).transpose(0, 1).reshape(t.shape)]

    return join, split


def _entry(target: str, sources: str | tuple[str, ...], transform: tuple[Join, Split]) -> WeightEntry:
    sources = (sources,) if isinstance(sources, str) else sources
    return WeightEntry(target, sources, *transform)


def _linear(
    target: str, source: str, bias: bool, transform: Callable[[], tuple[Join, Split]] = _copy
) -> list[WeightEntry]:
    """``target.weight`` <- ``source.weight`` and, when the layer has one, ``target.bias`` <- ``source.bias``."""
    entries = [_entry(f"{target}.weight", f"{source}.weight", transform())]
    if bias:
        entries.append(_entry(f"{target}.bias", f"{source}.bias", _copy()))
    return entries


def _norm(target: str, source: str, config: Config) -> list[WeightEntry]:
    return _linear(target, source, bias=config.norm_class == "LayerNorm")


def _head(config: Config, source: str) -> list[WeightEntry]:
    # a tied head is the embedding: no parameter of its own (a stored copy is checked by the converter)
    return [] if config.tie_embeddings else _linear("lm_head", source, config.lm_head_bias)


# --- families ---------------------------------------------------------------------------------------------


def _llama_like(config: Config) -> FamilyMap:
    c = config
    hs = c.head_size
    qkv_sizes = (c.n_head * hs, c.n_query_groups * hs, c.n_query_groups * hs)
    entries = [_entry("transformer.wte.weight", "model.embed_tokens.weight", _copy())]
    for i in range(c.n_layer):
        t, s = f"transformer.h.{i}", f"model.layers.{i}"
        entries += _norm(f"{t}.norm_1", f"{s}.input_layernorm", c)
        qkv = tuple(f"{s}.self_attn.{p}_proj" for p in "qkv")
        entries.append(_entry(f"{t}.attn.qkv.weight", tuple(f"{n}.weight" for n in qkv), _concat_rows(qkv_sizes)))
        if c.bias or c.attn_bias:
            entries.append(_entry(f"{t}.attn.qkv.bias", tuple(f"{n}.bias" for n in qkv), _concat_rows(qkv_sizes)))
        if c.norm_qk:
            entries.append(_entry(f"{t}.attn.q_norm.weight", f"{s}.self_attn.q_norm.weight", _copy()))
            entries.append(_entry(f"{t}.attn.k_norm.weight", f"{s}.self_attn.k_norm.weight", _copy()))
        entries += _linear(f"{t}.attn.proj", f"{s}.self_attn.o_proj", c.bias)
        entries += _norm(f"{t}.norm_2", f"{s}.post_attention_layernorm", c)
        entries += _linear(f"{t}.mlp.fc_1", f"{s}.mlp.gate_proj", c.bias)
        entries += _linear(f"{t}.mlp.fc_2", f"{s}.mlp.up_proj", c.bias)
        entries += _linear(f"{t}.mlp.proj", f"{s}.mlp.down_proj", c.bias)
    entries += _norm("transformer.ln_f", "model.norm", c)
    entries += _head(c, "lm_head")
    return FamilyMap(
        entries,
        embedding="model.embed_tokens.weight",
        head="lm_head.weight",
        # rotary inverse frequencies that transformers < 4.31 saved as persistent buffers
        ignorable=(re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),),
    )


def _gpt_neox(config: Config) -> FamilyMap:
    c = config
    entries = [_entry("transformer.wte.weight", "gpt_neox.embed_in.weight", _copy())]
    for i in range(c.n_layer):
        t, s = f"transformer.h.{i}", f"gpt_neox.layers.{i}"
        entries += _norm(f"{t}.norm_1", f"{s}.input_layernorm", c)
        qkv = f"{s}.attention.query_key_value"
        entries.append(_entry(f"{t}.attn.qkv.weight", f"{qkv}.weight", _neox_qkv(c.n_head, c.head_size)))
        if c.bias:
            entries.append(_entry(f"{t}.attn.qkv.bias", f"{qkv}.bias", _neox_qkv(c.n_head, c.head_size)))
        entries += _linear(f"{t}.attn.proj", f"{s}.attention.dense", c.bias)
        entries += _norm(f"{t}.norm_2", f"{s}.post_attention_layernorm", c)
        entries += _linear(f"{t}.mlp.fc", f"{s}.mlp.dense_h_to_4h", c.bias)
        entries += _linear(f"{t}.mlp.proj", f"{s}.mlp.dense_4h_to_h", c.bias)
    entries += _norm("transformer.ln_f", "gpt_neox.final_layer_norm", c)
    entries += _head(c, "embed_out")
    return FamilyMap(
        entries,
        embedding="gpt_neox.embed_in.weight",
        head="embed_out.weight",
        # causal-mask and rotary buffers of older (pytorch_model.bin) checkpoints, e.g. Pythia's
        ignorable=(re.compile(r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)"),),
        # transformers 5 loads the head under either name; Pythia's files say embed_out
        aliases=lambda name: "embed_out.weight" if name == "lm_head.weight" else name,
    )


def _gpt2(config: Config) -> FamilyMap:
    c = config
    entries = [
        _entry("transformer.wte.weight", "transformer.wte.weight", _copy()),
        _entry("transformer.wpe.weight", "transformer.wpe.weight", _copy()),
    ]
    for i in range(c.n_layer):
        t = s = f"transformer.h.{i}"
        entries += _norm(f"{t}.norm_1", f"{s}.ln_1", c)
        entries += _linear(f"{t}.attn.qkv", f"{s}.attn.c_attn", c.bias, _transpose)  # c_attn rows are [q | k | v]
        entries += _linear(f"{t}.attn.proj", f"{s}.attn.c_proj", c.bias, _transpose)
        entries += _norm(f"{t}.norm_2", f"{s}.ln_2", c)
        entries += _linear(f"{t}.mlp.fc", f"{s}.mlp.c_fc", c.bias, _transpose)
        entries += _linear(f"{t}.mlp.proj", f"{s}.mlp.c_proj", c.bias, _transpose)
    entries += _norm("transformer.ln_f", "transformer.ln_f", c)
    entries += _head(c, "lm_head")
    return FamilyMap(
        entries,
        embedding="transformer.wte.weight",
        head="lm_head.weight",
        # causal-mask buffers of older checkpoints (openai-community/gpt2's files hold them)
        ignorable=(re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)"),),
        # GPT2Model checkpoints (openai-community/gpt2) store names without the "transformer." prefix
        aliases=_gpt2_alias,
    )


def _gpt2_alias(name: str) -> str:
    return name if name.startswith("transformer.") or name.startswith("lm_head.") else f"transformer.{name}"


_FAMILY_MAPS: dict[str, Callable[[Config], FamilyMap]] = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "qwen3": _llama_like,
    "gemma": _llama_like,
    "gpt_neox": _gpt_neox,
    "gpt2": _gpt2,
}


def family_map(family: str, config: Config) -> FamilyMap:
    """The weight map of ``family`` for a model of shape ``config``; checks that names are used once."""
    if family not in _FAMILY_MAPS:
        raise ValueError(f"no weight map for model_type={family!r}; supported: {', '.join(_FAMILY_MAPS)}")
    fmap = _FAMILY_MAPS[family](config)
    for kind, names in (("litliger", [e.target for e in fmap.entries]), ("Hugging Face", _sources(fmap))):
        repeated = sorted(n for n, count in Counter(names).items() if count > 1)
        if repeated:
            raise AssertionError(f"{family} weight map uses the {kind} names {repeated} more than once")
    return fmap


def _sources(fmap: FamilyMap) -> list[str]:
    return [s for e in fmap.entries for s in e.sources]


def model_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every parameter of ``GPT(config)`` (built on the meta device: no memory)."""
    from ..model.gpt import GPT

    with torch.device("meta"):
        model = GPT(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def listing(names: set[str] | list[str]) -> str:
    """Sorted names for an error message, the first ten and a count of the rest."""
    names = sorted(names)
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return f"{names[:10]}{more}"
