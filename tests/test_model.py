"""GPT and Config: shapes, the fused loss against logits, published configs, checkpoint folders."""

import math

import pytest
import torch
import torch.nn.functional as F

from litliger import GPT, Config
from litliger.checkpoint import load_model_weights, parameter_state_dict, save_checkpoint
from litliger.checkpoint.layout import MODEL_FILE
from litliger.kernels import use_backend
from litliger.model.config import flops_per_token, num_parameters
from litliger.model.registry import CONFIGS

# Tiny variants of every architecture family in the registry.
FAMILIES = {
    "llama": "debug-llama",
    "pythia": "debug-pythia",
    "gpt2": "debug-gpt2",
    "qwen2": "Qwen2.5-0.5B",
    "qwen3": "Qwen3-0.6B",
    "gemma": "gemma-2b",
    "mistral": "Mistral-7B-v0.1",
}
TINY = dict(n_layer=2, n_embd=64, n_head=4, intermediate_size=80, block_size=32, vocab_size=96, padded_vocab_size=None)


def tiny_config(family: str, **overrides) -> Config:
    name = FAMILIES[family]
    base = CONFIGS[name]
    sizes = dict(TINY, padding_multiple=32)
    if base.get("head_size"):
        sizes["head_size"] = 16
    if base.get("n_query_groups"):
        sizes["n_query_groups"] = 1 if base["n_query_groups"] == 1 else 2
    if base.get("sliding_window"):
        sizes["sliding_window"] = 6
    return Config.from_name(name, **{**sizes, **overrides})


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_shapes_and_fused_loss_matches_logits(family):
    torch.manual_seed(0)
    config = tiny_config(family)
    model = GPT(config).double()
    model.max_seq_length = 16  # resizing rebuilds the rotary tables in fp32; reset to match the fp64 model
    idx = torch.randint(0, config.vocab_size, (2, 16))
    targets = torch.randint(0, config.vocab_size, (2, 16))
    targets[0, :5] = -100
    with use_backend("torch"):
        logits = model(idx)
        loss = model(idx, targets=targets)
    assert logits.shape == (2, 16, config.padded_vocab_size)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-6)


def test_sliding_window_limits_attention():
    torch.manual_seed(0)
    config = tiny_config("mistral", n_layer=1)
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (1, 16))
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % config.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    # with one layer, position t sees position 0 only while t < sliding_window
    assert (a[0, : config.sliding_window] - b[0, : config.sliding_window]).abs().max() > 0
    torch.testing.assert_close(a[0, config.sliding_window :], b[0, config.sliding_window :], atol=0, rtol=0)


def test_max_seq_length():
    config = tiny_config("llama")
    model = GPT(config)
    assert model.max_seq_length == config.block_size
    model.max_seq_length = 8
    assert model.rope.cos.shape == (8, config.rope_n_elem)
    with pytest.raises(ValueError, match="exceeds max_seq_length=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's block_size=32"):
        model.max_seq_length = 33


def test_tied_embeddings_share_storage():
    model = GPT(tiny_config("gpt2"))
    assert model.lm_head is None
    assert model.head()[0] is model.transformer.wte.weight
    assert "lm_head.weight" not in parameter_state_dict(model)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_registered_configs_build_and_count(name):
    config = Config.from_name(name)
    with torch.device("meta"):
        model = GPT(config)
    assert sum(p.numel() for p in model.parameters()) == num_parameters(config)
    assert flops_per_token(config, 128) > 6 * num_parameters(config, non_embedding=True)


# Parameter counts published for the Hugging Face checkpoints (embedding rows as released).
PUBLISHED = {
    "pythia-14m": 14_067_712,
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "TinyLlama-1.1B-intermediate-step-1431k-3T": 1_100_048_384,
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.1-8B": 8_030_261_248,
    "Mistral-7B-v0.1": 7_241_732_096,
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-1.5B": 1_543_714_304,
    "gemma-2b": 2_506_172_416,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    assert num_parameters(Config.from_name(name)) == PUBLISHED[name]


def test_config_errors_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="unknown model name 'llama-9000'"):
        Config.from_name("llama-9000")
    with pytest.raises(ValueError, match=r"unknown Config fields \['n_layers'\]"):
        Config.from_name("debug-llama", n_layers=3)
    with pytest.raises(ValueError, match="n_head=4 must be a multiple of n_query_groups=3"):
        Config.from_name("debug-llama", n_query_groups=3)
    with pytest.raises(ValueError, match="norm_class='BatchNorm'"):
        Config.from_name("debug-llama", norm_class="BatchNorm")
    with pytest.raises(ValueError, match="not divisible by n_head"):
        Config(n_embd=50, n_head=4)
    config = tiny_config("gemma")
    config.save(tmp_path / "c.yaml")
    assert Config.from_file(tmp_path / "c.yaml") == config


def test_checkpoint_round_trip_and_bad_checkpoints(tmp_path):
    torch.manual_seed(0)
    config = tiny_config("qwen3")
    model = GPT(config)
    save_checkpoint(tmp_path / "ckpt", parameter_state_dict(model), config)
    loaded = GPT.from_checkpoint(tmp_path / "ckpt")
    idx = torch.randint(0, config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))

    # a checkpoint of another shape names the tensor and both shapes
    other = tiny_config("qwen3", n_embd=32)
    save_checkpoint(tmp_path / "other", parameter_state_dict(GPT(other)), other)
    before = {k: v.clone() for k, v in parameter_state_dict(model).items()}
    with pytest.raises(ValueError, match=r"attn.proj.weight has shape \(32, 64\) but the model expects \(64, 64\)"):
        load_model_weights(model, tmp_path / "other")
    assert all(torch.equal(before[k], v) for k, v in parameter_state_dict(model).items())

    # a truncated weights file is reported as corrupt
    data = (tmp_path / "ckpt" / MODEL_FILE).read_bytes()
    (tmp_path / "ckpt" / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        GPT.from_checkpoint(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="model_config.yaml is missing"):
        GPT.from_checkpoint(tmp_path / "nothing")


def test_atomic_checkpoint_write_leaves_nothing_on_error(tmp_path):
    config = tiny_config("llama")
    model = GPT(config)
    good = save_checkpoint(tmp_path / "ckpt", parameter_state_dict(model), config)
    before = (good / MODEL_FILE).read_bytes()

    def broken_tokenizer(_):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", parameter_state_dict(GPT(config)), config, save_tokenizer=broken_tokenizer)
    assert (good / MODEL_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_flops_per_token_formula():
    config = Config.from_name("Llama-3.2-1B")
    n = num_parameters(config, non_embedding=True) + config.padded_vocab_size * config.n_embd
    expected = 6 * n + 12 * 16 * 32 * 64 * 2048
    assert math.isclose(flops_per_token(config, 2048), expected)
