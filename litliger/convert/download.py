"""``litliger download ORG/NAME``: fetch a model from the Hugging Face Hub and convert it into ``checkpoints/ORG/NAME``.

Only what conversion reads is fetched, into the local Hugging Face cache: config.json, the tokenizer files and
the safetensors weights (model.safetensors, or the index and exactly the shards it names). Never pickled
weights (.bin, .pt, .pth), other frameworks' files (.msgpack, .h5), second copies (consolidated.safetensors,
original/) or training states. huggingface_hub does the fetching, so its settings apply as they are:
HF_HOME / HF_HUB_CACHE (where the cache is), HF_HUB_OFFLINE=1 (read the cache only), HF_ENDPOINT (a mirror),
HF_TOKEN (the token when ``access_token`` is not given). Its errors become one line that says what to do.

Two fetches: the small files first (so an unsupported model is refused before any weights travel), then the
weights at the commit the first one resolved. huggingface_hub is imported only when a download runs.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoint.io import atomic_dir
from ..checkpoint.layout import TOKENIZER_FILES
from ..checkpoint.safety import check_output_dir
from .from_hf import convert_from_hf, copy_hf_tokenizer, resolve_dtype
from .hf_config import FAMILIES, config_from_hf, read_hf_config

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
# ORG/NAME as the Hub allows it: letters, digits, _ . - (not first or last), no "--" or ".."; 96 characters at most
_PART = r"[A-Za-z0-9_](?:[\w.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_PART}/{_PART}", re.ASCII)
_SHARD = re.compile(r"[\w.-]+\.safetensors", re.ASCII)  # a shard the index names: a file beside it


def download(
    repo_id: str,
    checkpoint_dir: str | Path = "checkpoints",
    revision: str | None = None,
    access_token: str | None = None,
    tokenizer_only: bool = False,
    dtype: torch.dtype | str | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Fetch the Hugging Face model ``repo_id`` and convert it into the checkpoint folder ``checkpoint_dir/ORG/NAME``.

    Fetches config.json, the tokenizer files and the safetensors weights into the Hugging Face cache (nothing
    else: no .bin, .pt, .msgpack, .h5 or training states), then converts them as ``convert_from_hf`` does
    (atomically: a failure leaves nothing). Prints one line when done; returns the folder written.

    Args:
        repo_id: the Hugging Face model repo, ORG/NAME as on the Hub (e.g. Qwen/Qwen2.5-0.5B).
        checkpoint_dir: the folder the model goes under, as ``checkpoint_dir/ORG/NAME``.
        revision: a branch, tag or commit of the repo; default: main.
        access_token: a Hugging Face token, for gated or private repos; default: the HF_TOKEN environment
            variable (or the token ``hf auth login`` stored).
        tokenizer_only: fetch and write only the tokenizer files (e.g. for ``pretrain --tokenizer_dir``).
        dtype: cast floating-point tensors to this dtype: bfloat16, float16 or float32; default: keep them.
        overwrite: replace a non-empty ``checkpoint_dir/ORG/NAME`` (never a training run's folder).
    """
    if not (_REPO_ID.fullmatch(repo_id) and len(repo_id) <= 96 and "--" not in repo_id and ".." not in repo_id):
        raise ValueError(
            f"got {repo_id!r}, not a Hugging Face repo id, in REPO_ID; give the organisation and the name as the Hub "
            "shows them, ORG/NAME (e.g. Qwen/Qwen2.5-0.5B)"
        )
    if revision is not None and (not revision or revision != revision.strip()):
        raise ValueError(f"revision {revision!r} is empty or padded, in --revision; give a branch, tag or commit")
    if access_token is not None and not access_token.strip():
        raise ValueError("the token is empty, in --access_token; give a token, or leave the flag out to use HF_TOKEN")
    dtype = resolve_dtype(dtype)
    if tokenizer_only and dtype is not None:
        raise ValueError("--dtype casts weights, and --tokenizer_only true fetches none, in --dtype; drop one of them")
    out_dir = Path(checkpoint_dir) / repo_id
    blocking = next((p for p in reversed(out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"{blocking} is an existing file, in --checkpoint_dir; choose a folder path")
    check_output_dir(out_dir, inputs=[], overwrite=overwrite)  # before anything travels

    if tokenizer_only:
        snapshot = _fetch(repo_id, revision, access_token, [HF_CONFIG, *TOKENIZER_FILES])
        return _write_tokenizer(repo_id, snapshot, out_dir, overwrite)
    snapshot = _fetch(repo_id, revision, access_token, [HF_CONFIG, *TOKENIZER_FILES, HF_INDEX])
    _check_family(repo_id, snapshot)
    shards = _shards(repo_id, snapshot)
    # the weights of the very commit the small files came from (a commit hash needs no second look-up)
    snapshot = _fetch(repo_id, revision, access_token, shards, commit=snapshot.name)
    _check_weights(repo_id, revision, snapshot, shards)
    with tempfile.TemporaryDirectory(prefix="litliger-download-") as tmp:
        # the fetched files alone, in a folder named NAME (the Config's name): whatever else the cache holds
        # for this commit (a pytorch_model.bin another tool fetched) is never read
        view = Path(tmp) / repo_id.split("/")[1]
        view.mkdir()
        for name in (HF_CONFIG, *TOKENIZER_FILES, HF_INDEX, *shards):
            if (snapshot / name).is_file():
                os.symlink((snapshot / name).resolve(), view / name)
        try:
            return convert_from_hf(view, out_dir, dtype, overwrite=overwrite)
        except ValueError as e:  # a weight the map has no place for, ...: named in the repo, not the gone folder
            raise ValueError(str(e).replace(str(view), repo_id)) from e


def _fetch(
    repo_id: str, revision: str | None, token: str | None, files: Sequence[str], commit: str | None = None
) -> Path:
    """``snapshot_download`` of exactly ``files`` (those the repo has) at ``commit`` or ``revision``; the snapshot
    folder. huggingface_hub's errors become one line each, saying what to do."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shown = f"{repo_id} (revision {revision or 'main'})"
    try:
        folder = snapshot_download(repo_id, revision=commit or revision, token=token, allow_patterns=list(files))
    except GatedRepoError as e:
        raise PermissionError(
            f"{repo_id} is gated, in REPO_ID; accept its license at {constants.ENDPOINT}/{repo_id} (logged in), then "
            "pass --access_token or set HF_TOKEN to a token of that account"
        ) from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id} is not a model repo on {constants.ENDPOINT}, or a private one this token cannot see, in "
            "REPO_ID; check ORG/NAME (as the Hub shows it), or pass --access_token or set HF_TOKEN for a private repo"
        ) from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id} has no revision {revision!r}, in --revision; give one of its branches, tags or commits"
        ) from e
    except LocalEntryNotFoundError as e:
        where = f"the Hugging Face cache {constants.HF_HUB_CACHE}"
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(
                f"{shown} is not (or not completely) in {where}, and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to "
                "download it, or set HF_HUB_CACHE (or HF_HOME) to the cache that holds it"
            ) from e
        cause = type(e.__cause__ or e).__name__
        raise OSError(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({cause}), and {shown} is not (or not "
            f"completely) in {where}; check the connection (and HF_ENDPOINT, for a mirror) and run again"
        ) from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise OSError(
            f"the Hugging Face Hub at {constants.ENDPOINT} answered HTTP {status} for {shown} "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); check --access_token / HF_TOKEN and "
            "HF_ENDPOINT, or run again later"
        ) from e
    return Path(folder)


def _check_family(repo_id: str, snapshot: Path) -> None:
    """Refuse, before the weights are fetched, a model litliger cannot convert: one line naming what it is."""
    if not (snapshot / HF_CONFIG).is_file():
        raise FileNotFoundError(
            f"{repo_id} has no config.json, in REPO_ID; choose a transformers model repo of one of the types "
            f"litliger converts: {', '.join(FAMILIES)}"
        )
    hf = read_hf_config(snapshot)
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        architectures = ", ".join(hf.get("architectures") or []) or "no architectures named"
        raise ValueError(
            f"model_type={model_type!r} ({architectures}) is not a type litliger converts, in {repo_id}/config.json; "
            f"choose a model of one of the types: {', '.join(FAMILIES)}"
        )
    try:
        config_from_hf(hf)
    except ValueError as e:  # a setting litliger's model cannot express (rope_type='yarn', ...)
        raise ValueError(f"{repo_id}: {e}") from e


def _shards(repo_id: str, snapshot: Path) -> list[str]:
    """The safetensors files to fetch: the shards ``model.safetensors.index.json`` names, else model.safetensors."""
    index = snapshot / HF_INDEX
    if not index.is_file():
        return [HF_WEIGHTS]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"not a safetensors index ({type(e).__name__}: {e}), in {repo_id}/{HF_INDEX}; choose another revision"
        ) from e
    odd = [s for s in shards if not (isinstance(s, str) and _SHARD.fullmatch(s))]
    if odd or not shards:
        raise ValueError(
            f"the index names {odd or 'no shards'}, not safetensors files beside it, in {repo_id}/{HF_INDEX}; "
            "choose another revision"
        )
    return shards


def _check_weights(repo_id: str, revision: str | None, snapshot: Path, shards: list[str]) -> None:
    """Every safetensors file is there; else say why: not in the cache (offline), or the repo has none."""
    from huggingface_hub import constants

    missing = [s for s in shards if not (snapshot / s).is_file()]
    if not missing:
        return
    shown = f"{repo_id} (revision {revision or 'main'})"
    pickled = sorted(p.name for p in snapshot.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if shards == [HF_WEIGHTS] and (pickled or not constants.HF_HUB_OFFLINE):
        only = f" (only {', '.join(pickled)})" if pickled else ""
        raise FileNotFoundError(
            f"{shown} has no safetensors weights{only}: neither {HF_WEIGHTS} nor {HF_INDEX}, in REPO_ID; litliger "
            "downloads safetensors only, never pickled weights: choose a revision that has them (e.g. the Hub "
            "bot's conversion, refs/pr/N), or convert a local folder you trust with litliger convert_from_hf"
        )
    where = "in the Hugging Face cache, and HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "in the repo"
    raise FileNotFoundError(
        f"{shown} lacks {', '.join(missing)}: not {where}, in REPO_ID; "
        + ("unset HF_HUB_OFFLINE to download them" if constants.HF_HUB_OFFLINE else "choose another revision")
    )


def _write_tokenizer(repo_id: str, snapshot: Path, out_dir: Path, overwrite: bool) -> Path:
    """``out_dir`` holding the tokenizer files (and generation_config.json with the special ids), atomically;
    checked to load with litliger's Tokenizer first."""
    from ..data.tokenizer import Tokenizer

    if not (snapshot / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{repo_id} has no tokenizer.json (litliger reads Hugging Face fast tokenizers), in REPO_ID; choose a "
            "repo that has one"
        )
    hf = read_hf_config(snapshot) if (snapshot / HF_CONFIG).is_file() else {}
    with atomic_dir(out_dir) as tmp:
        copy_hf_tokenizer(snapshot, tmp, hf)
        Tokenizer.from_dir(tmp)  # what pretraining's --tokenizer_dir will load: refused now, not then
        check_output_dir(out_dir, inputs=[], overwrite=overwrite)  # again: it may have changed meanwhile
        names = sorted(p.name for p in tmp.iterdir())
    print(f"wrote the tokenizer of {repo_id} ({', '.join(names)}) to {out_dir}")
    return out_dir
