"""A checkpoint is data and an out_dir is someone's folder: nothing read from a checkpoint runs code, no user
file is touched, every byte is verified, and a finished run is never rewritten.

Each scenario runs the ``litliger`` command (in-process through ``litliger.cli.main``, or as a real
subprocess where the exit status and stderr matter) on real checkpoints of a tiny model.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_finetune import make_base, write_instructions
from test_finetune import run as finetune_run
from test_finetune import tiny_config as finetune_config
from test_pretrain import cli_args, losses, write_corpus

from litliger.checkpoint import load_state_dict
from litliger.checkpoint.checksums import read_checksums, verify_checksums, write_checksums
from litliger.checkpoint.layout import CHECKSUMS_FILE, LOCK_FILE, MODEL_FILE, STATE_DIR, TRAINABLE_FILE
from litliger.checkpoint.safety import check_run_dir
from litliger.checkpoint.tensor_files import save_tensors, tensor_digest
from litliger.cli import main


class Payload:
    """Unpickling this creates ``path``: the marker that code from a file ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LITLIGER_VERIFY", raising=False)
    return write_corpus(tmp_path / "corpus")


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run ``litliger ARGV`` in-process; its exit status and stderr."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("litliger: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def pretrain(tmp_path: Path, corpus: Path, out: Path, steps: int, *extra: str, capsys) -> tuple[int, str]:
    return cli(cli_args(tmp_path, corpus, out, steps, *extra), capsys)


# --- 1. no code runs from a checkpoint ------------------------------------------------------------------------


@pytest.fixture
def step_ckpt(tmp_path, corpus, capsys) -> Path:
    """A run of 2 steps with a checkpoint after each: step-00000001/ is the one to resume from."""
    code, err = pretrain(tmp_path, corpus, tmp_path / "run", 2, "--train.save_interval", "1", capsys=capsys)
    assert code == 0, err
    return tmp_path / "run" / "step-00000001"


def test_training_state_holds_no_pickle(step_ckpt):
    state = step_ckpt / STATE_DIR
    assert sorted(p.name for p in state.iterdir()) == ["rank00000.json", "rank00000.safetensors", "state.json"]
    for file in state.iterdir():
        assert not file.read_bytes().startswith((b"\x80", b"PK")), file  # no pickle, no torch.save zip
    listed = set(read_checksums(step_ckpt))
    assert listed == {p.relative_to(step_ckpt).as_posix() for p in step_ckpt.rglob("*") if p.is_file()} - {
        CHECKSUMS_FILE
    }


@pytest.mark.parametrize("verify", ["1", "0"])
@pytest.mark.parametrize(
    "planted",
    [
        "training_state/state.json",
        "training_state/rank00000.json",
        "training_state/rank00000.safetensors",
        "model.safetensors",
        "checksums.json",
        "model_config.yaml",
    ],
)
def test_a_pickle_in_any_file_of_a_checkpoint_never_runs(
    tmp_path, corpus, step_ckpt, planted, verify, capsys, monkeypatch
):
    marker = tmp_path / "code-ran"
    (step_ckpt / planted).write_bytes(pickle.dumps(Payload(marker)))
    monkeypatch.setenv("LITLIGER_VERIFY", verify)
    code, err = pretrain(tmp_path, corpus, tmp_path / "resumed", 2, "--resume", str(step_ckpt), capsys=capsys)
    assert not marker.exists()
    assert code == 1
    line = one_error_line(err)
    if verify == "1" and planted not in ("training_state/state.json", "checksums.json"):
        assert f"{step_ckpt / planted} has" in line or f"{step_ckpt / planted} does not match" in line, line


def test_legacy_pickles_are_refused_and_never_loaded(tmp_path, corpus, step_ckpt):
    """An old-format checkpoint (torch.save rank file, torch.distributed.checkpoint optimizer) with a payload in
    every pickle: the resume (a real subprocess) is refused naming the conversion command, nothing runs."""
    marker = tmp_path / "code-ran"
    state = step_ckpt / STATE_DIR
    torch.save({"dataloader": None, "rng": Payload(marker)}, state / "rank00000.pt")
    (state / "optimizer").mkdir()
    (state / "optimizer" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    torch.save(Payload(marker), state / "optimizer" / "__0_0.distcp")
    for name in ("rank00000.json", "rank00000.safetensors"):
        (state / name).unlink()
    (step_ckpt / CHECKSUMS_FILE).unlink()
    env = {**os.environ, "LITLIGER_CACHE": str(tmp_path / "cache")}
    for resume in (str(step_ckpt), "auto"):
        out = tmp_path / "resumed" if resume != "auto" else step_ckpt.parent
        argv = cli_args(tmp_path, corpus, out, 2, "--resume", resume)
        proc = subprocess.run([sys.executable, "-m", "litliger", *argv], env=env, capture_output=True, text=True)
        assert proc.returncode == 1, proc.stderr
        line = one_error_line(proc.stderr)
        assert f"litliger upgrade_checkpoint {step_ckpt}" in line and "run code" in line, line
        assert not marker.exists()


def test_upgrade_converts_an_old_checkpoint_and_the_resume_is_exact(tmp_path, corpus, capsys):
    """A checkpoint written the old way (torch.save + torch.distributed.checkpoint, as earlier litligers did)
    converts with ``litliger upgrade_checkpoint``; resuming from it then gives the uninterrupted run's losses."""
    import torch.distributed.checkpoint as dcp

    from litliger.engine.state_codec import load_state

    straight = tmp_path / "straight"
    assert pretrain(tmp_path, corpus, straight, 4, "--train.save_interval", "2", capsys=capsys)[0] == 0
    old = tmp_path / "old" / "step-00000002"
    shutil.copytree(straight / "step-00000002", old)
    state = load_state(old / STATE_DIR / "rank00000")
    torch.save({"dataloader": state["dataloader"], "rng": state["rng"]}, old / STATE_DIR / "rank00000.pt")
    dcp.save({"optimizer": state["optimizer"]}, checkpoint_id=str(old / STATE_DIR / "optimizer"), no_dist=True)
    for name in ("rank00000.json", "rank00000.safetensors", "../" + CHECKSUMS_FILE):
        (old / STATE_DIR / name).unlink()

    code, err = pretrain(tmp_path, corpus, tmp_path / "r1", 4, "--resume", str(old), capsys=capsys)
    assert code == 1 and "upgrade_checkpoint" in one_error_line(err)
    assert cli(["upgrade_checkpoint", str(old)], capsys)[0] == 0
    assert not (old / STATE_DIR / "rank00000.pt").exists() and (old / CHECKSUMS_FILE).is_file()
    resumed = tmp_path / "r2"
    code, err = pretrain(tmp_path, corpus, resumed, 4, "--resume", str(old), capsys=capsys)
    assert code == 0, err
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [3, 4] and all(a[s] == b[s] for s in b)  # bitwise
    wa, wb = load_state_dict(straight / "final"), load_state_dict(resumed / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert cli(["upgrade_checkpoint", str(old)], capsys)[0] == 1  # nothing left to convert: one line


# --- 2. no user folder is touched -------------------------------------------------------------------------------

USER_FOLDERS = [".config.tmp", ".cache.tmp-2024", ".mozilla.old-2020", ".ssh.old-keys", ".step-00000001.tmp"]


def plant_user_folders(folder: Path) -> dict[str, bytes]:
    (folder / "mozilla").mkdir(parents=True, exist_ok=True)
    (folder / "mozilla" / "prefs.js").write_bytes(b"user_pref")
    for name in USER_FOLDERS:
        (folder / name).mkdir(parents=True)
        (folder / name / "keep.txt").write_text(name)
    return {f"{n}/{p.name}": p.read_bytes() for n in [*USER_FOLDERS, "mozilla"] for p in (folder / n).iterdir()}


def user_files(folder: Path, names: dict[str, bytes]) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}


def test_a_run_never_touches_hidden_user_folders(tmp_path, corpus, capsys):
    # a folder of the user's own: refused at once, nothing in it changes
    home_like = tmp_path / "mine"
    planted = plant_user_folders(home_like)
    code, err = pretrain(tmp_path, corpus, home_like, 1, capsys=capsys)
    assert code == 1 and "holds files that are not a litliger run" in one_error_line(err)
    assert user_files(home_like, planted) == planted
    assert sorted(p.name for p in home_like.iterdir()) == sorted([*USER_FOLDERS, "mozilla"])  # no lock either
    # a litliger run whose folder later gets the same hidden folders: a resume sweeps only its own leftovers
    out = tmp_path / "run"
    assert pretrain(tmp_path, corpus, out, 1, capsys=capsys)[0] == 0
    planted = plant_user_folders(out)
    (out / ".litliger-tmp.step-00000002").mkdir()  # what a kill during a save leaves behind
    code, err = pretrain(tmp_path, corpus, out, 2, "--resume", "auto", capsys=capsys)
    assert code == 0, err
    assert user_files(out, planted) == planted  # all there, none renamed
    assert not (out / "ssh").exists() and not (out / "config").exists()
    assert not (out / ".litliger-tmp.step-00000002").exists()


def test_root_and_home_are_refused(tmp_path, corpus, capsys, monkeypatch):
    with pytest.raises(ValueError, match=r"out_dir / is the filesystem root, in --out_dir"):
        check_run_dir("/")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    code, err = pretrain(tmp_path, corpus, tmp_path / "home", 1, capsys=capsys)
    assert code == 1 and "is your home folder, in --out_dir" in one_error_line(err)
    assert list((tmp_path / "home").iterdir()) == []


def test_the_lock_never_follows_a_symlink(tmp_path, corpus, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("do not truncate me")
    out = tmp_path / "run"
    assert pretrain(tmp_path, corpus, out, 1, capsys=capsys)[0] == 0
    (out / LOCK_FILE).unlink()
    (out / LOCK_FILE).symlink_to(target)  # planted in a run's folder
    code, err = pretrain(tmp_path, corpus, out, 2, "--resume", "auto", capsys=capsys)
    assert code == 1 and f"{out / LOCK_FILE} is a symbolic link" in one_error_line(err)
    assert target.read_text() == "do not truncate me"
    (out / LOCK_FILE).unlink()
    assert pretrain(tmp_path, corpus, out, 2, "--resume", "auto", capsys=capsys)[0] == 0
    assert (out / LOCK_FILE).stat().st_mode & 0o777 == 0o600


# --- 3. a finished run is never rewritten; tensor files are deterministic -----------------------------------


def test_rerunning_a_finished_run_leaves_final_byte_identical(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert pretrain(tmp_path, corpus, out, 2, capsys=capsys)[0] == 0
    before = {p: p.read_bytes() for p in (out / "final").rglob("*") if p.is_file()}
    inode = (out / "final" / MODEL_FILE).stat().st_ino
    for _ in range(3):
        code, err = pretrain(tmp_path, corpus, out, 2, "--resume", "auto", capsys=capsys)
        assert code == 0, err
    assert {p: p.read_bytes() for p in (out / "final").rglob("*") if p.is_file()} == before
    assert (out / "final" / MODEL_FILE).stat().st_ino == inode  # not even rewritten with the same bytes


def test_same_tensors_same_bytes_and_the_digest_ignores_the_header(tmp_path):
    tensors = {f"w{i}": torch.randn(3, i + 1) for i in range(12)} | {"b": torch.ones(2, dtype=torch.bfloat16)}
    metadata = {f"key{i}": str(i) for i in range(8)}
    save_tensors(tmp_path / "a.safetensors", tensors, metadata)
    save_tensors(tmp_path / "b.safetensors", dict(reversed(tensors.items())), dict(reversed(metadata.items())))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata={"other": "header"})  # the safetensors package
    assert tensor_digest(tmp_path / "c.safetensors") == tensor_digest(tmp_path / "a.safetensors")
    changed = dict(tensors, b=torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    save_tensors(tmp_path / "d.safetensors", changed, metadata)
    assert tensor_digest(tmp_path / "d.safetensors") != tensor_digest(tmp_path / "a.safetensors")


def test_tensor_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
        os.umask(0o077)
        save_tensors(tmp_path / "b.safetensors", {"x": torch.zeros(2)})
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.safetensors").stat().st_mode & 0o777 == 0o600


def test_an_adapter_survives_a_base_rewritten_with_the_same_tensors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))
    base = make_base(tmp_path, finetune_config())
    records = write_instructions(tmp_path / "records.jsonl")
    step = finetune_run(tmp_path / "ft", base, records, steps=2, save_interval=1).parent / "step-00000001"
    assert cli(["generate", str(step), "--max_new_tokens", "2", "--prompt", "alpha"], capsys)[0] == 0
    weights = load_state_dict(base)
    save_file(weights, str(base / MODEL_FILE), metadata={"format": "pt", "rewritten": "yes"})  # another header
    write_checksums(base)
    assert cli(["generate", str(step), "--max_new_tokens", "2", "--prompt", "alpha"], capsys)[0] == 0
    weights["lm_head.weight"][0, 0] += 1  # other tensors: the base check refuses
    save_file(weights, str(base / MODEL_FILE))
    write_checksums(base)
    code, err = cli(["generate", str(step), "--max_new_tokens", "2", "--prompt", "alpha"], capsys)
    assert code == 1 and "changed since" in one_error_line(err)


# --- 5. silent corruption -------------------------------------------------------------------------------------


def flip_a_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data: the header still parses
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file", [MODEL_FILE, "training_state/rank00000.safetensors", "training_state/rank00000.json"])
def test_a_flipped_byte_is_refused_naming_the_file(tmp_path, corpus, step_ckpt, file, capsys, monkeypatch):
    flip_a_tensor_byte(step_ckpt / file)
    code, err = pretrain(tmp_path, corpus, tmp_path / "resumed", 2, "--resume", str(step_ckpt), capsys=capsys)
    assert code == 1
    assert f"{step_ckpt / file} does not match the sha256 recorded" in one_error_line(err)
    assert not (tmp_path / "resumed" / "final").exists()
    if file == MODEL_FILE:  # loading for inference verifies too; LITLIGER_VERIFY=0 turns it off
        code, err = cli(["generate", str(step_ckpt), "--max_new_tokens", "2", "--prompt", "alpha"], capsys)
        assert code == 1 and f"{step_ckpt / file} does not match" in one_error_line(err)
        monkeypatch.setenv("LITLIGER_VERIFY", "0")
        assert cli(["generate", str(step_ckpt), "--max_new_tokens", "2", "--prompt", "alpha"], capsys)[0] == 0


def test_a_missing_state_file_is_one_line(tmp_path, corpus, step_ckpt, capsys):
    (step_ckpt / STATE_DIR / "rank00000.safetensors").unlink()  # was: a 1,600-character DCP traceback
    code, err = pretrain(tmp_path, corpus, tmp_path / "resumed", 2, "--resume", str(step_ckpt), capsys=capsys)
    line = one_error_line(err)
    assert code == 1 and f"{step_ckpt / STATE_DIR / 'rank00000.safetensors'} is missing" in line, line


def test_a_flipped_byte_in_trainable_tensors_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))
    base = make_base(tmp_path, finetune_config())
    records = write_instructions(tmp_path / "records.jsonl")
    step = finetune_run(tmp_path / "ft", base, records, steps=2, save_interval=1).parent / "step-00000001"
    flip_a_tensor_byte(step / TRAINABLE_FILE)
    code, err = cli(["generate", str(step), "--max_new_tokens", "2", "--prompt", "alpha"], capsys)
    assert code == 1 and f"{step / TRAINABLE_FILE} does not match" in one_error_line(err)
    with pytest.raises(ValueError, match="trainable.safetensors does not match"):
        verify_checksums(step, training_state=True)


# --- 6. a full disk is one line, and loses nothing ------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()}); CI runs as root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, corpus, small_disk, capsys):
    out = small_disk / "run"
    assert pretrain(tmp_path, corpus, out, 2, capsys=capsys)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "final" in p.parts}
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # room for metrics, not for a checkpoint
    code, err = pretrain(tmp_path, corpus, out, 3, "--resume", "auto", capsys=capsys)
    assert code == 1
    line = one_error_line(err)
    assert f"no space left on the device, in {out}; nothing was lost" in line, line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "final" in p.parts} == before
    assert not [p.name for p in out.iterdir() if p.name.startswith((".litliger-tmp", ".litliger-old"))]
    (small_disk / "filler").unlink()
    code, err = pretrain(tmp_path, corpus, out, 3, "--resume", "auto", capsys=capsys)
    assert code == 0, err  # space freed: the same command continues from final/
    assert sorted(losses(out)) == [1, 2, 3]
