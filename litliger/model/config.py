"""The model configuration: one dataclass in which every architecture switch is a field.

Nothing in the model looks at a model's name; ``Config.from_name`` only looks up a registry of
published configurations (litliger/model/registry.py) and applies overrides.
"""

from __future__ import annotations

import contextlib
import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

NORM_CLASSES = ("RMSNorm", "LayerNorm")
MLP_CLASSES = ("GeluMLP", "SwiGLUMLP", "GeGLUMLP")
GELU_APPROXIMATIONS = ("none", "tanh")
INIT_SCHEMES = ("normal", "small_wang")
ROPE_SCALING_TYPES = ("linear", "llama3")
# Sizes that are counts: 0 or less would build no model or divide by zero.
POSITIVE_SIZES = ("block_size", "vocab_size", "padding_multiple", "n_layer", "n_embd", "n_head")
OPTIONAL_POSITIVE_SIZES = ("padded_vocab_size", "head_size", "n_query_groups", "intermediate_size", "sliding_window")


@dataclass
class Config:
    name: str = ""
    hf_config: dict[str, str] = field(default_factory=dict)  # {"org": ..., "name": ...} of the published model

    # sizes
    block_size: int = 4096  # longest sequence the model supports (rotary cache / learned positions)
    vocab_size: int = 50254  # tokenizer vocabulary
    padding_multiple: int = 512
    padded_vocab_size: int | None = None  # rows of the embedding and LM head (>= vocab_size)
    n_layer: int = 16
    n_embd: int = 4096
    n_head: int = 32
    head_size: int | None = None  # default n_embd // n_head
    n_query_groups: int | None = None  # number of key/value heads; default n_head (MHA), 1 is MQA
    intermediate_size: int | None = None  # MLP hidden size; default 4 * n_embd

    # attention
    attn_bias: bool = False  # bias on the fused qkv projection only (Qwen2)
    bias: bool = True  # bias on every linear layer of attention and MLP (GPT-2, GPT-NeoX)
    norm_qk: bool = False  # RMSNorm over the head dim of q and k before rotary (Qwen3)
    sliding_window: int | None = None  # attend to at most this many previous positions (Mistral)

    # positions
    rotary_fraction: float = 1.0  # fraction of each head's dims that rotate (GPT-NeoX: 0.25); 0 = no rotary
    rope_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear", "factor": f} or {"type": "llama3", ...}
    learned_pos_embeddings: bool = False  # GPT-2's wpe

    # block layout
    norm_class: Literal["RMSNorm", "LayerNorm"] = "LayerNorm"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w); Gemma stores w - 1, so 1.0
    parallel_residual: bool = False  # x + attn(norm_1(x)) + mlp(norm_2(x)) (GPT-NeoX)
    mlp_class: Literal["GeluMLP", "SwiGLUMLP", "GeGLUMLP"] = "GeluMLP"
    gelu_approximate: Literal["none", "tanh"] = "none"  # GeluMLP / GeGLUMLP activation

    # embeddings and head
    tie_embeddings: bool = False  # the LM head reuses the token embedding matrix
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(n_embd) (Gemma)
    lm_head_bias: bool = False

    # initialisation (litliger/nn/init.py)
    init_scheme: Literal["normal", "small_wang"] = "normal"
    init_std: float = 0.02  # the "normal" scheme's base std

    def __post_init__(self) -> None:
        for name in POSITIVE_SIZES + OPTIONAL_POSITIVE_SIZES:
            value = getattr(self, name)
            if (value is not None or name in POSITIVE_SIZES) and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"Config {self.name!r}: {name}={value!r} must be an integer >= 1")
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"Config {self.name!r}: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                    "set head_size explicitly"
                )
            self.head_size = self.n_embd // self.n_head
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.n_head % self.n_query_groups:
            raise ValueError(
                f"Config {self.name!r}: n_head={self.n_head} must be a multiple of n_query_groups={self.n_query_groups}"
            )
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.padded_vocab_size is None:
            self.padded_vocab_size = find_multiple(self.vocab_size, self.padding_multiple)
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"Config {self.name!r}: padded_vocab_size={self.padded_vocab_size} < vocab_size={self.vocab_size}"
            )
        self._check_choice("norm_class", NORM_CLASSES)
        self._check_choice("mlp_class", MLP_CLASSES)
        self._check_choice("gelu_approximate", GELU_APPROXIMATIONS)
        self._check_choice("init_scheme", INIT_SCHEMES)
        if not 0.0 <= self.rotary_fraction <= 1.0:
            raise ValueError(f"Config {self.name!r}: rotary_fraction={self.rotary_fraction} must be in [0, 1]")
        if self.rope_n_elem % 2:
            raise ValueError(
                f"Config {self.name!r}: rotary_fraction * head_size = {self.rope_n_elem} rotary dims must be even"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            if kind not in ROPE_SCALING_TYPES:
                raise ValueError(
                    f"Config {self.name!r}: rope_scaling type {kind!r}; choose one of {ROPE_SCALING_TYPES}"
                )
        if self.rope_n_elem == 0 and not self.learned_pos_embeddings:
            raise ValueError(f"Config {self.name!r}: no positional information (no rotary and no learned positions)")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"Config {self.name!r}: {name}={value!r}; choose one of {', '.join(choices)}")

    @property
    def rope_n_elem(self) -> int:
        """Rotary dims per head (the first ``rope_n_elem`` dims of every head rotate)."""
        return int(self.rotary_fraction * self.head_size)

    @property
    def qkv_size(self) -> int:
        """Output size of the fused qkv projection: [q (n_head heads) | k (n_query_groups) | v (n_query_groups)]."""
        return (self.n_head + 2 * self.n_query_groups) * self.head_size

    # --- construction -----------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        """A published configuration from the registry, with ``overrides`` applied."""
        from .registry import CONFIGS

        if name not in CONFIGS:
            close = [n for n in CONFIGS if name.lower() in n.lower()]
            hint = f"did you mean {', '.join(close[:5])}?" if close else ""
            raise ValueError(
                f"unknown model name {name!r}, in --model_name; {hint or '`litliger models` lists the names'}"
            )
        return cls.from_dict({**CONFIGS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """A Config from plain values (a YAML file, the registry): unknown names and wrong types are refused
        here, with the field named, rather than failing later somewhere inside the model."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            close = sorted({m for name in unknown for m in difflib.get_close_matches(name, known, n=1)})
            hint = f"did you mean {', '.join(close)}?" if close else "the fields are listed in litliger/model/config.py"
            raise ValueError(f"unknown Config fields {unknown}; {hint}")
        hints = typing.get_type_hints(cls)
        values = dict(values)
        for name, value in values.items():
            if isinstance(value, str) and float in typing.get_args(hints[name]) + (hints[name],):
                with contextlib.suppress(ValueError):  # PyYAML reads 1e-5 (no dot) as a string
                    values[name] = value = float(value)
            if not _has_type(value, hints[name]):
                raise ValueError(f"Config field {name}={value!r} must be of type {_type_name(hints[name])}; fix it")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        """Read a model_config.yaml; every problem with it is a ValueError that names the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"invalid YAML ({problem}{where}), in {path}; fix or regenerate the file") from e
        if not isinstance(values, dict):
            raise ValueError(f"not a mapping of Config fields, in {path}; fix or regenerate the file")
        try:
            return cls.from_dict(values)
        except ValueError as e:
            what, _, fix = str(e).partition("; ")
            raise ValueError(f"{what}, in {path}; {fix or 'fix the file'}") from e

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


def check_field_names(values: dict[str, Any], where: str) -> None:
    """Every key of ``values`` is a Config field; else one line naming the unknown ones and the valid ones."""
    known = [f.name for f in fields(Config)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        close = sorted({m for name in unknown for m in difflib.get_close_matches(name, known, n=1)})
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(
            f"unknown model field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}, in {where}; "
            f"{hint}the fields are {', '.join(known)}"
        )


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a plain (YAML) value fits a Config annotation; ints pass for floats, bools never for numbers."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return True  # __post_init__ names the choices
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - (n % k)


def num_parameters(config: Config, non_embedding: bool = False) -> int:
    """Parameter count of ``GPT(config)`` computed from the config alone (no model built)."""
    c = config
    hs, C, I = c.head_size, c.n_embd, c.intermediate_size
    attn = C * c.qkv_size + c.n_head * hs * C
    if c.bias or c.attn_bias:
        attn += c.qkv_size
    if c.bias:
        attn += C
    if c.norm_qk:
        attn += 2 * hs
    n_fc = 1 if c.mlp_class == "GeluMLP" else 2
    mlp = n_fc * C * I + I * C + ((n_fc * I + C) if c.bias else 0)
    norm = C * (2 if c.norm_class == "LayerNorm" else 1)
    block = attn + mlp + 2 * norm
    total = c.n_layer * block + norm  # + ln_f
    embed = c.padded_vocab_size * C + (c.block_size * C if c.learned_pos_embeddings else 0)
    head = 0 if c.tie_embeddings else c.padded_vocab_size * C
    head += c.padded_vocab_size if c.lm_head_bias else 0
    if non_embedding:
        return total
    return total + embed + head


def list_models(name: str | None = None) -> None:
    """``litliger models``: the registry's configs with their sizes, counted from the config (no weights built).

    Pick one with ``--model_name NAME`` and change any field of it with ``--model.FIELD VALUE``
    (``litliger pretrain --model_name debug-llama --model.n_layer 2``).

    Args:
        name: show only the configs whose name contains this text (case-insensitive), e.g. llama.
    """
    from .registry import CONFIGS

    names = [n for n in CONFIGS if name is None or name.lower() in n.lower()]
    if not names:
        raise ValueError(f"no model name contains {name!r}, in --name; run `litliger models` for every name")
    rows = [("name", "parameters", "layers", "n_embd", "heads", "kv heads", "block_size")]
    for n in names:
        c = Config.from_name(n)
        rows.append((n, _count(num_parameters(c)), c.n_layer, c.n_embd, c.n_head, c.n_query_groups, c.block_size))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        first, *rest = (str(v) for v in row)
        print("  ".join([first.ljust(widths[0]), *(v.rjust(w) for v, w in zip(rest, widths[1:], strict=True))]))


def _count(n: int) -> str:
    """1235814400 -> 1.24B, 162322944 -> 162M, 530816 -> 531K: three significant digits."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.3g}{unit}" if value < 1000 else f"{value:.0f}{unit}"
    return str(n)


def flops_per_token(config: Config, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 n_layer n_head head_size seq_len (PaLM, appendix B).

    N counts the matmul weights a token passes through: every block and the LM head, not the embedding
    lookup. The attention term is PaLM's (and torchtitan's): it does not halve for the causal mask.
    """
    n = num_parameters(config, non_embedding=True) + config.padded_vocab_size * config.n_embd
    return 6 * n + 12 * config.n_layer * config.n_head * config.head_size * seq_len
