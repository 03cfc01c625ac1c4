"""``convert_to_gguf``: llama.cpp (through llama-cpp-python) runs the exported file as litliger runs the checkpoint.

Fed the same prompt ids, llama.cpp's greedy tokens equal litliger's ``generate(temperature=0)``: 4 prompts x 32
tokens in f32 for every family llama.cpp has an architecture for, and the first 8 tokens in q8_0 for the debug
model. llama.cpp runs with an f32 KV cache here (its default is f16, which rounds keys and values), so f32 logits
agree to float32 rounding, except where llama.cpp's CPU GELU reads an f16 table (gemma, gpt_neox, gpt2: ~5e-4
of the largest logit). A divergence is only accepted where litliger's own top two logits are closer than the
measured logit error (a near tie that rounding may flip). llama.cpp's tokenizer (vocab_only) encodes text as
litliger's does, for each pre-tokenizer name litliger writes. Skipped without llama-cpp-python (test extra).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pyproject's test extra)")
gguf = pytest.importorskip("gguf", reason="needs gguf (pyproject's gguf and test extras)")

from test_finetune import gpt2_config, make_base, tiny_config  # noqa: E402

from litliger import GPT, Config  # noqa: E402
from litliger.checkpoint import copy_tokenizer_files, parameter_state_dict, save_checkpoint  # noqa: E402
from litliger.checkpoint.checksums import write_checksums  # noqa: E402
from litliger.checkpoint.finetuned import finetune_meta, write_finetune_files  # noqa: E402
from litliger.checkpoint.io import verified_base_identity  # noqa: E402
from litliger.cli import main as cli_main  # noqa: E402
from litliger.convert import to_gguf  # noqa: E402
from litliger.convert.gguf_tokenizer import _SPLIT_PRE  # noqa: E402
from litliger.convert.to_gguf import convert_to_gguf  # noqa: E402
from litliger.data import Tokenizer  # noqa: E402
from litliger.data.prompts import ChatTemplate  # noqa: E402
from litliger.inference.generate import generate  # noqa: E402
from litliger.model.lora import LoRAArgs, apply_lora  # noqa: E402

PROMPTS = ["alpha beta gamma", "def f(x):\n    return x  + 1\n", "lambda mu nu xi omicron", "rho\tsigma \n\n  tau"]
NEW, Q8_NEW = 32, 8
TEXTS = [  # what a pre-tokenizer splits differently: spaces, digits, case, contractions, unicode, special tokens
    *PROMPTS,
    "  leading and trailing   ",
    "numbers 3 33 333 3.14 and 1234567",
    "unicode: naïve café 東京 🦙 ünïcödé",
    "it's they're I'M we'Ve",
    "a<|endoftext|>b\n\n\n",
    "CamelCase snake_case kebab-case __dunder__\t\tend",
]
GEMMA = dict(mlp_class="GeGLUMLP", gelu_approximate="tanh", norm_offset=1.0, scale_embeddings=True, tie_embeddings=True)
LINEAR = {"type": "linear", "factor": 2.0}
L3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 32}
FAMILIES = {  # tiny configs of each family litliger writes to GGUF, each with a feature its architecture must carry
    "llama": tiny_config(n_embd=64, n_head=4, n_query_groups=2, bias=True),  # GQA, q/k biases permuted too
    "llama3": tiny_config(n_embd=64, n_head=4, n_query_groups=2, tie_embeddings=True, rope_base=100.0, rope_scaling=L3),
    "mistral": tiny_config(sliding_window=128),  # a window as long as the context: llama.cpp's llama architecture
    "qwen2": tiny_config(attn_bias=True, tie_embeddings=True),
    "qwen3": tiny_config(n_head=4, n_query_groups=2, head_size=12, norm_qk=True, rope_scaling=LINEAR),
    "gemma": tiny_config(**GEMMA),
    "gpt_neox": tiny_config(norm_class="LayerNorm", mlp_class="GeluMLP", bias=True, n_embd=64, n_query_groups=2,
                            rotary_fraction=0.25, parallel_residual=True),  # exact GELU, as Pythia
    "gpt2": gpt2_config(),
}  # fmt: skip
GELU_TABLE = {"gemma", "gpt_neox", "gpt2"}  # llama.cpp's CPU GELU reads an f16 table


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The debug model (config_hub/pretrain/debug.yaml's debug-llama) as a 0-step pretraining run leaves it:
    litliger's own initialisation, and the byte-level BPE the data module trains on a tiny corpus."""
    root = tmp_path_factory.mktemp("gguf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LITLIGER_CACHE", str(root / "cache"))
        return make_base(root, Config.from_name("debug-llama", block_size=128))


def llama(path: Path, **kwargs) -> llama_cpp.Llama:
    f32 = llama_cpp.GGML_TYPE_F32  # an f32 KV cache: llama.cpp's default f16 cache rounds keys and values
    return llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, type_k=f32, type_v=f32, n_threads=2, verbose=False,
                           **kwargs)  # fmt: skip


def greedy_agreement(model: GPT, llm: llama_cpp.Llama, ids: list[int], n: int) -> tuple[int, str]:
    """How many greedy tokens llama.cpp and litliger share from ``ids`` (both fed the same ids), and, where they
    part, litliger's margin for its token over llama.cpp's against the largest logit difference there."""
    with torch.no_grad():
        ours = generate(model, torch.tensor([ids]), n, temperature=0)[0, len(ids) :].tolist()
    llm.reset()
    llm.eval(ids)
    for i in range(n):
        theirs = np.asarray(llm.scores[llm.n_tokens - 1])
        pick = int(theirs.argmax())
        if pick != ours[i]:
            with torch.no_grad():
                logits = model(torch.tensor([ids + ours[:i]]))[0, -1].numpy()
            margin, error = logits[ours[i]] - logits[pick], np.abs(theirs - logits).max()
            return i, f"margin {margin:.2e}, logit error {error:.2e}" + (" (a near tie)" if margin <= 2 * error else "")
        llm.eval([pick])
    return n, ""


def prefill_error(model: GPT, llm: llama_cpp.Llama, ids: list[int]) -> float:
    """The largest difference of the prompt's logits (every position), relative to the largest logit."""
    llm.reset()
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    return float(np.abs(np.asarray(llm.scores[: len(ids)]) - ours).max() / np.abs(ours).max())


def random_checkpoint(folder: Path, config: Config, tokenizer_dir: Path, seed: int = 1) -> Path:
    """A checkpoint of ``config`` with weights away from their defaults (norms not 1, biases not 0, matrices at
    1/sqrt(fan_in)), so a tensor that is dropped, transposed or offset shows; the tokenizer of ``tokenizer_dir``
    (``config``'s vocabulary resized to it)."""
    config = dataclasses.replace(
        config, vocab_size=Tokenizer.from_dir(tokenizer_dir).vocab_size, padded_vocab_size=None
    )
    model = GPT(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:  # around 1 as the model scales (Gemma's stored w of 1 + w around 0)
                p.copy_(torch.rand(p.shape, generator=g) - 0.5 + (0.0 if config.norm_offset else 1.0))
    save = lambda f: copy_tokenizer_files(tokenizer_dir, f)  # noqa: E731
    return save_checkpoint(folder, parameter_state_dict(model), config, save_tokenizer=save)


# --- tokenizer ---------------------------------------------------------------------------------------------


def _split_tokenizer(folder: Path, pre: str) -> Path:
    """A byte-level BPE with Llama 3's (``llama-bpe``) or Qwen2's (``qwen2``) Split regex, trained here."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    regex = next(r for r, name in _SPLIT_PRE.items() if name == pre)
    backend = Backend(models.BPE(ignore_merges=pre == "llama-bpe"))
    split = pre_tokenizers.Split(Regex(regex), behavior="isolated")
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    backend.train_from_iterator([t * 20 for t in TEXTS], trainer)
    Tokenizer(backend, eos_id=0, bos_id=0, add_bos=False).save(folder)
    return folder


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_as_litliger(base, tmp_path, pre):
    tokenizer_dir = base if pre == "gpt-2" else _split_tokenizer(tmp_path / "tokenizer", pre)
    ckpt = random_checkpoint(tmp_path / "ckpt", tiny_config(), tokenizer_dir)
    out = convert_to_gguf(ckpt, tmp_path / "m.gguf")
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.pre"].contents() == pre
    ours = Tokenizer.from_dir(ckpt)
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert ids == ours.encode(text), text
            assert llm.detokenize(ids, special=True).decode() == text
    finally:
        llm.close()


def test_metadata_holds_the_tokenizer_and_chat_template(base, tmp_path):
    out = convert_to_gguf(base, tmp_path / "debug.gguf", "q8_0")
    reader = gguf.GGUFReader(out)
    value = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.t")}
    tokenizer, config = Tokenizer.from_dir(base), Config.from_file(base / "model_config.yaml")
    assert value["general.architecture"] == "llama" and value["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert value["llama.context_length"] == 128 and value["llama.attention.head_count_kv"] == config.n_query_groups
    assert (value["tokenizer.ggml.model"], value["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert value["tokenizer.ggml.eos_token_id"] == value["tokenizer.ggml.bos_token_id"] == tokenizer.eos_id == 0
    assert value["tokenizer.ggml.add_bos_token"] is False  # litliger's debug BPE adds no BOS
    chat_template = json.loads((base / "tokenizer_config.json").read_text())["chat_template"]
    assert value["tokenizer.chat_template"] == chat_template
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == config.padded_vocab_size  # padded to the embedding rows, as llama.cpp requires
    assert (tokens[0], types[0]) == ("<|endoftext|>", gguf.TokenType.CONTROL)
    assert (tokens[-1], types[-1]) == (f"[PAD{len(tokens) - 1}]", gguf.TokenType.UNUSED)
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == gguf.GGMLQuantizationType.F32


# --- greedy decoding ---------------------------------------------------------------------------------------


def test_debug_model_greedy_f32_all_tokens_q8_0_first_8(base, tmp_path):
    model = GPT.from_checkpoint(base).eval()
    tokenizer = Tokenizer.from_dir(base)
    for dtype, n in (("f32", NEW), ("q8_0", Q8_NEW)):
        llm = llama(convert_to_gguf(base, tmp_path / f"debug-{dtype}.gguf", dtype))
        try:
            for text in PROMPTS:
                ids = tokenizer.encode(text)
                error = prefill_error(model, llm, ids)
                assert error < (1e-5 if dtype == "f32" else 0.05), (dtype, text, error)  # q8_0: ~1.5e-2
                same, why = greedy_agreement(model, llm, ids, n)
                assert same == n or (dtype == "q8_0" and "near tie" in why), (dtype, text, same, why)
        finally:
            llm.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_greedy_is_identical_in_f32(base, tmp_path, family):
    ckpt = random_checkpoint(tmp_path / family, dataclasses.replace(FAMILIES[family], block_size=128), base)
    model = GPT.from_checkpoint(ckpt).eval()
    tokenizer = Tokenizer.from_dir(ckpt)
    llm = llama(convert_to_gguf(ckpt, tmp_path / f"{family}.gguf", "f32"))
    try:
        for text in PROMPTS:
            ids = tokenizer.encode(text)
            error = prefill_error(model, llm, ids)
            assert error < (1e-3 if family in GELU_TABLE else 1e-5), (text, error)
            same, why = greedy_agreement(model, llm, ids, NEW)
            assert same == NEW, (text, same, why)
    finally:
        llm.close()


def test_finetune_step_folder_is_merged_with_its_chat_template(base, tmp_path):
    """A LoRA step folder (trainable.safetensors + finetune.yaml on ``base``, written by the finetune recipe's own
    writer) becomes one GGUF of the merged model, carrying the chat template the finetune recorded."""
    model = GPT.from_checkpoint(base)
    lora = LoRAArgs(r=4, alpha=8.0)
    apply_lora(model, lora)
    with torch.no_grad():  # lora_b starts at zero: make the adapters change the model
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    style = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    trainable = [name for name, _ in model.named_parameters() if ".lora_" in name]
    meta = finetune_meta(method="lora", lora=lora, trainable=trainable, base_dir=base,
                         base_digest=verified_base_identity(base), prompt_style=style.to_dict())  # fmt: skip
    step = tmp_path / "run" / "step-00000001"
    step.mkdir(parents=True)
    write_finetune_files(step, dict(model.named_parameters()), meta=meta, config=model.config, final=False)
    write_checksums(step)
    unmerged = GPT.from_checkpoint(step).eval()  # the one loader: base + adapters
    out = convert_to_gguf(step, tmp_path / "ft.gguf", "f32")
    assert gguf.GGUFReader(out).fields["tokenizer.chat_template"].contents() == style.template
    llm = llama(out)
    try:
        ids = Tokenizer.from_dir(step).encode(PROMPTS[0])
        assert prefill_error(unmerged, llm, ids) < 1e-5
        assert prefill_error(GPT.from_checkpoint(base).eval(), llm, ids) > 1e-2  # the adapters are in the file
    finally:
        llm.close()


# --- what is refused -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(sliding_window=16), r"^sliding_window=16 cannot be written to GGUF: llama\.cpp's llama architecture"),
        (GEMMA | dict(tie_embeddings=False), r"^tie_embeddings=False cannot be written to GGUF"),
        (dict(attn_bias=True, rope_scaling=L3), r"^rope_scaling=.* llama3 frequency factors in its llama arch"),
    ],
    ids=["mistral-window", "gemma-untied", "qwen2-llama3-rope"],
)
def test_what_llama_cpp_cannot_run_is_refused_naming_the_field(base, tmp_path, fields, message):
    ckpt = random_checkpoint(tmp_path / "ckpt", tiny_config(**fields), base)
    with pytest.raises(ValueError, match=message):
        convert_to_gguf(ckpt, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_output_file_rules_and_one_line_errors(base, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    cli_main(["convert_to_gguf", str(base), str(out), "--dtype", "q8_0"])
    assert capsys.readouterr().out.strip() == f"wrote 39 tensors (q8_0) to {out}"
    before = out.read_bytes()
    refused = {
        str(out): rf"^output file {out} exists; choose a new file, or pass --overwrite true to replace it$",
        str(base / "m.gguf"): r"^output file .*/final/m\.gguf is inside the input .*/final; choose a path outside",
        str(base.parent / "m.gguf"): r"^output file .*/base/m\.gguf is inside the checkpoint or training run .*/base;",
        str(tmp_path): rf"^{tmp_path} is a folder, in --out_file; give the path of the file to write$",
    }
    for path, message in refused.items():
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["convert_to_gguf", str(base), path])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 1 and err.count("\n") == 0, err
        assert re.search(message, err.removeprefix("litliger: error: ")), err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    cli_main(["convert_to_gguf", str(base), str(out), "--dtype", "f16", "--overwrite", "true"])
    assert out.read_bytes() != before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_a_file_that_appears_while_writing_is_never_replaced(base, tmp_path, monkeypatch):
    """The last check passes, then another program creates OUT before the publish: the link refuses it."""
    out = tmp_path / "m.gguf"
    original = to_gguf.check_output_file
    calls = []

    def check_then_race(*args, **kwargs):
        original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the check just before publishing
            out.write_text("the user's file")

    monkeypatch.setattr(to_gguf, "check_output_file", check_then_race)
    with pytest.raises(FileExistsError, match=r"appeared while it was written, nothing was replaced"):
        convert_to_gguf(base, out)
    assert out.read_text() == "the user's file" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_without_gguf_the_error_says_how_to_install(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(SystemExit):
        cli_main(["convert_to_gguf", str(base), str(tmp_path / "m.gguf")])
    assert capsys.readouterr().err == (
        'litliger: error: convert_to_gguf needs the gguf package, in the installation; pip install "litliger[gguf]"\n'
    )


def test_a_tokenizer_llama_cpp_cannot_reproduce_is_refused(base, tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "alpha": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    ckpt = random_checkpoint(tmp_path / "ckpt", tiny_config(), base)
    backend.save(str(ckpt / "tokenizer.json"))
    (ckpt / "checksums.json").unlink()  # a hand-edited folder
    with pytest.raises(ValueError, match=r"^the tokenizer is not a byte-level BPE \(model WordLevel.*tokenizer\.json;"):
        convert_to_gguf(ckpt, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
