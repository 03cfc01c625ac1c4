"""``litliger download ORG/NAME``: from a Hugging Face cache laid out as huggingface_hub lays it out (offline,
HF_HUB_OFFLINE=1), and from a local stand-in Hub server named by HF_ENDPOINT (a mirror); nothing reaches the
network. The repo is a tiny random Llama with a tokenizer, plus a ``pytorch_model.bin`` decoy that is not even a
pickle: reading it would fail the conversion. Errors are one line naming the problem and what to do.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from hf_hub import HubServer, add_to_cache, commit_of
from huggingface_hub import constants
from test_convert import VOCAB, hf_logits, hf_model, max_diff, our_logits, sample_idx
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from litliger.checkpoint import load_state_dict
from litliger.checkpoint.layout import CHECKSUMS_FILE, CONFIG_FILE, MODEL_FILE
from litliger.cli import main
from litliger.convert import download
from litliger.data import Tokenizer
from litliger.model.config import Config

ROOT = Path(__file__).resolve().parents[1]
REPO = "tiny-org/Tiny-Llama"
DECOY = b"not a pickle: litliger must never read pytorch_model.bin"
FETCHED = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}  # + the weights
CONVERTED = {
    MODEL_FILE,
    CONFIG_FILE,
    CHECKSUMS_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
}


def tokenizer_files() -> dict[str, bytes]:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    return {"tokenizer.json": tokenizer.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], dict[str, bytes], torch.Tensor]:
    """(the repo's files, the same model sharded, transformers' logits on sample_idx())."""
    root = tmp_path_factory.mktemp("llama")
    model = hf_model("llama")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    extra = {**tokenizer_files(), "pytorch_model.bin": DECOY, "README.md": b"# a tiny llama\n"}
    return (
        {**folder_files(root / "single"), **extra},
        {**folder_files(root / "sharded"), **extra},
        hf_logits(model, sample_idx()),
    )


def _set_hub(monkeypatch: pytest.MonkeyPatch, cache: Path, offline: bool, endpoint: str | None = None) -> None:
    """The environment, and what huggingface_hub read from it once, at import (transformers imported it first)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    if endpoint is not None:  # the API calls read it (file URLs are built from an import-time template)
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache.parent / "no_token"))  # not this machine's login
    monkeypatch.delenv("LITLIGER_DEBUG", raising=False)


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, HF_HUB_OFFLINE=1."""
    _set_hub(monkeypatch, tmp_path / "hf_cache", offline=True)
    return tmp_path / "hf_cache"


def _cache_listing(cache: Path) -> dict[str, str]:
    """Every file and link under ``cache`` -> its link target or its size: what a layout is."""
    return {
        str(p.relative_to(cache)): (os.readlink(p) if p.is_symlink() else str(p.stat().st_size))
        for p in sorted(cache.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


# --- offline, from the cache ---------------------------------------------------------------------------------


def test_cli_downloads_from_the_offline_cache_and_logits_match(llama, tmp_path):
    files, _, expected = llama
    cache = tmp_path / "hf_cache"
    add_to_cache(cache, REPO, files)
    before = _cache_listing(cache)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LITLIGER_DEBUG"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run(
        [sys.executable, "-m", "litliger", "download", REPO, "--checkpoint_dir", "checkpoints"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "checkpoints" / REPO
    assert proc.stdout.splitlines()[-1] == f"wrote {len(load_state_dict(out))} tensors (float32) to checkpoints/{REPO}"
    assert {p.name for p in out.iterdir()} == CONVERTED  # no pytorch_model.bin, README.md or config.json
    assert Config.from_file(out / CONFIG_FILE).name == "Tiny-Llama"
    assert max_diff(our_logits(out, sample_idx()), expected) < 1e-5
    assert _cache_listing(cache) == before  # offline: the cache is only read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "hf_cache"]  # no leftovers


def test_sharded_weights_and_dtype(llama, offline, tmp_path, capsys):
    files, sharded, _ = llama
    index = json.loads(sharded["model.safetensors.index.json"])
    assert len(set(index["weight_map"].values())) > 2
    add_to_cache(offline, REPO, files)
    add_to_cache(offline, "tiny-org/Tiny-Llama-sharded", sharded)
    single = download(REPO, tmp_path / "a")
    out = download("tiny-org/Tiny-Llama-sharded", tmp_path / "b", dtype="bfloat16")
    assert out == tmp_path / "b" / "tiny-org/Tiny-Llama-sharded"
    a, b = load_state_dict(single), load_state_dict(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a)
    assert {t.dtype for t in b.values()} == {torch.bfloat16}
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {len(b)} tensors (bfloat16) to {out}"


def test_tokenizer_only_writes_a_tokenizer_folder_litliger_loads(llama, offline, tmp_path, capsys):
    files, _, _ = llama
    add_to_cache(offline, REPO, files)
    out = download(REPO, tmp_path / "checkpoints", tokenizer_only=True)
    names = {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert {p.name for p in out.iterdir()} == {*names, CHECKSUMS_FILE}
    assert all((out / n).read_bytes() == files[n] for n in names)
    tokenizer = Tokenizer.from_dir(out)
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.vocab_size) == (2, 1, VOCAB)
    assert tokenizer.encode("w5 w6") == [1, 8, 9]
    assert capsys.readouterr().out.strip() == f"wrote the tokenizer of {REPO} ({', '.join(sorted(names))}) to {out}"
    with pytest.raises(ValueError, match=r"is not empty .* pass --overwrite true"):  # a second time: refused
        download(REPO, tmp_path / "checkpoints", tokenizer_only=True)


# --- errors: one line, nothing written ------------------------------------------------------------------------


# The cached files of an error case, from the tiny Llama's (single file, sharded)


def bert_files(single: dict[str, bytes], sharded: dict[str, bytes]) -> dict[str, bytes]:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    config.architectures = ["BertModel"]
    return {"config.json": config.to_json_string().encode(), **tokenizer_files(), "model.safetensors": b"unread"}


def bin_only_files(single: dict[str, bytes], sharded: dict[str, bytes]) -> dict[str, bytes]:
    return {n: d for n, d in single.items() if n != "model.safetensors"}


def extra_weight_files(single: dict[str, bytes], sharded: dict[str, bytes]) -> dict[str, bytes]:
    tensors = safetensors.torch.load(single["model.safetensors"])
    tensors["model.layers.0.mlp.extra.weight"] = torch.ones(2)
    return {**single, "model.safetensors": safetensors.torch.save(tensors)}


def missing_shard_files(single: dict[str, bytes], sharded: dict[str, bytes]) -> dict[str, bytes]:
    return {n: d for n, d in sharded.items() if not n.startswith("model-00002-")}


@pytest.mark.parametrize(
    "repo, files, expected",
    [
        ("gpt2", None, r"^got 'gpt2', not a Hugging Face repo id, in REPO_ID; give the organisation and the name"),
        ("org/../x", None, r"^got 'org/\.\./x', not a Hugging Face repo id, in REPO_ID; "),
        (
            "tiny-org/absent",
            None,
            r"^tiny-org/absent \(revision main\) is not \(or not completely\) in the Hugging Face cache .*/hf_cache, "
            r"and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to download it, or set HF_HUB_CACHE",
        ),
        (
            "tiny-org/bert",
            bert_files,
            r"^model_type='bert' \(BertModel\) is not a type litliger converts, in tiny-org/bert/config\.json; choose "
            r"a model of one of the types: llama, mistral, qwen2, qwen3, gemma, gpt_neox, gpt2$",
        ),
        (
            "tiny-org/bin-only",
            bin_only_files,
            r"^tiny-org/bin-only \(revision main\) has no safetensors weights \(only pytorch_model\.bin\): neither "
            r"model\.safetensors nor model\.safetensors\.index\.json, in REPO_ID; litliger downloads safetensors only",
        ),
        (
            "tiny-org/missing-shard",
            missing_shard_files,
            r"^tiny-org/missing-shard \(revision main\) lacks model-00002-of-\d+\.safetensors: not in the Hugging Face "
            r"cache, and HF_HUB_OFFLINE is set, in REPO_ID; unset HF_HUB_OFFLINE to download them$",
        ),
        (  # the converter's own error, naming the repo (not the temporary folder it read)
            "tiny-org/extra-weight",
            extra_weight_files,
            r"^tiny-org/extra-weight: unknown weights \['model\.layers\.0\.mlp\.extra\.weight'\]: the llama map has no "
            r"place for them",
        ),
    ],
    ids=["no-org", "dot-dot", "not-in-cache", "unsupported-model-type", "only-bin", "missing-shard", "unknown-weight"],
)
def test_errors_are_one_line_and_write_nothing(llama, offline, tmp_path, capsys, repo, files, expected):
    if files is not None:
        add_to_cache(offline, repo, files(*llama[:2]))
    with pytest.raises(SystemExit) as exit_info:
        main(["download", repo, "--checkpoint_dir", str(tmp_path / "checkpoints")])
    lines = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1, lines
    assert re.search(expected, lines[0].removeprefix("litliger: error: ")), lines[0]
    assert not (tmp_path / "checkpoints").exists()


# --- a mirror (HF_ENDPOINT): a local stand-in Hub ---------------------------------------------------------------


@pytest.fixture
def online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama):
    """A stand-in Hub holding the tiny Llama (open) and a gated copy, as HF_ENDPOINT; an empty cache."""
    files, _, _ = llama
    with HubServer({REPO: files, "tiny-org/gated": files}, gated={"tiny-org/gated"}) as hub:
        _set_hub(monkeypatch, tmp_path / "hf_cache", offline=False, endpoint=hub.endpoint)
        # file URLs come from a template huggingface_hub formed at import, from HF_ENDPOINT
        template = constants.HUGGINGFACE_CO_URL_TEMPLATE.replace(constants._HF_DEFAULT_ENDPOINT, hub.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        yield hub


def test_mirror_fetches_only_what_conversion_reads_into_the_cache_layout(llama, online, tmp_path):
    """From the stand-in Hub named by HF_ENDPOINT, only config, tokenizer and safetensors travel, and the cache
    huggingface_hub writes has the layout the offline tests build by hand."""
    files, _, expected = llama
    out = download(REPO, tmp_path / "checkpoints")
    assert online.fetched() == {*FETCHED, "model.safetensors"}  # never pytorch_model.bin or README.md
    assert max_diff(our_logits(out, sample_idx()), expected) < 1e-5
    written = {k: v for k, v in _cache_listing(tmp_path / "hf_cache").items() if k.startswith("models--")}
    written = {k: v for k, v in written.items() if "/trees/" not in k}  # huggingface_hub's own file listing
    fetched = {n: files[n] for n in online.fetched()}
    add_to_cache(tmp_path / "by_hand", REPO, fetched, commit=commit_of(files))
    assert written == _cache_listing(tmp_path / "by_hand")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["tiny-org/gated"],
            r"^tiny-org/gated is gated, in REPO_ID; accept its license at http://127\.0\.0\.1:\d+/tiny-org/gated "
            r"\(logged in\), then pass --access_token or set HF_TOKEN to a token of that account$",
        ),
        (
            ["tiny-org/nope"],
            r"^tiny-org/nope is not a model repo on http://127\.0\.0\.1:\d+, or a private one this token cannot see, "
            r"in REPO_ID; check ORG/NAME",
        ),
        (
            [REPO, "--revision", "v9"],
            rf"^{REPO} has no revision 'v9', in --revision; give one of its branches, tags or commits$",
        ),
    ],
    ids=["gated", "not-found", "unknown-revision"],
)
def test_hub_errors_are_one_line(online, tmp_path, capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["download", *argv, "--checkpoint_dir", str(tmp_path / "checkpoints")])
    lines = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1, lines
    assert re.search(expected, lines[0].removeprefix("litliger: error: ")), lines[0]
    assert not (tmp_path / "checkpoints").exists()


def test_the_token_is_the_flag_else_hf_token(online, tmp_path, monkeypatch):
    with pytest.raises(PermissionError):
        download("tiny-org/gated", tmp_path, access_token="hf_from_the_flag")
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    with pytest.raises(PermissionError):
        download("tiny-org/gated", tmp_path)
    sent = {"Bearer hf_from_the_flag", "Bearer hf_from_the_environment"}
    assert sent <= set(online.tokens) <= {*sent, None}
