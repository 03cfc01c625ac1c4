"""LoRA adapters as PEFT folders, both ways, against the real ``peft`` library: logits of PEFT on the Hugging Face
export equal litliger's unmerged step folder (fp32, 1e-4) for every family, an adapter trained by PEFT (q and v
only, different ranks per fused layer, rslora, modules_to_save) comes in exactly, the round trip litliger -> PEFT
-> litliger is bitwise, and every setting litliger cannot hold is refused in one line with nothing written.

Tiny random models from tests/test_convert.py (``hf_model``), converted with ``convert_from_hf``; step folders are
written by the finetune checkpoint writer with random, non-zero A and B, so the adapters change the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft  # a test dependency (pyproject's test extra)
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file
from test_convert import VOCAB, hf_logits, hf_model, max_diff, sample_idx

from litliger import GPT
from litliger.checkpoint.finetuned import finetune_meta, merge_lora_checkpoint, write_finetune_files
from litliger.checkpoint.io import atomic_dir, base_identity, read_config
from litliger.checkpoint.layout import FINETUNE_FILE, MODEL_FILE, TRAINABLE_FILE
from litliger.cli import main
from litliger.convert import convert_from_hf, convert_to_hf
from litliger.model.lora import LoRAArgs, apply_lora

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gpt_neox", "gpt2"]
TIED = {"qwen2", "gemma", "gpt2"}  # the tiny configs of test_convert tie the head to the embedding
ATOL = 1e-4
# what a "PEFT-trained" adapter adapts, per family: some modules of a fused layer only (k, gate and up left out)
PEFT_TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"],
    "mistral": ["q_proj", "k_proj", "v_proj", "up_proj"],
    "qwen2": ["k_proj", "v_proj", "gate_proj"],
    "qwen3": ["q_proj", "v_proj", "o_proj", "lm_head"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense_h_to_4h", "lm_head"],
    "gpt2": ["c_attn", "c_fc"],
}


def randomise(tensors: dict[str, torch.Tensor], seed: int, std: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=g) * std for n, t in tensors.items()}


def write_step(base: Path, folder: Path, lora: LoRAArgs, extra: tuple[str, ...] = (), seed: int = 0) -> Path:
    """A LoRA finetune's step folder on ``base`` as the finetune writes it: random A and B (B not zero), and the
    parameters ``extra`` trained too (base value + noise)."""
    config = read_config(base)
    with torch.device("meta"):
        model = GPT(config)
        apply_lora(model, lora)
    params = dict(model.named_parameters())
    tensors = randomise({n: p for n, p in params.items() if ".lora_" in n}, seed)
    base_weights = load_file(str(base / MODEL_FILE))
    tensors |= {n: base_weights[n] + 0.2 * torch.randn(base_weights[n].shape) for n in extra}
    trainable = [n for n in params if n in tensors]
    meta = finetune_meta(
        method="lora", lora=lora, trainable=trainable, base_dir=base,
        base_digest=base_identity(base / MODEL_FILE), prompt_style=None,
    )  # fmt: skip
    with atomic_dir(folder) as tmp:
        write_finetune_files(tmp, tensors, meta=meta, config=config, final=False)
    return folder


def our_logits(folder: Path, idx: torch.Tensor) -> torch.Tensor:
    model = GPT.from_checkpoint(folder).eval()
    with torch.no_grad():
        return model(idx)


def peft_model(hf_base: Path, adapter: Path) -> peft.PeftModel:
    return peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(hf_base), adapter).eval()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, root, litliger base, its Hugging Face export, a LoRA step folder on the base)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf_model(name).save_pretrained(root / "hf")
    base = convert_from_hf(root / "hf", root / "base")
    targets = ("qkv", "proj", "mlp") if name in TIED else ("qkv", "proj", "mlp", "lm_head")
    step = write_step(base, root / "step", LoRAArgs(r=4, alpha=6.0, dropout=0.0, targets=targets))
    return name, root, base, convert_to_hf(base, root / "hf_base"), step


def test_export_logits_equal_peft_and_round_trip_is_bitwise(family, tmp_path):
    name, _, base, hf_base, step = family
    out = convert_to_hf(step, tmp_path / "adapter", format="peft")
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".json") == ["adapter_model.safetensors"]
    settings = json.loads((out / "adapter_config.json").read_text())
    assert (settings["r"], settings["lora_alpha"], settings["fan_in_fan_out"]) == (4, 6.0, name == "gpt2")
    idx = sample_idx(3)
    ours = our_logits(step, idx)
    assert max_diff(ours, our_logits(base, idx)) > 0.1  # the adapters matter
    with torch.no_grad():
        theirs = peft_model(hf_base, out)(idx).logits
    assert max_diff(theirs, ours) < ATOL

    back = convert_from_hf(out, tmp_path / "back", base=base)
    original, again = load_file(str(step / TRAINABLE_FILE)), load_file(str(back / TRAINABLE_FILE))
    assert sorted(again) == sorted(original)
    assert all(again[n].dtype == t.dtype and torch.equal(again[n], t) for n, t in original.items())
    meta, meta_back = (yaml.safe_load((f / FINETUNE_FILE).read_text()) for f in (step, back))
    assert meta_back["lora"] == meta["lora"] and meta_back["trainable"] == meta["trainable"]
    assert meta_back["base"] == meta["base"] and meta_back["imported"]["format"] == "peft"


def test_full_format_of_a_step_folder_is_the_merged_model(family, tmp_path):
    _, root, _, _, step = family
    full = convert_to_hf(step, tmp_path / "full")
    model = transformers.AutoModelForCausalLM.from_pretrained(full).eval()
    assert max_diff(hf_logits(model, sample_idx(4)), our_logits(step, sample_idx(4))) < ATOL
    merged = convert_to_hf(merge_lora_checkpoint(step, tmp_path / "merged"), tmp_path / "merged_hf")
    a, b = load_file(str(full / MODEL_FILE)), load_file(str(merged / MODEL_FILE))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def peft_adapter(hf_base: Path, out: Path, seed: int = 1, **settings) -> tuple[Path, torch.Tensor]:
    """An adapter as PEFT trains one (random A and B per module), saved; and its logits on ``sample_idx(5)``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_base)
    config = peft.LoraConfig(**{"r": 3, "lora_alpha": 5, "lora_dropout": 0.0, **settings})
    wrapped = peft.get_peft_model(model, config).eval()
    trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, value in randomise(trainable, seed, std=0.2).items():
            trainable[n].add_(value) if "modules_to_save" in n else trainable[n].copy_(value)
        logits = wrapped(sample_idx(5)).logits
    wrapped.save_pretrained(out)
    return out, logits


def test_a_peft_trained_adapter_comes_in_exactly(family, tmp_path):
    name, _, base, hf_base, _ = family
    adapter, expected = peft_adapter(
        hf_base, tmp_path / "peft", target_modules=PEFT_TARGETS[name], fan_in_fan_out=name == "gpt2"
    )
    out = convert_from_hf(adapter, tmp_path / "lit", base=base)
    assert max_diff(our_logits(out, sample_idx(5)), expected) < ATOL
    assert max_diff(our_logits(base, sample_idx(5)), expected) > 0.1
    meta = yaml.safe_load((out / FINETUNE_FILE).read_text())
    separate_qkv = name not in ("gpt_neox", "gpt2")
    two_of_qkv = sum(t in PEFT_TARGETS[name] for t in ("q_proj", "k_proj", "v_proj")) if separate_qkv else 1
    assert meta["lora"]["r"] == 3 * two_of_qkv  # block-diagonal: one rank-3 block per adapted q, k or v
    assert meta["lora"]["alpha"] / meta["lora"]["r"] == pytest.approx(5 / 3)


def test_rslora_and_modules_to_save_both_ways(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "hf")
    base = convert_from_hf(tmp_path / "hf", tmp_path / "base")
    hf_base = convert_to_hf(base, tmp_path / "hf_base")
    adapter, expected = peft_adapter(
        hf_base, tmp_path / "peft", r=4, lora_alpha=3, use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"], modules_to_save=["model.norm"],
    )  # fmt: skip
    lit = convert_from_hf(adapter, tmp_path / "lit", base=base)
    assert max_diff(our_logits(lit, sample_idx(5)), expected) < ATOL
    meta = yaml.safe_load((lit / FINETUNE_FILE).read_text())
    assert meta["lora"]["r"] == 12 and meta["lora"]["alpha"] / 12 == pytest.approx(3 / 4**0.5)
    assert "transformer.ln_f.weight" in meta["trainable"]

    # litliger -> PEFT with trained norms: modules_to_save, one module per trained norm
    extra = ("transformer.h.0.norm_1.weight", "transformer.ln_f.weight")
    step = write_step(base, tmp_path / "step", LoRAArgs(r=2, alpha=4.0, dropout=0.0), extra=extra, seed=4)
    out = convert_to_hf(step, tmp_path / "adapter", format="peft")
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["modules_to_save"] == ["model.layers.0.input_layernorm", "model.norm"]
    with torch.no_grad():
        theirs = peft_model(hf_base, out)(sample_idx(6)).logits
    assert max_diff(theirs, our_logits(step, sample_idx(6))) < ATOL
    back = convert_from_hf(out, tmp_path / "back", base=base)
    original, again = load_file(str(step / TRAINABLE_FILE)), load_file(str(back / TRAINABLE_FILE))
    assert sorted(again) == sorted(original) and all(torch.equal(again[n], t) for n, t in original.items())


def test_an_imported_adapter_serves_every_command(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from litliger import LLM

    hf_model("qwen3").save_pretrained(tmp_path / "hf")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    base = convert_from_hf(tmp_path / "hf", tmp_path / "base")
    adapter, expected = peft_adapter(
        tmp_path / "hf", tmp_path / "peft", target_modules=["q_proj", "v_proj", "down_proj"]
    )
    out = tmp_path / "lit"
    main(["convert_from_hf", str(adapter), str(out), "--base", str(base)])
    assert capsys.readouterr().out.startswith("wrote ")
    llm = LLM.load(out, device="cpu")
    assert isinstance(llm.generate("w1 w2", max_new_tokens=3, temperature=0.0), str)
    main(["generate", str(out), "--prompt", "w1 w2", "--max_new_tokens", "3", "--device", "cpu"])
    main(["merge_lora", str(out), str(tmp_path / "merged")])
    assert max_diff(our_logits(tmp_path / "merged", sample_idx()), our_logits(out, sample_idx())) < 1e-5
    main(["convert_to_hf", str(out), str(tmp_path / "again"), "--format", "peft"])  # and back out, for PEFT
    with torch.no_grad():
        assert max_diff(peft_model(tmp_path / "hf", tmp_path / "again")(sample_idx(5)).logits, expected) < ATOL


# --- refused, in one line, with nothing written ---------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(litliger base, a PEFT adapter on it) of the llama case."""
    root = tmp_path_factory.mktemp("refusals")
    hf_model("llama").save_pretrained(root / "hf")
    base = convert_from_hf(root / "hf", root / "base")
    adapter, _ = peft_adapter(root / "hf", root / "peft", target_modules=["q_proj", "v_proj"])
    return base, adapter


def edited(adapter: Path, folder: Path, settings: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of ``adapter`` with some adapter_config.json keys and tensors replaced."""
    folder.mkdir()
    config = {**json.loads((adapter / "adapter_config.json").read_text()), **(settings or {})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    weights = {**load_file(str(adapter / "adapter_model.safetensors")), **(tensors or {})}
    save_file(weights, str(folder / "adapter_model.safetensors"))
    return folder


P = "base_model.model.model."
REFUSED = [
    (dict(use_dora=True), None, r"^use_dora=True \(DoRA .*\) is not litliger's LoRA, in .*adapter_config\.json; merge"),
    (dict(rank_pattern={"q_proj": 2}), None, r"^rank_pattern=\{'q_proj': 2\} gives some layers their own rank"),
    (dict(alpha_pattern={"v_proj": 2}), None, r"^alpha_pattern=\{'v_proj': 2\} gives some layers their own"),
    (dict(bias="lora_only"), None, r"^bias='lora_only' trains biases beside the adapters, in "),
    (dict(peft_type="IA3"), None, r"^peft_type='IA3' is not LoRA, in .*; litliger imports LoRA adapters only$"),
    (dict(lora_bias=True), None, r"^lora_bias=True \(a bias on lora_B\) is not litliger's LoRA"),
    (None, {f"{P}embed_tokens.lora_embedding_A": torch.ones(3, VOCAB), f"{P}embed_tokens.lora_embedding_B":
            torch.ones(32, 3)}, r"^the adapter adapts \['model\.embed_tokens'\], which this base has no LoRA layer"),
    (None, {f"{P}layers.0.mlp.act_fn.lora_A.weight": torch.ones(3, 64), f"{P}layers.0.mlp.act_fn.lora_B.weight":
            torch.ones(64, 3)}, r"^the adapter adapts \['model\.layers\.0\.mlp\.act_fn'\]"),
    (None, {f"{P}layers.1.self_attn.q_proj.lora_A.weight": torch.ones(3, 30)},
     r"^model\.layers\.1\.self_attn\.q_proj: lora_A \(3, 30\) and lora_B \(32, 3\) do not fit the base's layer .*; "
     r"give the --base the adapter was trained on$"),
    (None, {f"{P}norm.weight": torch.ones(32)}, r"^\['model\.norm\.weight'\] are neither LoRA tensors"),
    (dict(r=4), None, r"^model\.layers\.0\.self_attn\.q_proj has rank 3 but r=4, in .*adapter_config\.json; fix"),
]  # fmt: skip


@pytest.mark.parametrize(("settings", "tensors", "message"), REFUSED)
def test_what_litliger_cannot_hold_is_refused(llama, tmp_path, settings, tensors, message):
    base, adapter = llama
    bad = edited(adapter, tmp_path / "bad", settings, tensors)
    with pytest.raises(ValueError, match=message):
        convert_from_hf(bad, tmp_path / "out", base=base)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_lm_head_adapter_on_a_tied_base_and_wrong_folders_are_refused(llama, tmp_path):
    base, adapter = llama
    hf_model("gemma").save_pretrained(tmp_path / "hf")  # ties the head to the embedding; other shapes than llama
    tied = convert_from_hf(tmp_path / "hf", tmp_path / "tied")
    head, _ = peft_adapter(tmp_path / "hf", tmp_path / "head", target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"adapts \['lm_head'\], which this base has no LoRA layer for \(the LM head"):
        convert_from_hf(head, tmp_path / "out", base=tied)
    with pytest.raises(ValueError, match=r"do not fit the base's layer"):  # another model's shapes
        convert_from_hf(adapter, tmp_path / "out", base=tied)
    with pytest.raises(ValueError, match=r"is a PEFT adapter \(adapter_config\.json\), in --base; name the"):
        convert_from_hf(adapter, tmp_path / "out")
    with pytest.raises(ValueError, match=r"is not a PEFT adapter folder \(no adapter_config\.json\), in --base"):
        convert_from_hf(tmp_path / "hf", tmp_path / "out", base=base)
    with pytest.raises(ValueError, match=r"is not a finetune checkpoint \(finetune\.yaml missing\), in --format peft"):
        convert_to_hf(base, tmp_path / "out", format="peft")
    gpt2 = tmp_path / "gpt2"
    hf_model("gpt2").save_pretrained(gpt2)
    gpt2_base = convert_from_hf(gpt2, tmp_path / "gpt2_base")
    step = write_step(gpt2_base, tmp_path / "step", LoRAArgs(r=2), extra=("transformer.wte.weight",))
    with pytest.raises(ValueError, match=r"transformer\.wte\.weight, the embedding tied to the LM head, in --format"):
        convert_to_hf(step, tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()
