"""Tokenizer: byte-level BPE training (sizes, caching, errors) and loading Hugging Face tokenizer folders."""

import json
import random
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import models, pre_tokenizers, processors

from litliger.data import Tokenizer

UNICODE = "Grüße, 世界! naïve café — ∑x² ≤ π 🚀\n\tdef f(x):\n        return x  # ok\n"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))


def write_corpus(folder: Path, n: int = 6, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    syllables = ("ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "qu", "ix", "ön", "世", "界", "def")
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(300)]
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        f = folder / f"{i}.txt"
        f.write_text(
            "\n".join(" ".join(rng.choices(words, k=12)) for _ in range(40)) + "\n" + UNICODE, encoding="utf-8"
        )
        files.append(f)
    return files


def test_bpe_round_trip_unicode_and_special_tokens(tmp_path: Path) -> None:
    tok = Tokenizer.train_bpe(write_corpus(tmp_path / "c"), vocab_size=400)
    unseen = "Ωμέγα ✓ ünïcödé 🦀 \x00 tabs\t\tand\r\nnewlines"  # byte-level: nothing is out of vocabulary
    for text in (UNICODE, unseen, ""):
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == tok.bos_id == tok.backend.token_to_id("<|endoftext|>")
    ids = tok.encode("fox", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) > 2
    assert tok.encode("fox") == ids[1:-1]  # our BPE does not add BOS by default
    assert tok.decode(torch.tensor(ids[1:])) == "fox<|endoftext|>"  # tensors decode; EOS stays visible
    assert tok.encode_batch(["fox", UNICODE]) == [tok.encode("fox", eos=True), tok.encode(UNICODE, eos=True)]


@pytest.mark.parametrize("vocab_size", [300, 600])
def test_bpe_vocab_size_honoured_and_deterministic(tmp_path: Path, vocab_size: int) -> None:
    files = write_corpus(tmp_path / "c", n=10)
    a = Tokenizer.train_bpe(files, vocab_size, use_cache=False)
    b = Tokenizer.train_bpe(list(reversed(files)), vocab_size, use_cache=False)
    assert a.vocab_size == vocab_size
    assert a.backend.to_str() == b.backend.to_str()  # same corpus -> same tokenizer -> same data cache keys


def test_bpe_cache_is_reused(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "c")
    first = Tokenizer.train_bpe(files, 300, cache_dir=tmp_path / "tok")
    (entry,) = (tmp_path / "tok").iterdir()
    # Swap the cached file for a different tokenizer: if the second call trains, it cannot return this one.
    Tokenizer.train_bpe(files, 280, use_cache=False).save(entry)
    second = Tokenizer.train_bpe(files, 300, cache_dir=tmp_path / "tok")
    assert second.vocab_size == 280 != first.vocab_size
    # Another vocab size or another corpus is another entry.
    Tokenizer.train_bpe(files, 320, cache_dir=tmp_path / "tok")
    files[0].write_text("changed", encoding="utf-8")
    Tokenizer.train_bpe(files, 300, cache_dir=tmp_path / "tok")
    assert len(list((tmp_path / "tok").iterdir())) == 3


def test_bpe_errors(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "c", n=1)
    with pytest.raises(ValueError, match=r"vocab_size=256 is too small.*at least 257"):
        Tokenizer.train_bpe(files, 256)
    with pytest.raises(ValueError, match="no files"):
        Tokenizer.train_bpe([], 300)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        Tokenizer.train_bpe([latin1], 300)


def test_save_and_from_dir_round_trip(tmp_path: Path) -> None:
    tok = Tokenizer.train_bpe(write_corpus(tmp_path / "c"), 300)
    tok.save(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["bos_token"] == "<|endoftext|>" and config["add_bos_token"] is False
    loaded = Tokenizer.from_dir(tmp_path / "ckpt")
    assert (loaded.eos_id, loaded.bos_id, loaded.add_bos) == (tok.eos_id, tok.bos_id, tok.add_bos)
    assert loaded.encode(UNICODE, eos=True) == tok.encode(UNICODE, eos=True)
    assert loaded.fingerprint == tok.fingerprint


def hf_folder(folder: Path, **files: dict) -> Path:
    """A Llama-style Hugging Face tokenizer folder built locally: <unk>=0, <s>=1, </s>=2, template adds <s>."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "hi": 5}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True)
    backend.save(str(folder / "tokenizer.json"))
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


def test_hf_folder_with_tokenizer_config(tmp_path: Path) -> None:
    special = {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {"bos_token": special, "eos_token": "</s>", "add_bos_token": True, "tokenizer_class": "LlamaTokenizer"}
    tok = Tokenizer.from_dir(hf_folder(tmp_path / "hf", tokenizer_config=config))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 6)
    # BOS once (ours, not also the template's), EOS on request.
    assert tok.encode("hi world", eos=True) == [1, 5, 4, 2]
    assert tok.encode("hi", bos=False) == [5]
    assert tok.encode_batch(["hello", "hi"]) == [[1, 3, 2], [1, 5, 2]]
    assert tok.decode([1, 5, 2]) == "<s> hi </s>"


def test_hf_folder_ids_from_config_files(tmp_path: Path) -> None:
    # No tokenizer_config.json: ids come from config.json, and generation_config.json wins over it.
    tok = Tokenizer.from_dir(hf_folder(tmp_path / "a", config={"bos_token_id": 1, "eos_token_id": [2, 0]}))
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.add_bos  # the tokenizer's own template prepends <s>, so documents get it too
    tok = Tokenizer.from_dir(
        hf_folder(tmp_path / "b", config={"bos_token_id": 1, "eos_token_id": 2}, generation_config={"eos_token_id": 0})
    )
    assert tok.eos_id == 0
    no_bos = Tokenizer.from_dir(hf_folder(tmp_path / "c", tokenizer_config={"eos_token": "</s>"}))
    assert no_bos.bos_id is None and not no_bos.add_bos and no_bos.eos_id == 2


def test_from_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"No tokenizer\.json in .*nowhere"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="'<eos>', which is not in the vocabulary"):
        Tokenizer.from_dir(hf_folder(tmp_path / "x", tokenizer_config={"eos_token": "<eos>"}))
