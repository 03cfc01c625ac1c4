"""Hugging Face ``config.json`` <-> litliger ``Config``, per architecture family.

``config_from_hf`` reads the keys of each ``model_type`` explicitly (both transformers 4's top-level
``rope_theta`` / ``rope_scaling`` and transformers 5's ``rope_parameters``); anything a ``Config`` cannot
express is a ``ValueError`` naming the key and its value, never silently dropped. ``config_to_hf`` picks the
family from the Config's fields (never its name) and refuses fields no family can express.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..model.config import Config

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt_neox", "gpt2")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma")
# transformers' activation names -> Config.gelu_approximate
_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
_MISSING = object()


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face model folder."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model folder: config.json is missing")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def hf_family(hf: Mapping[str, Any]) -> str:
    """The family (``model_type``) of a config.json, checked against the supported ones."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"config.json: model_type={model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return model_type


# --- Hugging Face -> litliger --------------------------------------------------------------------------


def config_from_hf(hf: Mapping[str, Any] | str | Path, name: str = "") -> Config:
    """The ``Config`` of a Hugging Face ``config.json`` (a parsed dict, or the folder holding it).

    ``padded_vocab_size`` is ``vocab_size`` (the embedding rows; the converter checks it against the weights).
    Raises ``ValueError`` naming the key and value of anything litliger's model cannot express.
    """
    if not isinstance(hf, Mapping):
        hf = read_hf_config(hf)
    family = hf_family(hf)
    get = _getter(hf, family)
    values = _FROM_HF[family](hf, get)
    vocab = get("vocab_size")
    return Config(
        name=name,
        vocab_size=vocab,
        padded_vocab_size=vocab,
        init_std=float(get("initializer_range", 0.02)),
        **values,
    )


def _getter(hf: Mapping[str, Any], family: str) -> Callable[..., Any]:
    def get(key: str, default: Any = _MISSING) -> Any:
        """``hf[key]``; a required key (no default) that is absent or null is an error naming it."""
        value = hf.get(key)
        if value is None and default is _MISSING:
            raise ValueError(f"config.json (model_type={family!r}) lacks the key {key!r}")
        return default if value is None else value

    return get


def _unsupported(family: str, key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.json (model_type={family!r}): {key}={value!r} is not supported: {why}")


def _rope(hf: Mapping[str, Any], family: str) -> tuple[float, dict[str, Any] | None, float | None]:
    """(rope_base, rope_scaling, partial_rotary_factor or None) from either config.json rope format."""
    # transformers 5 writes rope_parameters (theta inside); transformers 4 wrote rope_theta + rope_scaling.
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, Mapping) for v in params.values()):
        raise _unsupported(family, "rope_parameters", params, "per-layer-type rotary settings")
    base = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct")))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        scaling = None
    elif kind == "linear":
        scaling = {"type": "linear", "factor": float(params["factor"])}
    elif kind == "llama3":
        scaling = {
            "type": "llama3",
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            # transformers fills a missing value with max_position_embeddings
            "original_max_seq_len": int(
                params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
            ),
        }
    else:
        raise _unsupported(family, "rope_type", kind, "litliger implements default, linear and llama3 rotary scaling")
    return float(base), scaling, None if partial is None else float(partial)


def _sliding_window(hf: Mapping[str, Any], family: str, n_layer: int) -> int | None:
    """One window for every layer (or None); per-layer mixes of full and sliding attention are refused."""
    if family == "mistral":
        # MistralConfig's own default when the key is absent; null disables it
        return hf.get("sliding_window", 4096)
    if family in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window", False) or hf.get("sliding_window") is None:
            return None  # transformers sets sliding_window = None then, whatever layer_types says
        window = int(hf["sliding_window"])
        first = hf.get("max_window_layers", 28)
        kinds = hf.get("layer_types") or [
            "sliding_attention" if i >= first else "full_attention" for i in range(n_layer)
        ]
        if set(kinds) == {"sliding_attention"}:
            return window
        if set(kinds) == {"full_attention"}:
            return None
        raise _unsupported(family, "layer_types", kinds, "litliger uses one attention pattern in every layer")
    return None


def _llama_like(hf: Mapping[str, Any], get: Callable[..., Any], family: str) -> dict[str, Any]:
    n_embd, n_head = get("hidden_size"), get("num_attention_heads")
    n_layer = get("num_hidden_layers")
    base, scaling, partial = _rope(hf, family)
    if partial not in (None, 1.0):
        raise _unsupported(family, "partial_rotary_factor", partial, f"{family} rotates every head dim")
    values = dict(
        block_size=get("max_position_embeddings"),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        head_size=hf.get("head_dim") or n_embd // n_head,
        n_query_groups=hf.get("num_key_value_heads") or n_head,
        intermediate_size=get("intermediate_size"),
        norm_class="RMSNorm",
        norm_eps=float(get("rms_norm_eps")),
        rope_base=base,
        rope_scaling=scaling,
        rotary_fraction=1.0,
        parallel_residual=False,
        sliding_window=_sliding_window(hf, family, n_layer),
        bias=False,
        mlp_class="SwiGLUMLP",
    )
    attention_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    if family == "llama":
        # litliger's `bias` covers attention (q, k, v, o) and MLP together: only both or neither.
        if attention_bias != mlp_bias:
            key, value = ("mlp_bias", mlp_bias) if mlp_bias else ("attention_bias", attention_bias)
            raise _unsupported(
                family, key, value, f"litliger needs attention_bias == mlp_bias (got {attention_bias}, {mlp_bias})"
            )
        values["bias"] = attention_bias
    elif attention_bias and family in ("gemma", "qwen3"):  # mistral and qwen2 have no such switch
        raise _unsupported(family, "attention_bias", True, "q, k, v and o biases without MLP biases")
    if family == "qwen2":
        values["attn_bias"] = True  # Qwen2 always has q, k, v biases (and none on o_proj)
    if family == "qwen3":
        values["norm_qk"] = True
    if family == "gemma":
        # transformers 4 read `hidden_activation` first; Gemma's legacy "gelu" means the tanh approximation
        act = hf.get("hidden_activation") or get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise _unsupported(family, "hidden_activation", act, "Gemma's GeGLU uses the tanh GELU")
        values.update(mlp_class="GeGLUMLP", gelu_approximate="tanh", norm_offset=1.0, scale_embeddings=True)
    else:
        act = get("hidden_act", "silu")
        if act != "silu":
            raise _unsupported(family, "hidden_act", act, "the SwiGLU MLP uses silu")
    values["tie_embeddings"] = bool(hf.get("tie_word_embeddings", family == "gemma"))
    return values


def _gpt_neox(hf: Mapping[str, Any], get: Callable[..., Any]) -> dict[str, Any]:
    family = "gpt_neox"
    base, scaling, partial = _rope(hf, family)
    if not hf.get("attention_bias", True):
        # GPT-NeoX's MLP always has biases; litliger's `bias` switches attention and MLP biases together
        raise _unsupported(family, "attention_bias", False, "GPT-NeoX's MLP biases would remain")
    act = get("hidden_act", "gelu")
    if act not in _GELU:
        raise _unsupported(family, "hidden_act", act, f"GeluMLP supports {', '.join(_GELU)}")
    return dict(
        block_size=get("max_position_embeddings"),
        n_layer=get("num_hidden_layers"),
        n_embd=get("hidden_size"),
        n_head=get("num_attention_heads"),
        intermediate_size=get("intermediate_size"),
        norm_class="LayerNorm",
        norm_eps=float(get("layer_norm_eps", 1e-5)),
        rotary_fraction=0.25 if partial is None else partial,
        rope_base=base,
        rope_scaling=scaling,
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        bias=True,
        mlp_class="GeluMLP",
        gelu_approximate=_GELU[act],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_scheme="small_wang",
    )


def _gpt2(hf: Mapping[str, Any], get: Callable[..., Any]) -> dict[str, Any]:
    family = "gpt2"
    act = get("activation_function", "gelu_new")
    if act not in _GELU:
        raise _unsupported(family, "activation_function", act, f"GeluMLP supports {', '.join(_GELU)}")
    for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if hf.get(key, supported) != supported:
            raise _unsupported(family, key, hf[key], "litliger scales attention by 1/sqrt(head_size) only")
    if hf.get("add_cross_attention", False):
        raise _unsupported(family, "add_cross_attention", True, "litliger is decoder-only")
    n_embd = get("n_embd")
    return dict(
        block_size=get("n_positions"),
        n_layer=get("n_layer"),
        n_embd=n_embd,
        n_head=get("n_head"),
        intermediate_size=hf.get("n_inner") or 4 * n_embd,
        norm_class="LayerNorm",
        norm_eps=float(get("layer_norm_epsilon", 1e-5)),
        rotary_fraction=0.0,
        learned_pos_embeddings=True,
        bias=True,
        mlp_class="GeluMLP",
        gelu_approximate=_GELU[act],
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


_FROM_HF: dict[str, Callable[[Mapping[str, Any], Callable[..., Any]], dict[str, Any]]] = {
    **{f: (lambda hf, get, f=f: _llama_like(hf, get, f)) for f in _LLAMA_LIKE},
    "gpt_neox": _gpt_neox,
    "gpt2": _gpt2,
}


# --- litliger -> Hugging Face --------------------------------------------------------------------------


def family_of(config: Config) -> str:
    """The Hugging Face family that can hold ``config``, chosen from its fields (not its name)."""
    c = config
    if c.learned_pos_embeddings:
        return "gpt2"
    if c.norm_class == "LayerNorm":
        return "gpt_neox"
    if c.norm_offset or c.scale_embeddings or c.mlp_class == "GeGLUMLP":
        return "gemma"
    if c.norm_qk:
        return "qwen3"
    if c.attn_bias and not c.bias:
        return "qwen2"
    if c.sliding_window is not None:
        return "mistral"
    return "llama"


def config_to_hf(config: Config) -> dict[str, Any]:
    """The ``config.json`` dict of the Hugging Face family that expresses ``config`` exactly.

    Raises ``ValueError`` naming the first field that the chosen family (and so any family) cannot hold.
    """
    family = family_of(config)
    hf = _TO_HF[family](config)
    return {"architectures": [ARCHITECTURES[family]], "model_type": family, **hf}


def _require(config: Config, family: str, **expected: Any) -> None:
    for key, value in expected.items():
        if getattr(config, key) != value:
            raise ValueError(
                f"Config {config.name!r}: {key}={getattr(config, key)!r} cannot be expressed by any Hugging Face "
                f"family litliger converts to (the closest, {family!r}, needs {key}={value!r})"
            )


def _rope_to_hf(config: Config) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_theta": config.rope_base, "rope_type": "default"}
    scaling = config.rope_scaling
    if scaling is not None and scaling["type"] == "linear":
        params.update(rope_type="linear", factor=scaling["factor"])
    elif scaling is not None:
        params.update(
            rope_type="llama3",
            factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_position_embeddings=scaling["original_max_seq_len"],
        )
    # rope_parameters is transformers 5's format; rope_theta / rope_scaling keep transformers 4 readers exact.
    legacy_scaling = None if scaling is None else {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_parameters": params, "rope_theta": config.rope_base, "rope_scaling": legacy_scaling}


def _llama_like_to_hf(config: Config, family: str) -> dict[str, Any]:
    c = config
    _require(
        c, family, norm_class="RMSNorm", parallel_residual=False, rotary_fraction=1.0, lm_head_bias=False,
        learned_pos_embeddings=False,
    )  # fmt: skip
    if family == "gemma":
        _require(c, family, mlp_class="GeGLUMLP", gelu_approximate="tanh", norm_offset=1.0, scale_embeddings=True)
        _require(c, family, bias=False, attn_bias=False, norm_qk=False, sliding_window=None)
        act = {"hidden_act": "gelu_pytorch_tanh"}
    else:
        _require(c, family, mlp_class="SwiGLUMLP", norm_offset=0.0, scale_embeddings=False)
        act = {"hidden_act": "silu"}
    hf: dict[str, Any] = dict(
        vocab_size=c.padded_vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_query_groups,
        head_dim=c.head_size,
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings,
        initializer_range=c.init_std,
        **act,
        **_rope_to_hf(c),
    )
    if family == "llama":
        _require(c, family, norm_qk=False, sliding_window=None)
        hf.update(attention_bias=c.bias, mlp_bias=c.bias)
    elif family == "mistral":
        _require(c, family, bias=False, attn_bias=False, norm_qk=False)
        hf["sliding_window"] = c.sliding_window
    elif family in ("qwen2", "qwen3"):
        _require(c, family, bias=False, attn_bias=family == "qwen2", norm_qk=family == "qwen3")
        window = c.sliding_window is not None
        kind = "sliding_attention" if window else "full_attention"
        hf.update(
            use_sliding_window=window,
            sliding_window=c.sliding_window,
            max_window_layers=0 if window else c.n_layer,
            layer_types=[kind] * c.n_layer,
        )
        if family == "qwen3":
            hf["attention_bias"] = False
    else:
        hf["attention_bias"] = False
    return hf


def _gpt_neox_to_hf(config: Config) -> dict[str, Any]:
    c, family = config, "gpt_neox"
    # true division: a head_size that does not tile n_embd is refused too
    _require(c, family, mlp_class="GeluMLP", bias=True, n_query_groups=c.n_head, head_size=c.n_embd / c.n_head)
    _require(c, family, norm_qk=False, sliding_window=None, scale_embeddings=False, lm_head_bias=False)
    rope = _rope_to_hf(c)
    rope["rope_parameters"]["partial_rotary_factor"] = c.rotary_fraction
    return dict(
        vocab_size=c.padded_vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        max_position_embeddings=c.block_size,
        layer_norm_eps=c.norm_eps,
        hidden_act="gelu" if c.gelu_approximate == "none" else "gelu_pytorch_tanh",
        use_parallel_residual=c.parallel_residual,
        attention_bias=True,
        tie_word_embeddings=c.tie_embeddings,
        initializer_range=c.init_std,
        # transformers 4's names for the rotary settings
        rotary_pct=c.rotary_fraction,
        rotary_emb_base=c.rope_base,
        **rope,
    )


def _gpt2_to_hf(config: Config) -> dict[str, Any]:
    c, family = config, "gpt2"
    _require(c, family, rotary_fraction=0.0, mlp_class="GeluMLP", bias=True, parallel_residual=False)
    _require(c, family, n_query_groups=c.n_head, head_size=c.n_embd / c.n_head, norm_qk=False)
    _require(c, family, sliding_window=None, scale_embeddings=False, lm_head_bias=False)
    return dict(
        vocab_size=c.padded_vocab_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.intermediate_size,
        n_positions=c.block_size,
        layer_norm_epsilon=c.norm_eps,
        activation_function="gelu" if c.gelu_approximate == "none" else "gelu_new",
        tie_word_embeddings=c.tie_embeddings,
        initializer_range=c.init_std,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
    )


_TO_HF: dict[str, Callable[[Config], dict[str, Any]]] = {
    **{f: (lambda c, f=f: _llama_like_to_hf(c, f)) for f in _LLAMA_LIKE},
    "gpt_neox": _gpt_neox_to_hf,
    "gpt2": _gpt2_to_hf,
}
