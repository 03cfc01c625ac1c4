"""Hugging Face <-> litliger conversion: logits parity with transformers per family (both directions, torch and
Triton backends), bitwise round trips, every file layout, and errors that name the offending weight or key.

Every test builds tiny random Hugging Face models itself (no downloads), with every weight perturbed away
from its default (norm weights and biases random, not 1 / 0), so a weight that is not copied shows up.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers  # a test dependency (pyproject's test extra): missing, this module fails
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from litliger import GPT, Config
from litliger.checkpoint import load_state_dict
from litliger.checkpoint.checksums import write_checksums
from litliger.checkpoint.layout import CHECKSUMS_FILE, CONFIG_FILE, MODEL_FILE
from litliger.convert import config_from_hf, config_to_hf, convert_from_hf, convert_to_hf
from litliger.kernels import use_backend

VOCAB, T = 128, 12
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
LLAMA3_ROPE = {
    # theta 100 and original length 32 put the tiny model's 8 frequencies in all three llama3 bands
    "rope_type": "llama3",
    "rope_theta": 100.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
# family case -> (transformers config class, its arguments)
CASES = {
    "llama": ("LlamaConfig", dict(SMALL, attention_bias=True, mlp_bias=True)),
    "llama3": ("LlamaConfig", dict(SMALL, hidden_size=64, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(SMALL, sliding_window=4)),  # T=12 > window 4
    "qwen2": ("Qwen2Config", dict(SMALL, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(SMALL, head_dim=12)),  # head_dim != hidden / heads
    "gemma": ("GemmaConfig", dict(SMALL, head_dim=16, num_key_value_heads=1)),  # MQA, tied
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            rotary_pct=0.25,  # 4 of 16 head dims rotate
            use_parallel_residual=True,
        ),
    ),
    # the other GPT-NeoX block layout and activation
    "gpt_neox_seq": (
        "GPTNeoXConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            rotary_pct=0.5,
            use_parallel_residual=False,
            hidden_act="gelu_new",
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    ),
}


def hf_model(case: str, seed: int = 0, **overrides):
    """A tiny transformers model of ``case`` with every parameter set to random, non-default values."""
    cls_name, kwargs = CASES[case]
    config = getattr(transformers, cls_name)(**{**kwargs, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:  # norm weights: neither 1 (LayerNorm / RMSNorm default) nor 0 (Gemma's (1 + w) default)
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def our_logits(
    checkpoint_dir: Path, idx: torch.Tensor, backend: str = "torch", device: str | torch.device = "cpu", **overrides
) -> torch.Tensor:
    model = GPT.from_checkpoint(checkpoint_dir, device=device)
    if overrides:  # the same weights in a model built from a modified config
        changed = GPT(Config.from_dict({**model.config.to_dict(), **overrides}))
        changed.load_state_dict(model.state_dict())
        model = changed
    with torch.no_grad(), use_backend(backend):
        return model(idx.to(device)).cpu()


def sample_idx(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def read_tensors(folder: Path, name: str = MODEL_FILE) -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    """(case, HF folder, litliger folder, HF logits) for each family, converted once per module."""
    case = request.param
    root = tmp_path_factory.mktemp(case)
    model = hf_model(case)
    model.save_pretrained(root / "hf")
    convert_from_hf(root / "hf", root / "lit")
    return case, root / "hf", root / "lit", hf_logits(model, sample_idx())


# --- parity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_from_hf_logits_match_transformers(converted, backend, device):
    case, _, lit_dir, expected = converted
    # Triton runs on the GPU when there is one, else on CPU tensors through the interpreter
    device = device if backend == "triton" else "cpu"
    assert max_diff(our_logits(lit_dir, sample_idx(), backend, device), expected) < 1e-4


def test_to_hf_logits_match_and_round_trip_is_bitwise(converted, tmp_path):
    case, hf_dir, lit_dir, _ = converted
    out = convert_to_hf(lit_dir, tmp_path / "hf_out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_diff(hf_logits(reloaded, sample_idx(1)), our_logits(lit_dir, sample_idx(1))) < 1e-4

    original, back = read_tensors(hf_dir), read_tensors(out)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == json.loads((hf_dir / "config.json").read_text())["model_type"]
    assert hf["architectures"] == [type(reloaded).__name__] and hf["dtype"] == "float32"


def test_config_round_trips(converted):
    _, hf_dir, lit_dir, _ = converted
    config = Config.from_file(lit_dir / CONFIG_FILE)
    assert config == config_from_hf(hf_dir, name=hf_dir.name)
    assert config_from_hf(config_to_hf(config), name=config.name) == config


def test_llama3_rope_scaling_is_converted_and_matters(tmp_path):
    model = hf_model("llama3")
    model.save_pretrained(tmp_path / "hf")
    config = config_from_hf(tmp_path / "hf")
    assert config.rope_base == 100.0 and config.tie_embeddings
    assert config.rope_scaling == {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_seq_len": 32,
    }
    # transformers 4's format (top-level rope_theta, rope_scaling with "type") gives the same Config
    legacy = json.loads((tmp_path / "hf" / "config.json").read_text())
    params = legacy.pop("rope_parameters")
    legacy["rope_theta"] = params.pop("rope_theta")
    legacy["rope_scaling"] = {**params, "type": params.pop("rope_type")}
    assert config_from_hf(legacy) == config
    # the parity test can see a dropped scaling: without it the logits are far off
    convert_from_hf(tmp_path / "hf", tmp_path / "lit")
    expected = hf_logits(model, sample_idx())
    assert max_diff(our_logits(tmp_path / "lit", sample_idx()), expected) < 1e-4
    assert max_diff(our_logits(tmp_path / "lit", sample_idx(), rope_scaling=None), expected) > 1e-2


def test_sliding_window_matters(tmp_path):
    model = hf_model("mistral")
    model.save_pretrained(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "lit")
    assert Config.from_file(tmp_path / "lit" / CONFIG_FILE).sliding_window == 4
    expected = hf_logits(model, sample_idx())
    assert max_diff(our_logits(tmp_path / "lit", sample_idx(), sliding_window=None), expected) > 1e-2


# --- file layouts ------------------------------------------------------------------------------------------


def test_sharded_safetensors_input(tmp_path):
    model = hf_model("qwen2")
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    convert_from_hf(tmp_path / "single", tmp_path / "a")
    convert_from_hf(tmp_path / "sharded", tmp_path / "b")
    a, b = load_state_dict(tmp_path / "a"), load_state_dict(tmp_path / "b")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bin_input_with_legacy_names_and_buffers(tmp_path):
    """An old-style GPT-2 pytorch_model.bin: GPT2Model names (no "transformer." prefix), causal-mask buffers,
    and a stored copy of the tied head."""
    model = hf_model("gpt2")
    model.save_pretrained(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "expected")
    tensors = read_tensors(tmp_path / "hf")
    legacy = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(2):
        legacy[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
        legacy[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    legacy["lm_head.weight"] = legacy["wte.weight"].clone()
    (tmp_path / "hf" / MODEL_FILE).unlink()
    torch.save(legacy, tmp_path / "hf" / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # cannot mmap
    convert_from_hf(tmp_path / "hf", tmp_path / "lit")
    a, b = load_state_dict(tmp_path / "expected"), load_state_dict(tmp_path / "lit")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_bin_input(tmp_path):
    model = hf_model("gpt_neox")
    model.save_pretrained(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "expected")
    tensors = read_tensors(tmp_path / "hf")
    tensors["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)  # an old persistent buffer
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, shard_names in shards.items():
        torch.save({n: tensors[n] for n in shard_names}, tmp_path / "hf" / file)
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (tmp_path / "hf" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "hf" / MODEL_FILE).unlink()
    convert_from_hf(tmp_path / "hf", tmp_path / "lit")
    a, b = load_state_dict(tmp_path / "expected"), load_state_dict(tmp_path / "lit")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_argument(tmp_path):
    hf_model("gemma").save_pretrained(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "lit", dtype=torch.bfloat16)
    assert {t.dtype for t in load_state_dict(tmp_path / "lit").values()} == {torch.bfloat16}
    out = convert_to_hf(tmp_path / "lit", tmp_path / "back")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in read_tensors(out).values()} == {torch.bfloat16}
    convert_to_hf(tmp_path / "lit", tmp_path / "back32", dtype=torch.float32)
    assert {t.dtype for t in read_tensors(tmp_path / "back32").values()} == {torch.float32}


# --- errors name what is wrong and leave nothing behind ----------------------------------------------------


def _rewrite_weights(hf_dir: Path, edit) -> None:
    tensors = read_tensors(hf_dir)
    edit(tensors)
    save_file(tensors, str(hf_dir / MODEL_FILE), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight"),
        (lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}), "model.layers.0.mlp.extra.weight"),
        (lambda t: t.update({"model.layers.0.mlp.up_proj.bias": torch.ones(64)}), "model.layers.0.mlp.up_proj.bias"),
        (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.ones(32, 30)}), "attn.qkv.weight"),
        (
            # q 16 rows too long and k, v 8 too short: the fused total is right, the parts are not
            lambda t: t.update(
                {
                    "model.layers.1.self_attn.q_proj.weight": torch.ones(48, 32),
                    "model.layers.1.self_attn.k_proj.weight": torch.ones(8, 32),
                    "model.layers.1.self_attn.v_proj.weight": torch.ones(8, 32),
                }
            ),
            "cannot build transformer.h.1.attn.qkv.weight",
        ),
        (lambda t: t.update({"lm_head.weight": torch.ones(VOCAB, 32)}), "differs from model.embed_tokens.weight"),
    ],
    ids=["missing", "unknown", "unexpected-bias", "bad-shape", "bad-split", "tied-head-differs"],
)
def test_bad_weights_name_the_key_and_leave_no_output(tmp_path, edit, message):
    hf_model("qwen2").save_pretrained(tmp_path / "hf")  # tied embeddings
    _rewrite_weights(tmp_path / "hf", edit)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        convert_from_hf(tmp_path / "hf", tmp_path / "lit")
    assert list(tmp_path.iterdir()) == [tmp_path / "hf"]  # no output folder, no temporary leftovers


def test_failed_conversion_keeps_an_existing_output(tmp_path):
    hf_model("qwen2").save_pretrained(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "lit")
    before = load_state_dict(tmp_path / "lit")
    _rewrite_weights(tmp_path / "hf", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        convert_from_hf(tmp_path / "hf", tmp_path / "lit", overwrite=True)
    after = load_state_dict(tmp_path / "lit")
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="is the input folder"):  # would replace the folder being read
        convert_to_hf(tmp_path / "lit", tmp_path / "lit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "lit"]


def test_to_hf_names_a_missing_parameter_and_leaves_no_output(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "hf")
    lit = convert_from_hf(tmp_path / "hf", tmp_path / "lit")
    tensors = read_tensors(lit)
    tensors.pop("transformer.h.1.attn.qkv.bias")
    save_file(tensors, str(lit / MODEL_FILE))
    write_checksums(lit)  # a deliberate edit, recorded: the converter itself must name the missing tensor
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.qkv\.bias"):
        convert_to_hf(lit, tmp_path / "back")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "lit"]


def test_tied_head_stored_equal_is_accepted(tmp_path):
    hf_model("qwen2").save_pretrained(tmp_path / "hf")
    _rewrite_weights(tmp_path / "hf", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    convert_from_hf(tmp_path / "hf", tmp_path / "lit")
    assert "lm_head.weight" not in load_state_dict(tmp_path / "lit")


@pytest.mark.parametrize(
    "case, change, message",
    [
        ("llama", dict(attention_bias=False, mlp_bias=True), "mlp_bias=True"),
        ("llama", dict(model_type="bert"), "model_type='bert'"),
        ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
        ("gpt2", dict(activation_function="relu"), "activation_function='relu'"),
        ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
        ("gpt_neox", dict(attention_bias=False), "attention_bias=False"),
        ("qwen3", dict(attention_bias=True), "attention_bias=True"),
        ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "rope_type='yarn'"),
        (
            "qwen2",
            dict(use_sliding_window=True, sliding_window=4, layer_types=["full_attention", "sliding_attention"]),
            "layer_types",
        ),
        ("llama", dict(hidden_size=None), "'hidden_size'"),
    ],
)
def test_config_from_hf_refuses_what_litliger_cannot_express(tmp_path, case, change, message):
    hf_model(case).save_pretrained(tmp_path)
    hf = {**json.loads((tmp_path / "config.json").read_text()), **change}
    hf = {k: v for k, v in hf.items() if v is not None}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        config_from_hf(hf)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(norm_class="RMSNorm", mlp_class="GeluMLP"), "mlp_class='GeluMLP'"),
        (dict(norm_class="LayerNorm", n_query_groups=2), "n_query_groups=2"),
        (dict(norm_class="RMSNorm", mlp_class="SwiGLUMLP", lm_head_bias=True), "lm_head_bias=True"),
        (dict(norm_class="RMSNorm", mlp_class="SwiGLUMLP", norm_qk=True, bias=True), "bias=True"),
        (
            dict(norm_class="RMSNorm", mlp_class="GeGLUMLP", gelu_approximate="tanh", norm_offset=1.0),
            "scale_embeddings",
        ),
        (dict(norm_class="LayerNorm", learned_pos_embeddings=True, rotary_fraction=0.5), "rotary_fraction=0.5"),
    ],
)
def test_config_to_hf_refuses_what_no_family_can_express(fields, message):
    config = Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, **fields)
    with pytest.raises(ValueError, match=message):
        config_to_hf(config)


def test_config_to_hf_picks_the_family_from_fields():
    base = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, padded_vocab_size=VOCAB)
    base.update(norm_class="RMSNorm", mlp_class="SwiGLUMLP", bias=False)
    expected = {
        "llama": {},
        "mistral": dict(sliding_window=8),
        "qwen2": dict(attn_bias=True, bias=False),
        "qwen3": dict(norm_qk=True, bias=False),
        "gemma": dict(mlp_class="GeGLUMLP", gelu_approximate="tanh", norm_offset=1.0, scale_embeddings=True),
    }
    for family, fields in expected.items():
        config = Config(name="looks-like-gpt2", **{**base, **fields})  # the name plays no part
        hf = config_to_hf(config)
        assert hf["model_type"] == family
        assert config_from_hf(hf, name=config.name) == config


# --- tokenizer and checkpoint folder -----------------------------------------------------------------------


def test_tokenizer_files_and_eos_are_carried(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf_model("llama").save_pretrained(tmp_path / "hf")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))  # no bos / eos
    (tmp_path / "hf" / "generation_config.json").unlink()  # ids only in config.json (bos 1, eos 2)

    lit = convert_from_hf(tmp_path / "hf", tmp_path / "lit")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (lit / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    assert json.loads((lit / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    assert sorted(p.name for p in lit.iterdir()) == sorted(
        [MODEL_FILE, CONFIG_FILE, CHECKSUMS_FILE, "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    )

    out = convert_to_hf(lit, tmp_path / "back")
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    hf = json.loads((out / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (1, 2)
    assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("</s>") == 2


def test_converted_folder_loads_with_from_checkpoint(tmp_path):
    model = hf_model("gpt2")
    model.save_pretrained(tmp_path / "hf")
    lit = convert_from_hf(tmp_path / "hf", tmp_path / "lit")
    ours = GPT.from_checkpoint(lit, device="cpu")
    assert ours.config.tie_embeddings and ours.lm_head is None
    assert torch.equal(ours.transformer.wte.weight, model.transformer.wte.weight.detach())
    with safe_open(str(lit / MODEL_FILE), framework="pt") as f:
        assert set(f.keys()) == {n for n, _ in ours.named_parameters()}
