"""A checkpoint's tokenizer as GGUF metadata (``tokenizer.ggml.*``), the way llama.cpp reads it.

Byte-level BPE tokenizers only (litliger's own, GPT-2's, Pythia's, Llama 3's, Qwen2/3's): llama.cpp's ``gpt2``
tokenizer model. What llama.cpp needs and how it is found:

- tokens and token types: ``tokenizer.json``'s vocabulary and added tokens by id (added tokens that are special
  or look it, ``<|...|>``, are control tokens; other added tokens user-defined; ids up to the embedding rows
  that no token has are ``[PAD<id>]``, unused), as convert_hf_to_gguf.py's ``get_vocab_base``;
- merges, as written in ``tokenizer.json`` (a pair whose parts hold a space has it shifted by 256, to U+0120,
  as gguf's ``SpecialVocab`` writes it, so that one space still separates the two parts);
- the pre-tokenizer's name: llama.cpp does not read the pre-tokenizer from the file but applies the regex of a
  name it knows. convert_hf_to_gguf.py finds the name from a hash of known models' token ids, which a
  tokenizer trained by litliger never matches; here it is read from ``tokenizer.json``'s pre-tokenizer itself
  (GPT-2's ByteLevel regex: ``gpt-2``; the Split regexes of Llama 3 and Qwen2: ``llama-bpe``, ``qwen2``).
  Any other pre-tokenizer is refused, never guessed: a wrong name tokenizes differently without an error;
- BOS, EOS and ``add_bos`` as litliger's ``Tokenizer.from_dir`` has them (the ids litliger encodes and stops
  with), pad as ``convert_to_hf`` writes it (``to_hf.token_ids``), unk from the BPE model;
- the chat template ``litliger chat`` uses: the one a finetune recorded (none when it trained on Alpaca
  prompts), else the tokenizer's (``chat_template.jinja`` or tokenizer_config.json's ``chat_template``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint.io import read_finetune_meta
from ..checkpoint.layout import FINETUNE_FILE
from ..data.prompts import ChatTemplate, PromptStyle, load_chat_template
from ..data.tokenizer import Tokenizer
from .to_hf import token_ids

# llama.cpp's tokenizer.ggml.token_type values (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# The Split regexes of tokenizer.json that llama.cpp implements, by the pre-tokenizer name it knows them under
# (src/llama-vocab.cpp quotes each as "original regex from tokenizer.json"), and whether that name makes
# llama.cpp take a whole word that is a token before merging (tokenizer.json's ``ignore_merges``).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}", 1): "qwen2"}  # Qwen2: 1 digit
_IGNORE_MERGES = {"gpt-2": False, "llama-bpe": True, "qwen2": False}
_OTHER_TOOL = "convert the Hugging Face model with llama.cpp's convert_hf_to_gguf.py instead"


@dataclass
class GGUFVocab:
    """Everything ``tokenizer.ggml.*`` holds for a byte-level BPE tokenizer."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    chat_template: str | None

    def add_to(self, writer: Any) -> None:
        """Write the tokenizer keys with ``writer`` (a ``gguf.GGUFWriter``)."""
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        writer.add_eos_token_id(self.eos_id)
        for add, value in ((writer.add_bos_token_id, self.bos_id), (writer.add_pad_token_id, self.pad_id),
                           (writer.add_unk_token_id, self.unk_id)):  # fmt: skip
            if value is not None:
                add(value)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)  # litliger's encode never appends EOS to a prompt
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def gguf_vocab(checkpoint_dir: str | Path, n_vocab: int) -> GGUFVocab:
    """The GGUF tokenizer of ``checkpoint_dir``, its token list padded to ``n_vocab`` (the embedding rows).

    Raises ``ValueError`` (one line naming tokenizer.json) for a tokenizer llama.cpp's ``gpt2`` model cannot
    reproduce: not byte-level BPE, a pre-tokenizer llama.cpp has no name for, or more ids than rows.
    """
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {checkpoint_dir}: a GGUF file carries its tokenizer; copy the tokenizer files of "
            "the model into the checkpoint folder"
        )
    tokenizer = Tokenizer.from_dir(checkpoint_dir)  # also checks that tokenizer.json and its settings load
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    _check_byte_level_bpe(spec, model, path)
    pre = _pre_name(spec.get("pre_tokenizer"), path)
    if bool(model.get("ignore_merges", False)) != _IGNORE_MERGES[pre]:
        raise ValueError(
            f"tokenizer.json's model has ignore_merges={bool(model.get('ignore_merges', False))}, but llama.cpp's "
            f"{pre!r} pre-tokenizer implies {_IGNORE_MERGES[pre]}, in {path}; {_OTHER_TOOL}"
        )
    tokens, types = _tokens(model["vocab"], spec.get("added_tokens") or [], n_vocab, path)
    unk = model.get("unk_token")
    return GGUFVocab(
        pre=pre,
        tokens=tokens,
        types=types,
        merges=[_merge(m) for m in model.get("merges") or []],
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=token_ids(checkpoint_dir, {}).get("pad_token_id"),
        unk_id=tokenizer.backend.token_to_id(unk) if isinstance(unk, str) else None,
        add_bos=tokenizer.add_bos,
        chat_template=_chat_template(checkpoint_dir),
    )


def _check_byte_level_bpe(spec: dict[str, Any], model: dict[str, Any], path: Path) -> None:
    decoder = (spec.get("decoder") or {}).get("type")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        kind = f"model {model.get('type')}, byte_fallback={bool(model.get('byte_fallback'))}, decoder {decoder}"
        raise ValueError(
            f"the tokenizer is not a byte-level BPE ({kind}); litliger writes llama.cpp's gpt2 tokenizer model "
            f"only (SentencePiece-style tokenizers such as Llama 2's, Mistral's and Gemma's are not), in {path}; "
            f"{_OTHER_TOOL}"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"the BPE model uses subword prefixes or suffixes llama.cpp lacks, in {path}; {_OTHER_TOOL}")
    if normalizer not in (None, "NFC"):  # llama.cpp applies no normalizer; NFC text (Qwen2's) is unchanged by it
        raise ValueError(
            f"the tokenizer's {normalizer} normalizer has no llama.cpp equivalent, in {path}; {_OTHER_TOOL}"
        )


def _pre_name(pre: dict[str, Any] | None, path: Path) -> str:
    """llama.cpp's name for the pre-tokenizer ``pre`` of tokenizer.json (see the module docstring)."""
    pre = pre or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    parts = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(parts) == 2:
        split, level = parts
        regex = (split.get("pattern") or {}).get("Regex")
        plain_split = split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
        plain_level = level.get("type") == "ByteLevel" and not level.get("use_regex", True)
        if plain_split and plain_level and not level.get("add_prefix_space") and regex in _SPLIT_PRE:
            return _SPLIT_PRE[regex]
    shown = json.dumps(pre)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    raise ValueError(
        f"the tokenizer's pre-tokenizer {shown} is not one llama.cpp implements under a name litliger knows "
        f"(GPT-2's ByteLevel regex, Llama 3's or Qwen2's Split regex), in {path}; {_OTHER_TOOL}"
    )


def _tokens(
    vocab: dict[str, int], added: list[dict[str, Any]], n_vocab: int, path: Path
) -> tuple[list[str], list[int]]:
    by_id = {i: (token, NORMAL) for token, i in vocab.items()}
    for token in added:
        looks_special = token["content"].startswith("<|") and token["content"].endswith("|>")
        by_id[token["id"]] = (token["content"], CONTROL if token.get("special") or looks_special else USER_DEFINED)
    if max(by_id) >= n_vocab:
        raise ValueError(
            f"the tokenizer has ids up to {max(by_id)}, more than the model's {n_vocab} embedding rows, in {path}; "
            "use the tokenizer the model was trained with"
        )
    tokens = [by_id.get(i, (f"[PAD{i}]", UNUSED)) for i in range(n_vocab)]
    return [t for t, _ in tokens], [kind for _, kind in tokens]


def _merge(merge: str | list[str]) -> str:
    """A merge as llama.cpp reads it: ``"a b"``; a pair (tokenizers >= 0.20) whose parts hold spaces gets them
    shifted by 256 (U+0120), as gguf's SpecialVocab writes them, so the one space still separates the two."""
    if isinstance(merge, str):
        return merge
    return " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in merge)


def _chat_template(checkpoint_dir: Path) -> str | None:
    """The template ``litliger chat`` uses: a finetune's recorded prompt style (none for Alpaca, which has no
    Jinja template: the finetune never saw the tokenizer's), else the tokenizer's chat template."""
    if (checkpoint_dir / FINETUNE_FILE).is_file():
        recorded = read_finetune_meta(checkpoint_dir).get("prompt_style")
        if recorded:
            style = PromptStyle.from_dict(recorded)
            return style.template if isinstance(style, ChatTemplate) else None
    template = load_chat_template(checkpoint_dir)
    return None if template is None else template.template
