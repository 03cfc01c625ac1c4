"""BOS and EOS as the tokenizer has them, end to end: ``litliger generate`` encodes a prompt as the tokenizer
does (the debug BPE adds no BOS), so its greedy text is transformers' greedy text on the exported model; the
export carries the bos/eos/pad ids, so transformers stops at the EOS litliger stops at; chat, evaluate's
lm_eval model and the end-of-run sample encode prompts the same way. Also the convert commands' one line,
``--dtype bfloat16``, the context-limit note of ``generate`` and lm_eval's install hint."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from test_pretrain import run, write_corpus

import litliger.inference.generate as generate_module
import litliger.inference.llm as llm_module
from litliger import GPT
from litliger.checkpoint import copy_tokenizer_files, load_state_dict, read_config, save_checkpoint
from litliger.cli import main as cli_main
from litliger.convert import convert_from_hf, convert_to_hf
from litliger.data.prompts import Alpaca
from litliger.data.tokenizer import Tokenizer
from litliger.inference.chat import Conversation
from litliger.inference.generate import complete, generate, prompt_ids, start_id

PROMPT, NEW = "def ", 12
STATS = re.compile(r"^prompt tokens: (\d+) \| new tokens: (\d+) \| ")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A litliger-trained checkpoint (2 steps on a tiny corpus; its tokenizer is the debug byte-level BPE)."""
    root = tmp_path_factory.mktemp("bos_eos")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LITLIGER_CACHE", str(root / "cache"))
        run(root / "run", write_corpus(root / "corpus"), steps=2)
    return root / "run" / "final"


@pytest.fixture(scope="module")
def tokenizer(trained) -> Tokenizer:
    tok = Tokenizer.from_dir(trained)
    assert (tok.eos_id, tok.bos_id, tok.add_bos) == (0, 0, False)  # <|endoftext|> ends documents; no BOS added
    return tok


def cli_generate(ckpt: Path, capsys, *flags: str) -> tuple[str, int, int, str]:
    """(stdout without the final newline, prompt tokens, new tokens, stderr) of a greedy ``litliger generate``."""
    capsys.readouterr()  # what came before
    cli_main(["generate", str(ckpt), "--prompt", PROMPT, "--temperature", "0", "--device", "cpu", *flags])
    out, err = capsys.readouterr()
    stats = STATS.match(err.strip().splitlines()[-1])
    assert stats, err
    return out.removesuffix("\n"), int(stats[1]), int(stats[2]), err


def hf_greedy(export: Path, max_new_tokens: int = NEW) -> tuple[str, list[int], list[int]]:
    """(text, prompt ids, new ids) of transformers' greedy decoding of PROMPT on the exported folder."""
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    enc = hf_tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    T = enc.input_ids.shape[1]
    return hf_tokenizer.decode(out[0], skip_special_tokens=True), out[0, :T].tolist(), out[0, T:].tolist()


def test_cli_greedy_text_is_transformers_greedy_text(trained, tokenizer, tmp_path, capsys):
    export = convert_to_hf(trained, tmp_path / "hf")
    text, n_prompt, n_new, _ = cli_generate(trained, capsys, "--max_new_tokens", str(NEW))
    hf_text, hf_prompt, hf_new = hf_greedy(export)
    # the prompt is what the tokenizer makes of it: no BOS here, as in training and in transformers
    assert n_prompt == len(tokenizer.encode(PROMPT)) == len(hf_prompt)
    assert hf_prompt == tokenizer.encode(PROMPT) == prompt_ids(tokenizer, PROMPT)
    assert text == hf_text and len(text) > len(PROMPT)
    assert n_new == len(hf_new) == NEW


def test_export_carries_eos_and_transformers_stops_where_litliger_stops(trained, tokenizer, tmp_path, capsys):
    # make EOS likely: its head row becomes a multiple of the token greedy decoding picks third, so EOS wins by then
    model = GPT.from_checkpoint(trained).eval()
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    third = generate(model, ids, 3, temperature=0)[0, -1].item()
    weights = load_state_dict(trained)
    weights["lm_head.weight"][tokenizer.eos_id] = 3 * weights["lm_head.weight"][third]
    ckpt = save_checkpoint(tmp_path / "eos", weights, read_config(trained), lambda f: copy_tokenizer_files(trained, f))
    export = convert_to_hf(ckpt, tmp_path / "hf")

    config = json.loads((export / "config.json").read_text())
    generation = json.loads((export / "generation_config.json").read_text())
    expected = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.eos_id}
    assert {k: config[k] for k in expected} == expected
    assert generation == expected
    assert transformers.GenerationConfig.from_pretrained(export).eos_token_id == tokenizer.eos_id

    text, _, n_new, _ = cli_generate(ckpt, capsys, "--max_new_tokens", str(NEW))
    hf_text, _, hf_new = hf_greedy(export)
    assert tokenizer.eos_id in hf_new and hf_new.index(tokenizer.eos_id) == len(hf_new) - 1 < NEW - 1
    assert n_new == len(hf_new) and text == hf_text  # both end at the first EOS (litliger counts it, shows it not)


def test_every_prompt_encoder_follows_the_tokenizer(trained, tokenizer, monkeypatch):
    assert prompt_ids(tokenizer, PROMPT) == tokenizer.encode(PROMPT, bos=False)
    with_bos = Tokenizer(tokenizer.backend, eos_id=0, bos_id=5, add_bos=True)
    assert prompt_ids(with_bos, PROMPT) == [5, *tokenizer.encode(PROMPT, bos=False)]
    # an empty prompt starts from BOS when the tokenizer has one (even unused), else from EOS
    assert prompt_ids(Tokenizer(tokenizer.backend, eos_id=0, bos_id=5), "") == [5] == [start_id(with_bos)]
    assert prompt_ids(Tokenizer(tokenizer.backend, eos_id=0), "") == [0]

    model = GPT.from_checkpoint(trained).eval()
    seen, real = [], generate_module.generate

    def spy(m, idx, *args, **kwargs):
        seen.append(idx[0].tolist())
        return real(m, idx, *args, **kwargs)

    monkeypatch.setattr(generate_module, "generate", spy)
    complete(model, tokenizer, PROMPT, 2, max_seq_length=32, device="cpu")  # the end-of-run sample
    assert seen == [tokenizer.encode(PROMPT)]

    chat = Conversation(model, tokenizer, Alpaca(), max_seq_length=32, device="cpu")
    assert chat._encode("hello") == tokenizer.encode("hello") and chat._encode("hello")[0] != tokenizer.bos_id
    model.clear_kv_cache()


@pytest.fixture
def fake_lm_eval(monkeypatch):
    """Just enough of lm_eval for litliger.eval.lm_eval to import (lm_eval itself is an optional extra)."""
    api, model, registry = (types.ModuleType(n) for n in ("lm_eval.api", "lm_eval.api.model", "lm_eval.api.registry"))
    model.LM = type("LM", (), {})
    registry.register_model = lambda name: lambda cls: cls
    package = types.ModuleType("lm_eval")
    package.__path__, api.__path__ = [], []
    for module in (package, api, model, registry):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.delitem(sys.modules, "litliger.eval.lm_eval", raising=False)
    yield
    # the adapter imported here subclasses the fake LM: a later test must import it again, on the real lm_eval
    sys.modules.pop("litliger.eval.lm_eval", None)


def test_lm_eval_model_encodes_contexts_as_the_tokenizer_does(trained, tokenizer, fake_lm_eval, monkeypatch):
    import litliger.eval.lm_eval as module

    lm = module.LitligerLM(checkpoint_dir=trained, device="cpu")
    context, continuation = lm.llm.split("alpha beta", " gamma")
    assert context == tokenizer.encode("alpha beta")  # no EOS (or BOS) put in front: the tokenizer adds none
    assert context + continuation == tokenizer.encode("alpha beta gamma")
    assert lm.llm.split("", "alpha")[0] == [start_id(tokenizer)]  # an empty context starts from the start token
    seen = []

    def fake(model, idx, *args, **kwargs):  # noqa: ANN001, ANN202 (generate_tokens: records the prompt, no tokens)
        seen.append(idx[0].tolist())
        yield from ()

    monkeypatch.setattr(llm_module, "generate_tokens", fake)
    request = types.SimpleNamespace(args=("alpha", {"until": ["\n"], "max_gen_toks": 3}))
    assert lm.generate_until([request]) == [""]
    assert seen == [tokenizer.encode("alpha")]


def test_lm_eval_model_without_lm_eval_says_how_to_install_it(monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")] or ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed (submodules an earlier test imported too)
    monkeypatch.delitem(sys.modules, "litliger.eval.lm_eval", raising=False)
    monkeypatch.delitem(sys.modules, "litliger.eval.evaluate", raising=False)
    expected = r"^litliger evaluate's lm_eval model needs lm-evaluation-harness: pip install 'litliger\[eval\]'$"
    with pytest.raises(ModuleNotFoundError, match=expected):
        from litliger.eval.lm_eval import LitligerLM  # noqa: F401
    with pytest.raises(ModuleNotFoundError, match=expected):
        from litliger.eval.evaluate import LitligerLM  # noqa: F401,F811


def test_generate_says_when_the_context_limit_ends_it(trained, tokenizer, capsys):
    _, n_prompt, n_new, err = cli_generate(trained, capsys, "--max_new_tokens", "600")
    block = read_config(trained).block_size
    assert n_new == block - n_prompt + 1  # the last token is sampled, never stored
    assert (
        f"litliger: generated {n_new} of 600 tokens: the context limit of {block} tokens was reached "
        f"(the prompt is {n_prompt}); lower --max_new_tokens or shorten --prompt"
    ) in err.splitlines()
    cli_generate(trained, capsys, "--max_new_tokens", "5")  # within the limit: no note
    assert "context limit" not in capsys.readouterr().err


def test_convert_commands_print_one_line_and_take_dtype_names(trained, tmp_path, capsys):
    cli_main(["convert_to_hf", str(trained), str(tmp_path / "hf"), "--dtype", "bfloat16"])
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        n_hf = len(f.keys())  # transformers' names (q, k and v apart), not litliger's
    assert capsys.readouterr().out == f"wrote {n_hf} tensors (bfloat16) to {tmp_path / 'hf'}\n"
    n = len(load_state_dict(trained))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    cli_main(["convert_from_hf", str(tmp_path / "hf"), str(tmp_path / "lit"), "--dtype", "float32"])
    assert capsys.readouterr().out == f"wrote {n} tensors (float32) to {tmp_path / 'lit'}\n"
    cli_main(["convert_from_hf", str(tmp_path / "hf"), str(tmp_path / "lit16"), "--dtype", "torch.float16"])  # old form
    assert "(float16)" in capsys.readouterr().out
    assert {t.dtype for t in load_state_dict(tmp_path / "lit16").values()} == {torch.float16}
    convert_to_hf(trained, tmp_path / "hf32", dtype=torch.float32)  # the Python API keeps torch dtypes
    capsys.readouterr()
    for bad in ("int8", "torch.int8", "bf16"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["convert_to_hf", str(trained), str(tmp_path / "bad"), "--dtype", bad])
        assert exit_info.value.code == 1
        assert capsys.readouterr().err == (
            f"litliger: error: got {bad}, not a floating-point dtype, in --dtype; use one of bfloat16, float16, "
            "float32 (or torch.<name> of another floating-point dtype)\n"
        )
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="in --dtype"):
        convert_from_hf(tmp_path / "hf", tmp_path / "bad", dtype="int64")
