"""Nothing lost, ever: converters and merge_lora never replace a non-empty folder unasked, nor an input or a
training run, and a run folder has one writer at a time (``RunLock``), which a crashed run never leaves stuck.

Everything is tiny: a one-layer checkpoint with random weights written by ``save_checkpoint``, its Hugging
Face folder made by ``convert_to_hf``, a LoRA step folder on it, and a few lock-holding subprocesses.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from litliger import GPT, Config
from litliger.checkpoint import load_state_dict, save_checkpoint
from litliger.checkpoint.finetuned import merge_lora_checkpoint
from litliger.checkpoint.layout import CHECKSUMS_FILE, CONFIG_FILE, LOCK_FILE, MODEL_FILE
from litliger.checkpoint.safety import LockHolder, RunLock, RunLockedError, check_output_dir
from litliger.cli import main as cli_main
from litliger.convert import convert_from_hf, convert_to_hf
from litliger.convert.weight_maps import model_shapes

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


def tiny_config() -> Config:
    return Config(
        name="tiny",
        block_size=16,
        vocab_size=64,
        padding_multiple=64,
        n_layer=1,
        n_embd=16,
        n_head=2,
        n_query_groups=1,
        intermediate_size=32,
        norm_class="RMSNorm",
        mlp_class="SwiGLUMLP",
        bias=False,
    )


def tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A litliger checkpoint folder with random (never default) weights, so a wrong copy shows up."""
    config = tiny_config()
    g = torch.Generator().manual_seed(seed)
    state_dict = {name: torch.randn(shape, generator=g) for name, shape in model_shapes(config).items()}
    return save_checkpoint(folder, state_dict, config)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too) by relative path, with its bytes; folders end in /."""
    return {
        str(p.relative_to(folder)) + ("/" if p.is_dir() else ""): b"" if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A training run's out_dir as the engine leaves it: two checkpoints, metrics, logs, a released lock."""
    run = tmp_path / "run"
    tiny_checkpoint(run / "step-00000010")
    (run / "step-00000010" / "training_state").mkdir()
    (run / "step-00000010" / "training_state" / "state.pt").write_bytes(b"optimizer state")
    tiny_checkpoint(run / "final", seed=1)
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 3.5}\n')
    (run / "logs").mkdir()
    (run / "logs" / "events.txt").write_text("started\n")
    (run / LOCK_FILE).touch()
    return run


@pytest.fixture
def hf_dir(run_dir, tmp_path) -> Path:
    return convert_to_hf(run_dir / "final", tmp_path / "hf")


def user_folder(path: Path) -> Path:
    """A user's non-empty folder: five entries, one named like a file the converters write."""
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"the user's own weights")
    (path / "notes.txt").write_text("do not lose me")
    (path / ".hidden").write_text("me neither")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(bytes(range(256)))
    (path / "z.json").write_text("{}")
    return path


def no_leftovers(parent: Path) -> bool:
    """atomic_dir's hidden .litliger-tmp.NAME.* / .litliger-old.NAME.* siblings are gone."""
    return not [p for p in parent.iterdir() if p.name.startswith((".litliger-tmp.", ".litliger-old."))]


# --- convert_to_hf ---------------------------------------------------------------------------------------------


def test_to_hf_refuses_a_non_empty_folder_and_keeps_every_byte(run_dir, tmp_path):
    out = user_folder(tmp_path / "out")
    before = snapshot(out)
    with pytest.raises(ValueError) as e:
        convert_to_hf(run_dir / "final", out)
    assert str(e.value) == (
        f"output folder {out} is not empty (holds .hidden, model.safetensors, notes.txt and 2 more); "
        "choose an empty or new folder, or pass --overwrite true to replace it"
    )
    assert snapshot(out) == before and no_leftovers(tmp_path)


@pytest.mark.parametrize(
    "target, message",
    [
        ("run", "output folder {out} holds the input {src}; choose a folder outside it"),
        ("run/final", "output folder {out} is the input folder; choose another folder"),
        ("run/final/hf", "output folder {out} is inside the input {src}; choose a folder outside it"),
        ("run/final/../final", "output folder {out} is the input folder; choose another folder"),
        (".", "output folder {out} holds the input {src}; choose a folder outside it"),  # the run's parent
    ],
    ids=["run", "input", "inside-input", "input-spelled-otherwise", "run-parent"],
)
def test_to_hf_never_writes_over_or_into_its_input_even_with_overwrite(run_dir, tmp_path, target, message):
    src, out = run_dir / "final", tmp_path / target
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as e:
        convert_to_hf(src, out, overwrite=True)
    assert str(e.value) == message.format(out=out, src=src)
    assert snapshot(tmp_path) == before  # the run: both checkpoints, metrics, logs, byte for byte


@pytest.mark.parametrize(
    "mark, shown",
    [
        ("step-00000010", "step-00000010/"),
        ("final", "final/"),
        ("training_state", "training_state/"),
        (LOCK_FILE, LOCK_FILE),
    ],
)
def test_a_training_run_folder_is_refused_even_with_overwrite(run_dir, tmp_path, mark, shown):
    other = tmp_path / "other_run"  # not the input's run: still never replaced
    other.mkdir()
    (other / "metrics.jsonl").write_text("{}\n")
    if mark == LOCK_FILE:
        (other / mark).touch()
    else:
        (other / mark).mkdir()
    before = snapshot(other)
    with pytest.raises(ValueError) as e:
        convert_to_hf(run_dir / "final", other, overwrite=True)
    assert str(e.value) == (
        f"output folder {other} holds a training run ({shown}); choose another folder "
        "(--overwrite never replaces training checkpoints)"
    )
    assert snapshot(other) == before


def test_a_folder_holding_runs_deeper_down_is_refused_even_with_overwrite(run_dir, tmp_path):
    tiny_checkpoint(tmp_path / "out" / "old" / "step-00000020")
    (tmp_path / "out" / "old" / "step-00000020" / "training_state").mkdir()
    (tmp_path / "out" / "exp" / "b").mkdir(parents=True)
    (tmp_path / "out" / "exp" / "b" / LOCK_FILE).touch()
    before = snapshot(tmp_path / "out")
    with pytest.raises(ValueError) as e:
        convert_to_hf(run_dir / "final", tmp_path / "out", overwrite=True)
    assert "holds a training run (exp/b/.litliger-lock and old/step-00000020/training_state/);" in str(e.value)
    assert snapshot(tmp_path / "out") == before


def test_step_like_names_that_are_not_checkpoints_do_not_count(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "final").write_text("a file, not a checkpoint folder")
    (out / "step-10").mkdir()  # not 8 digits
    (out / "exports" / "final").mkdir(parents=True)  # deeper down, final/ and step-*/ may be anything
    (out / "exports" / "step-00000001").mkdir()
    check_output_dir(out, inputs=[tmp_path / "src"], overwrite=True)  # no error


def test_to_hf_overwrite_replaces_a_plain_folder_with_a_correct_conversion(run_dir, tmp_path):
    expected = snapshot(convert_to_hf(run_dir / "final", tmp_path / "reference"))
    out = user_folder(tmp_path / "out")
    convert_to_hf(run_dir / "final", out, overwrite=True)
    assert snapshot(out) == expected  # exactly the conversion, none of the old files
    assert no_leftovers(tmp_path)


def test_to_hf_into_an_empty_existing_folder_needs_no_overwrite(run_dir, tmp_path):
    expected = snapshot(convert_to_hf(run_dir / "final", tmp_path / "reference"))
    (tmp_path / "out").mkdir()
    assert snapshot(convert_to_hf(run_dir / "final", tmp_path / "out")) == expected


def test_an_existing_file_is_never_replaced_by_a_folder(run_dir, tmp_path):
    out = tmp_path / "model"
    out.write_text("a file")
    with pytest.raises(ValueError, match="is an existing file; choose a folder path"):
        convert_to_hf(run_dir / "final", out, overwrite=True)
    assert out.read_text() == "a file"


def test_a_folder_filled_during_the_conversion_is_not_replaced(run_dir, tmp_path, monkeypatch):
    """The check runs again just before publishing: the folder may have been written meanwhile."""
    from litliger.convert import to_hf

    out, real_save = tmp_path / "out", to_hf.save_tensors

    def save_and_meanwhile_write(*args, **kwargs):
        out.mkdir()
        (out / "notes.txt").write_text("written while converting")
        real_save(*args, **kwargs)

    monkeypatch.setattr(to_hf, "save_tensors", save_and_meanwhile_write)
    with pytest.raises(ValueError, match=r"is not empty \(holds notes\.txt\)"):
        convert_to_hf(run_dir / "final", out)
    assert snapshot(out) == {"notes.txt": b"written while converting"} and no_leftovers(tmp_path)


# --- convert_from_hf -------------------------------------------------------------------------------------------


def test_from_hf_refuses_a_non_empty_folder_and_keeps_every_byte(hf_dir, tmp_path):
    out = user_folder(tmp_path / "out")
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"^output folder .* is not empty \(holds \.hidden, model\.safetensors"):
        convert_from_hf(hf_dir, out)
    assert snapshot(out) == before and no_leftovers(tmp_path)


@pytest.mark.parametrize("target", [".", "hf", "hf/lit"])
def test_from_hf_never_writes_over_or_into_its_input_even_with_overwrite(hf_dir, tmp_path, target):
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="the input"):
        convert_from_hf(hf_dir, tmp_path / target, overwrite=True)
    assert snapshot(tmp_path) == before


def test_from_hf_overwrite_gives_the_original_checkpoint_back(run_dir, hf_dir, tmp_path):
    out = user_folder(tmp_path / "out")
    convert_from_hf(hf_dir, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [CHECKSUMS_FILE, "model.safetensors", CONFIG_FILE]  # replaced
    original, back = load_state_dict(run_dir / "final"), load_state_dict(out)
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert no_leftovers(tmp_path)


def test_from_hf_into_an_empty_existing_folder_needs_no_overwrite(run_dir, hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    convert_from_hf(hf_dir, tmp_path / "out")
    original, back = load_state_dict(run_dir / "final"), load_state_dict(tmp_path / "out")
    assert sorted(back) == sorted(original) and all(torch.equal(back[k], original[k]) for k in original)


# --- merge_lora ------------------------------------------------------------------------------------------------


def finetune_step(base: Path, folder: Path) -> Path:
    """A LoRA finetune's step folder on ``base``, as a run writes it (trainable.safetensors, finetune.yaml,
    model_config.yaml, training_state/, checksums.json); random adapters, B not zero, so merging changes W."""
    from litliger.checkpoint.finetuned import finetune_meta, write_finetune_files
    from litliger.checkpoint.io import atomic_dir, base_identity
    from litliger.model.lora import LoRAArgs, apply_lora

    config, lora = tiny_config(), LoRAArgs(r=2, alpha=4.0, dropout=0.0)
    with torch.device("meta"):
        model = GPT(config)
        apply_lora(model, lora)
    g = torch.Generator().manual_seed(2)
    tensors = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters() if ".lora_" in n}
    digest = base_identity(base / MODEL_FILE)
    meta = finetune_meta(
        method="lora", lora=lora, trainable=sorted(tensors), base_dir=base, base_digest=digest, prompt_style=None
    )
    with atomic_dir(folder) as tmp:
        write_finetune_files(tmp, tensors, meta=meta, config=config, final=False)
        (tmp / "training_state").mkdir()
        (tmp / "training_state" / "state.json").write_text("{}")
    return folder


@pytest.fixture
def ft_step(run_dir, tmp_path) -> Path:
    """tmp_path/ft/step-00000002: a finetune run's step folder, on tmp_path/run/final as its base."""
    return finetune_step(run_dir / "final", tmp_path / "ft" / "step-00000002")


def test_merge_refuses_a_non_empty_folder_and_keeps_every_byte(ft_step, tmp_path):
    out = user_folder(tmp_path / "out")
    before = snapshot(out)
    with pytest.raises(ValueError) as e:
        merge_lora_checkpoint(ft_step, out)
    assert str(e.value) == (
        f"output folder {out} is not empty (holds .hidden, model.safetensors, notes.txt and 2 more); "
        "choose an empty or new folder, or pass --overwrite true to replace it"
    )
    assert snapshot(out) == before and no_leftovers(tmp_path)


@pytest.mark.parametrize(
    "target, message",
    [
        ("ft/step-00000002", "output folder {out} is the input folder; choose another folder"),
        ("ft", "output folder {out} holds the input {step}; choose a folder outside it"),  # the finetune run
        ("ft/step-00000002/merged", "output folder {out} is inside the input {step}; choose a folder outside it"),
        ("run/final", "output folder {out} is the input folder; choose another folder"),  # the base
        ("run", "output folder {out} holds the input {base}; choose a folder outside it"),  # the base's run
        ("run/final/merged", "output folder {out} is inside the input {base}; choose a folder outside it"),
        (".", "output folder {out} holds the input {step}; choose a folder outside it"),  # around both
    ],
    ids=["input", "finetune-run", "inside-input", "base", "base-run", "inside-base", "around-both"],
)
def test_merge_never_writes_over_or_into_its_inputs_even_with_overwrite(ft_step, tmp_path, target, message):
    out, base = tmp_path / target, (tmp_path / "run" / "final").resolve()
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as e:
        merge_lora_checkpoint(ft_step, out, overwrite=True)
    assert str(e.value) == message.format(out=out, step=ft_step, base=base)
    assert snapshot(tmp_path) == before  # both runs, byte for byte


@pytest.mark.parametrize("mark", ["step-00000010", "final", "training_state", LOCK_FILE])
def test_merge_refuses_a_training_run_folder_even_with_overwrite(ft_step, tmp_path, mark):
    other = tmp_path / "other_run"  # neither input's run: still never replaced
    other.mkdir()
    (other / "metrics.jsonl").write_text("{}\n")
    if mark == LOCK_FILE:
        (other / mark).touch()
    else:
        (other / mark).mkdir()
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"holds a training run \(.*\); choose another folder \(--overwrite never"):
        merge_lora_checkpoint(ft_step, other, overwrite=True)
    assert snapshot(other) == before


def test_merge_overwrite_replaces_a_plain_folder_with_the_merged_checkpoint(ft_step, tmp_path):
    expected = snapshot(merge_lora_checkpoint(ft_step, tmp_path / "reference"))
    assert {MODEL_FILE, CONFIG_FILE, CHECKSUMS_FILE, "finetune.yaml"} <= set(expected)
    merged, base = load_state_dict(tmp_path / "reference"), load_state_dict(tmp_path / "run" / "final")
    qkv = "transformer.h.0.attn.qkv.weight"  # an adapted layer: the merge changed it
    assert merged.keys() == base.keys() and not torch.equal(merged[qkv], base[qkv])
    out = user_folder(tmp_path / "out")
    merge_lora_checkpoint(ft_step, out, overwrite=True)
    assert snapshot(out) == expected  # exactly the merge, none of the old files
    assert no_leftovers(tmp_path)


def test_a_folder_filled_during_the_merge_is_not_replaced(ft_step, tmp_path, monkeypatch):
    """The check runs again just before publishing: the folder may have been written meanwhile."""
    from litliger.checkpoint import finetuned

    out, real_copy = tmp_path / "out", finetuned.copy_tokenizer_files

    def copy_and_meanwhile_write(*args, **kwargs):
        out.mkdir()
        (out / "notes.txt").write_text("written while merging")
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(finetuned, "copy_tokenizer_files", copy_and_meanwhile_write)
    with pytest.raises(ValueError, match=r"is not empty \(holds notes\.txt\)"):
        merge_lora_checkpoint(ft_step, out)
    assert snapshot(out) == {"notes.txt": b"written while merging"} and no_leftovers(tmp_path)


# --- the command line ------------------------------------------------------------------------------------------


def test_cli_refuses_a_non_empty_folder_with_one_line(run_dir, tmp_path, capsys):
    out = user_folder(tmp_path / "out")
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        cli_main(["convert_to_hf", str(run_dir / "final"), str(out)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"litliger: error: output folder {out} is not empty") and err.count("\n") == 1
    assert snapshot(out) == before
    cli_main(["convert_to_hf", str(run_dir / "final"), str(out), "--overwrite", "true"])  # what the message says
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()


# --- the run lock ----------------------------------------------------------------------------------------------


def locked_elsewhere(out_dir: Path) -> bool:
    """Whether some open file holds the flock (a fresh descriptor conflicts even within this process)."""
    fd = os.open(out_dir / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def python(code: str, *args: str) -> subprocess.Popen:
    """A fresh Python process running ``code`` (stdout and stderr together, as text)."""
    cmd = [sys.executable, "-c", code, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


TRY_ACQUIRE = """
import sys
from litliger.checkpoint.safety import RunLock
try:
    RunLock(sys.argv[1]).acquire()
except ValueError as e:
    print(type(e).__name__, e)
    sys.exit(3)
"""

HOLD = """
import sys, time
from litliger.checkpoint.safety import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_records_its_holder_and_a_clean_release_is_not_stale(tmp_path):
    out = tmp_path / "new" / "run"
    lock = RunLock(out)
    assert lock.acquire() is None and lock.held  # creates out_dir; nothing to take over
    info = json.loads((out / LOCK_FILE).read_text())
    assert info["pid"] == os.getpid() and info["host"] == HOST and "command" not in info  # it may hold secrets
    assert (out / LOCK_FILE).stat().st_mode & 0o777 == 0o600
    assert datetime.fromisoformat(info["started"]).tzinfo is not None
    assert locked_elsewhere(out)
    lock.release()
    assert not lock.held and not locked_elsewhere(out)
    assert (out / LOCK_FILE).exists()  # left in place: deleting it would open a race
    lock.release()  # a no-op when not held
    assert RunLock(out).acquire() is None  # a clean exit is not reported as a crash


def test_another_process_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path / "run"):
        started = json.loads((tmp_path / "run" / LOCK_FILE).read_text())["started"]
        child = python(TRY_ACQUIRE, str(tmp_path / "run"))
        output, _ = child.communicate(timeout=120)
    assert child.returncode == 3, output
    assert output.strip() == (
        f"RunLockedError out_dir {tmp_path / 'run'} is in use by process {os.getpid()} on host {HOST} "
        f"(started {started}); wait for it to finish or choose another --out_dir"
    )


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    child = python(HOLD, str(out))
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"is in use by process {child.pid} on host {HOST} "):
            RunLock(out).acquire()
    finally:
        child.send_signal(signal.SIGKILL)  # no cleanup runs: the lock file still names the child
        child.wait(timeout=60)
        child.stdout.close()
    lock = RunLock(out)
    stale = lock.acquire()
    assert isinstance(stale, LockHolder) and (stale.pid, stale.host) == (child.pid, HOST)
    assert stale.stale_notice() == f"taking over the stale lock of process {child.pid} on host {HOST}"
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_acquiring_a_held_folder_again_in_this_process_is_an_error_not_a_deadlock(tmp_path):
    out = tmp_path / "run"
    first = RunLock(out)
    first.acquire()
    (tmp_path / "alias").symlink_to(out)
    for again in (first, RunLock(out), RunLock(tmp_path / "alias")):  # same file, any spelling
        with pytest.raises(RunLockedError, match=rf"is already locked by this process \(pid {os.getpid()}\)"):
            again.acquire()
    assert first.held and locked_elsewhere(out)  # the failed attempts did not drop the first lock
    first.release()
    with RunLock(tmp_path / "alias") as second:  # free again
        assert second.held and second.stale is None
    assert not locked_elsewhere(out)


def test_the_context_manager_releases_on_error(tmp_path):
    with pytest.raises(RuntimeError), RunLock(tmp_path / "run"):
        assert locked_elsewhere(tmp_path / "run")
        raise RuntimeError("the run failed")
    assert not locked_elsewhere(tmp_path / "run")
