"""Registry of published model configurations (values from each model's Hugging Face config.json).

Each entry is a plain dict of ``Config`` fields; ``Config.from_name(name, **overrides)`` builds one.
"""

from __future__ import annotations

from typing import Any


def _pythia(name: str, n_layer: int, n_embd: int, n_head: int, block_size: int = 2048) -> dict[str, Any]:
    # GPT-NeoX: LayerNorm, parallel residual, 25% rotary, biases everywhere, exact GELU, untied head.
    return dict(
        name=name,
        hf_config={"org": "EleutherAI", "name": name},
        block_size=block_size,
        vocab_size=50254,
        padding_multiple=128,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        intermediate_size=4 * n_embd,
        rotary_fraction=0.25,
        parallel_residual=True,
        bias=True,
        norm_class="LayerNorm",
        norm_eps=1e-5,
        mlp_class="GeluMLP",
        gelu_approximate="none",
        init_scheme="small_wang",
    )


def _gpt2(name: str, n_layer: int, n_embd: int, n_head: int) -> dict[str, Any]:
    # GPT-2: learned positions, LayerNorm, tanh-GELU, biases, tied embeddings.
    return dict(
        name=name,
        hf_config={"org": "openai-community", "name": name},
        block_size=1024,
        vocab_size=50257,
        padding_multiple=64,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        intermediate_size=4 * n_embd,
        rotary_fraction=0.0,
        learned_pos_embeddings=True,
        bias=True,
        norm_class="LayerNorm",
        norm_eps=1e-5,
        mlp_class="GeluMLP",
        gelu_approximate="tanh",
        tie_embeddings=True,
    )


def _llama(name: str, org: str, **values: Any) -> dict[str, Any]:
    # Llama family: RMSNorm, SwiGLU, rotary on every dim, no biases, pre-norm sequential blocks.
    base = dict(
        name=name,
        hf_config={"org": org, "name": name},
        bias=False,
        norm_class="RMSNorm",
        norm_eps=1e-5,
        mlp_class="SwiGLUMLP",
        rotary_fraction=1.0,
        parallel_residual=False,
    )
    return {**base, **values}


_LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}

CONFIGS: dict[str, dict[str, Any]] = {}


def _register(cfg: dict[str, Any]) -> None:
    CONFIGS[cfg["name"]] = cfg


for _args in [
    ("pythia-14m", 6, 128, 4, 512),
    ("pythia-70m", 6, 512, 8),
    ("pythia-160m", 12, 768, 12),
    ("pythia-410m", 24, 1024, 16),
    ("pythia-1b", 16, 2048, 8),
]:
    _register(_pythia(*_args))

_register(_gpt2("gpt2", 12, 768, 12))
_register(_gpt2("gpt2-medium", 24, 1024, 16))

_register(
    _llama(
        "TinyLlama-1.1B-intermediate-step-1431k-3T",
        "TinyLlama",
        block_size=2048,
        vocab_size=32000,
        padding_multiple=64,
        n_layer=22,
        n_embd=2048,
        n_head=32,
        n_query_groups=4,
        intermediate_size=5632,
    )
)
_register(
    _llama(
        "Llama-3.2-1B",
        "meta-llama",
        block_size=131072,
        vocab_size=128256,
        padded_vocab_size=128256,
        n_layer=16,
        n_embd=2048,
        n_head=32,
        n_query_groups=8,
        intermediate_size=8192,
        rope_base=500000.0,
        rope_scaling={"type": "llama3", "factor": 32.0, **_LLAMA3_SCALING},
        tie_embeddings=True,
    )
)
_register(
    _llama(
        "Llama-3.1-8B",
        "meta-llama",
        block_size=131072,
        vocab_size=128256,
        padded_vocab_size=128256,
        n_layer=32,
        n_embd=4096,
        n_head=32,
        n_query_groups=8,
        intermediate_size=14336,
        rope_base=500000.0,
        rope_scaling={"type": "llama3", "factor": 8.0, **_LLAMA3_SCALING},
    )
)
_register(
    _llama(
        "Mistral-7B-v0.1",
        "mistralai",
        block_size=32768,
        vocab_size=32000,
        padded_vocab_size=32000,
        n_layer=32,
        n_embd=4096,
        n_head=32,
        n_query_groups=8,
        intermediate_size=14336,
        sliding_window=4096,
    )
)
for _name, _layers, _embd, _heads, _inter, _block in [
    ("Qwen2.5-0.5B", 24, 896, 14, 4864, 32768),
    ("Qwen2.5-1.5B", 28, 1536, 12, 8960, 131072),
]:
    _register(
        _llama(
            _name,
            "Qwen",
            block_size=_block,
            vocab_size=151643,
            padded_vocab_size=151936,
            n_layer=_layers,
            n_embd=_embd,
            n_head=_heads,
            n_query_groups=2,
            intermediate_size=_inter,
            attn_bias=True,
            norm_eps=1e-6,
            rope_base=1000000.0,
            tie_embeddings=True,
        )
    )
_register(
    _llama(
        "Qwen3-0.6B",
        "Qwen",
        block_size=40960,
        vocab_size=151643,
        padded_vocab_size=151936,
        n_layer=28,
        n_embd=1024,
        n_head=16,
        head_size=128,
        n_query_groups=8,
        intermediate_size=3072,
        norm_qk=True,
        norm_eps=1e-6,
        rope_base=1000000.0,
        tie_embeddings=True,
    )
)
_register(
    _llama(
        "gemma-2b",
        "google",
        block_size=8192,
        vocab_size=256000,
        padded_vocab_size=256000,
        n_layer=18,
        n_embd=2048,
        n_head=8,
        head_size=256,
        n_query_groups=1,
        intermediate_size=16384,
        mlp_class="GeGLUMLP",
        gelu_approximate="tanh",
        norm_eps=1e-6,
        norm_offset=1.0,
        scale_embeddings=True,
        tie_embeddings=True,
    )
)

# Tiny configs for tests, debugging and the embedded pretraining run (no published weights).
_register(
    _llama(
        "debug-llama",
        "litliger",
        block_size=512,
        vocab_size=2048,
        padding_multiple=64,
        n_layer=4,
        n_embd=128,
        n_head=4,
        n_query_groups=2,
        intermediate_size=384,
    )
)
_register({**_pythia("debug-pythia", 2, 64, 4, 256), "hf_config": {}, "vocab_size": 1024})
_register({**_gpt2("debug-gpt2", 2, 64, 4), "hf_config": {}, "vocab_size": 1024, "block_size": 256})
