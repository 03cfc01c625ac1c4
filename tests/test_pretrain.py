"""The pretraining recipe and engine on CPU: init always applied, exact resume, checkpoints, bad input."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from litliger import GPT, Config
from litliger.checkpoint import load_state_dict
from litliger.checkpoint.layout import MODEL_FILE
from litliger.data import TextFiles
from litliger.engine import EvalArgs, OptimizerArgs, TrainArgs, find_resume_checkpoint
from litliger.nn import Embedding, Linear
from litliger.nn.init import InitPolicy
from litliger.recipes.pretrain import setup

REPO = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()  # noqa: SIM905


def tiny_config(**overrides) -> Config:
    values = dict(
        name="tiny",
        block_size=32,
        vocab_size=320,
        padding_multiple=64,
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_query_groups=1,
        intermediate_size=64,
        norm_class="RMSNorm",
        mlp_class="SwiGLUMLP",
        bias=False,
    )
    return Config(**{**values, **overrides})


def write_corpus(root: Path, files: int = 9, words: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        (root / f"doc{i:02d}.txt").write_text(text + "\n")
    return root


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path / "corpus")


def run(out_dir: Path, corpus: Path, *, steps: int, resume=False, save_interval=None, config=None, **kw) -> Path:
    train = TrainArgs(
        global_batch_size=4,
        micro_batch_size=2,
        max_seq_length=16,
        max_steps=steps,
        lr_warmup_steps=2,
        min_lr=1e-4,
        save_interval=save_interval,
        log_interval=1,
    )
    return setup(
        model_config=config or tiny_config(),
        out_dir=out_dir,
        accelerator="cpu",
        data=kw.pop("data", None) or TextFiles(train_data_path=corpus, val_split_fraction=0.15, seed=3),
        train=kw.pop("train", train),
        eval=kw.pop("eval", EvalArgs(interval=None, max_iters=2, final_validation=False)),
        optimizer=OptimizerArgs(lr=1e-2),
        resume=resume,
        seed=kw.pop("seed", 1),
        **kw,
    )


def losses(out_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def assert_same_weights(a: Path, b: Path) -> None:
    """The checkpoint folders ``a`` and ``b`` hold the same tensors, bitwise."""
    wa, wb = load_state_dict(a), load_state_dict(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{a} and {b} differ in {differ}"


def test_train_writes_checkpoints_metrics_and_learns(tmp_path, corpus):
    out = tmp_path / "out"
    eval_args = EvalArgs(interval=10, max_iters=2, initial_validation=True, final_validation=True)
    final = run(out, corpus, steps=20, save_interval=10, eval=eval_args)
    assert final == out / "final"
    assert {p.name for p in out.iterdir()} >= {"step-00000010", "final", "metrics.jsonl", "logs"}
    assert {p.name for p in final.iterdir()} >= {MODEL_FILE, "model_config.yaml", "tokenizer.json", "training_state"}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == list(range(1, 21))
    for m in train_lines:
        assert {"tokens", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(m)
        assert m["tokens"] == m["step"] * 4 * 16
    val = [m["val_loss"] for m in lines if "val_loss" in m]
    assert len(val) == 3 and val[-1] < val[0] - 0.5
    assert train_lines[-1]["lr"] == pytest.approx(1e-4)  # cosine ends at min_lr
    model = GPT.from_checkpoint(final)
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 320)


@pytest.mark.parametrize("cut", [3, 5])
def test_exact_resume_across_epoch_boundaries(tmp_path, corpus, cut):
    # the training split holds 8 files of ~12 samples of 17 tokens: an epoch is a few steps, so 10 steps
    # cross several epoch boundaries; the cut at 3 falls mid-epoch, the cut at 5 is checked to hit another spot
    straight = tmp_path / "straight"
    run(straight, corpus, steps=10, save_interval=cut)
    resumed = tmp_path / "resumed"
    run(resumed, corpus, steps=10, resume=straight / f"step-{cut:08d}")
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(cut + 1, 11))
    assert all(a[s] == b[s] for s in b), {s: (a[s], b[s]) for s in b if a[s] != b[s]}  # bitwise equal
    assert_same_weights(straight / "final", resumed / "final")


def test_resume_auto_sweeps_partial_saves_and_never_skips_broken_checkpoints(tmp_path, corpus):
    out = tmp_path / "out"
    run(out, corpus, steps=6, save_interval=2)
    shutil.rmtree(out / "final")
    (out / ".litliger-tmp.step-00000008").mkdir()  # what a kill during a save leaves behind
    assert find_resume_checkpoint(out) == out / "step-00000004"
    (out / "step-00000006").mkdir()  # a step folder without its files is not resumable, and never skipped silently
    with pytest.raises(ValueError, match="cannot be resumed from: step-00000006"):
        run(out, corpus, steps=6, resume="auto")
    assert (out / "step-00000006").is_dir() and (out / "step-00000004" / MODEL_FILE).is_file()
    shutil.rmtree(out / "step-00000006")
    before = losses(out)
    run(out, corpus, steps=6, resume="auto")
    assert not (out / ".litliger-tmp.step-00000008").exists()  # reclaimed by the run that holds the lock
    after = losses(out)
    assert after[5] == before[5] and after[6] == before[6]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in lines if "loss" in m]
    assert steps == list(range(1, 7))  # the resumed steps replace the interrupted run's lines


def test_seed_checkpoint_applies_the_init_policy(tmp_path, corpus):
    config = tiny_config(n_embd=64, intermediate_size=128)
    final = run(tmp_path / "seed", corpus, steps=0, config=config)
    weights = load_state_dict(final)
    policy = InitPolicy.from_config(config)
    with torch.device("meta"):
        model = GPT(config)
    for name, module in model.named_modules():
        if isinstance(module, (Linear, Embedding)):
            std = weights[f"{name}.weight"].double().std().item()
            assert abs(std / policy.std(module.role) - 1) < 0.05, (name, std)
    assert torch.all(weights["transformer.ln_f.weight"] == 1)
    # the same seed gives the same weights; a resumed run does not re-initialise
    again = load_state_dict(run(tmp_path / "seed2", corpus, steps=0, config=config))
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    other = load_state_dict(run(tmp_path / "seed3", corpus, steps=0, config=config, seed=2))
    assert not torch.equal(weights["transformer.wte.weight"], other["transformer.wte.weight"])


def test_resume_does_not_reinitialise(tmp_path, corpus):
    out = tmp_path / "out"
    run(out, corpus, steps=4, save_interval=2)
    ckpt = out / "step-00000002"
    # make the stored weights recognisable: an init would overwrite them
    from safetensors.torch import save_file

    from litliger.checkpoint.checksums import write_checksums

    weights = load_state_dict(ckpt)
    weights["transformer.ln_f.weight"] = torch.full_like(weights["transformer.ln_f.weight"], 3.0)
    save_file(weights, str(ckpt / MODEL_FILE))
    write_checksums(ckpt)  # a deliberate edit, recorded (an unrecorded one is refused: tests/test_trust.py)
    resumed = run(tmp_path / "resumed", corpus, steps=2, resume=ckpt)  # nothing left to train
    assert torch.equal(load_state_dict(resumed)["transformer.ln_f.weight"], weights["transformer.ln_f.weight"])


def test_fresh_run_refuses_an_out_dir_with_checkpoints(tmp_path, corpus):
    out = tmp_path / "out"
    run(out, corpus, steps=2)
    before = (out / "final" / MODEL_FILE).read_bytes()
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume auto"):
        run(out, corpus, steps=2)
    assert (out / "final" / MODEL_FILE).read_bytes() == before


def test_bad_checkpoints_are_reported_and_kept(tmp_path, corpus):
    out = tmp_path / "out"
    run(out, corpus, steps=2, save_interval=1)
    ckpt = out / "step-00000001"
    with pytest.raises(ValueError, match=r"different model \(fields \['head_size', 'n_embd'\] differ"):
        run(tmp_path / "x", corpus, steps=2, resume=ckpt, config=tiny_config(n_embd=64))
    data = (ckpt / MODEL_FILE).read_bytes()
    (ckpt / MODEL_FILE).write_bytes(data[:100])
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        run(tmp_path / "y", corpus, steps=2, resume=ckpt)
    assert (ckpt / MODEL_FILE).read_bytes() == data[:100]  # nothing deleted or rewritten
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        run(tmp_path / "z", corpus, steps=2, resume=tmp_path / "nope")


def test_nonfinite_loss_stops_without_saving(tmp_path, corpus):
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match="NaN/Inf by step 1; stopping without saving"):
        run(out, corpus, steps=4, save_interval=1, config=tiny_config(init_std=1e25))
    assert find_resume_checkpoint(out) is None


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, corpus):
    from litliger.data import Tokenizer

    Tokenizer.train_bpe(sorted(corpus.glob("*.txt")), vocab_size=400).save(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"tokenizer has 3[2-9]\d tokens but the model 'tiny' has only 320 embedding"):
        run(tmp_path / "out", corpus, steps=1, tokenizer_dir=tmp_path / "tok")


def test_kill_during_save_leaves_previous_checkpoints(tmp_path, corpus, monkeypatch):
    out = tmp_path / "out"
    run(out, corpus, steps=2, save_interval=1)
    import litliger.recipes.pretrain as pretrain

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died while writing the weights

    monkeypatch.setattr(pretrain, "write_model_files", crash)
    with pytest.raises(KeyboardInterrupt):
        run(out, corpus, steps=4, resume="auto", save_interval=1)
    assert find_resume_checkpoint(out) == out / "final"
    assert not (out / "step-00000003").exists()


# --- the command line (subprocesses: Fabric re-launches the command for every rank) ----------------------


def cli(args: list[str], env_extra: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "litliger", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO
    )


def cli_args(tmp_path: Path, corpus: Path, out: Path, steps: int, *extra: str) -> list[str]:
    config = tmp_path / "model.yaml"
    tiny_config().save(config)
    return [
        "pretrain",
        "--model_config", str(config),
        "--out_dir", str(out),
        "--accelerator", "cpu",
        "--data", "litliger.data.TextFiles",
        "--data.train_data_path", str(corpus),
        "--data.val_split_fraction", "0.3",
        "--train.global_batch_size", "4",
        "--train.micro_batch_size", "2",
        "--train.max_seq_length", "16",
        "--train.max_steps", str(steps),
        "--train.lr_warmup_steps", "2",
        "--train.log_interval", "1",
        "--eval.interval", "null",
        "--eval.max_iters", "2",
        "--seed", "1",
        *extra,
    ]  # fmt: skip


def test_cli_unknown_key_and_bad_data_path(tmp_path, corpus):
    env = {"LITLIGER_CACHE": str(tmp_path / "cache")}
    result = cli(["pretrain", "--config", str(REPO / "config_hub/pretrain/debug.yaml"), "--train.max_stepz", "3"], env)
    assert result.returncode != 0 and "train.max_stepz" in result.stderr
    result = cli(cli_args(tmp_path, tmp_path / "missing", tmp_path / "out", 1), env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("litliger: error:")
    assert str(tmp_path / "missing") in result.stderr


@pytest.mark.slow
def test_cli_sigterm_saves_and_resume_continues(tmp_path, corpus):
    env = {"LITLIGER_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    # a flat schedule after warmup (min_lr = lr): the interrupted run (max_steps 100000), its resume and the
    # uninterrupted run (max_steps step + 2) then have the same learning rate at every step
    flat = ("--optimizer.lr", "4e-4", "--train.min_lr", "4e-4")
    proc = subprocess.Popen(
        [sys.executable, "-m", "litliger", *cli_args(tmp_path, corpus, out, 100000, *flat)],
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or len(losses(out)) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert "SIGTERM: stopped after step" in output
    stopped = find_resume_checkpoint(out)
    step = int(stopped.name.split("-")[1])
    assert step >= 3 and sorted(losses(out)) == list(range(1, step + 1))
    result = cli([*cli_args(tmp_path, corpus, out, step + 2, *flat), "--resume", "auto"], env)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {stopped} at step {step}" in result.stdout
    straight = cli(cli_args(tmp_path, corpus, tmp_path / "straight", step + 2, *flat), env)
    assert straight.returncode == 0, straight.stderr
    # every step, before and after the signal, bitwise as in the uninterrupted run; the same final weights
    got, want = losses(out), losses(tmp_path / "straight")
    assert sorted(want) == list(range(1, step + 3)) and got == want, {s: (got.get(s), want[s]) for s in want}
    assert_same_weights(out / "final", tmp_path / "straight" / "final")


# `litliger pretrain` whose Nth weights write ($STALL_SAVE_AT) stops for good, inside the save: its temporary folder
# exists, the training state is written, the weights are not. The test SIGKILLs it there.
STALLED_SAVE = """
import os, sys, time
import litliger.recipes.pretrain as recipe
write, calls = recipe.write_model_files, []
def stalled(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(os.environ["STALL_SAVE_AT"]):
        print("stalled in the save", file=sys.stderr, flush=True)
        time.sleep(600)
    return write(*args, **kwargs)
recipe.write_model_files = stalled
from litliger.cli import main
main()
"""


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkill_during_save_leaves_previous_checkpoints_and_resume_removes_the_leftover(tmp_path, corpus):
    """A real kill -9 while step-3 is written: no cleanup runs (unlike the KeyboardInterrupt above)."""
    from litliger.checkpoint.checksums import verify_checksums
    from litliger.checkpoint.layout import is_leftover

    env = {"LITLIGER_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    args = cli_args(tmp_path, corpus, out, 4, "--train.save_interval", "1")
    log = tmp_path / "killed.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-c", STALLED_SAVE, *args],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1", "STALL_SAVE_AT": "3"},
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 300
        while not (list(out.glob(".litliger-tmp.step-00000003*")) and "stalled in the save" in log.read_text()):
            assert time.time() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.1)
        before = {name: folder_bytes(out / name) for name in ("step-00000001", "step-00000002")}
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    [leftover] = out.glob(".litliger-tmp.step-00000003*")  # nothing cleaned up: the temporary folder stays
    assert (leftover / "training_state").is_dir() and not (leftover / MODEL_FILE).exists()  # killed mid-save
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step-")) == list(before)
    for name, files in before.items():
        assert folder_bytes(out / name) == files, name  # byte for byte as they were
        verify_checksums(out / name, training_state=True)
    assert find_resume_checkpoint(out) == out / "step-00000002"

    resumed = cli([*args, "--resume", "auto"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"taking over the stale lock of process {proc.pid}" in resumed.stdout  # the killed run's lock
    assert f"removed {leftover.name} (left by an interrupted save)" in resumed.stdout
    assert f"resumed from {out / 'step-00000002'} at step 2" in resumed.stdout
    assert not leftover.exists() and not [p for p in out.iterdir() if is_leftover(p.name)]
    assert find_resume_checkpoint(out) == out / "final"
    straight = cli(cli_args(tmp_path, corpus, tmp_path / "straight", 4, "--train.save_interval", "1"), env)
    assert straight.returncode == 0, straight.stderr
    assert losses(out) == losses(tmp_path / "straight") and sorted(losses(out)) == [1, 2, 3, 4]
    assert_same_weights(out / "final", tmp_path / "straight" / "final")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_cli_two_processes_init_and_resume(tmp_path, corpus, strategy):
    env = {"LITLIGER_CACHE": str(tmp_path / "cache")}
    # seed checkpoints: the same weights on 1 process and on 2 (replicated or sharded)
    single = cli(cli_args(tmp_path, corpus, tmp_path / "one", 0), env)
    assert single.returncode == 0, single.stderr
    multi = cli([*cli_args(tmp_path, corpus, tmp_path / "two", 0), "--devices", "2", "--strategy", strategy], env)
    assert multi.returncode == 0, multi.stderr
    a, b = load_state_dict(tmp_path / "one" / "final"), load_state_dict(tmp_path / "two" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # exact resume with 2 processes: 4 steps straight vs 2 + resume + 2, with activation checkpointing (DDP: per op,
    # FSDP2: whole blocks, set before sharding)
    checkpointing = {"ddp": "selective:op", "fsdp": "full"}[strategy]
    two = ["--devices", "2", "--strategy", strategy, "--train.activation_checkpointing", checkpointing]
    straight = cli([*cli_args(tmp_path, corpus, tmp_path / "s", 4), *two, "--train.save_interval", "2"], env)
    assert straight.returncode == 0, straight.stderr
    resumed = cli(
        [*cli_args(tmp_path, corpus, tmp_path / "r", 4), *two, "--resume", str(tmp_path / "s" / "step-00000002")], env
    )
    assert resumed.returncode == 0, resumed.stderr
    la, lb = losses(tmp_path / "s"), losses(tmp_path / "r")
    assert sorted(lb) == [3, 4] and all(la[s] == lb[s] for s in lb), (la, lb)
    assert_same_weights(tmp_path / "s" / "final", tmp_path / "r" / "final")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["debug", "mixture-debug"])
def test_cli_debug_config_runs(tmp_path, name):
    """The README's main job (config_hub/pretrain/debug.yaml) and the mixture that needs no download, shortened:
    each config file is valid end to end."""
    out = tmp_path / name
    args = ["pretrain", "--config", str(REPO / f"config_hub/pretrain/{name}.yaml"), "--out_dir", str(out)]
    short = ["--train.max_steps", "4", "--eval.interval", "2", "--eval.max_iters", "2", "--sample.max_new_tokens", "8"]
    result = cli([*args, *short], {"LITLIGER_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert "--- sample ---\ndef " in result.stdout
    assert (out / "final" / "tokenizer.json").is_file() and len(losses(out)) == 1  # log_interval 10: the last step
    if name == "mixture-debug":
        last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
        assert {"val_loss", "val_loss/modules", "val_loss/packages"} <= set(last)


@pytest.mark.parametrize("config_file", sorted((REPO / "config_hub").rglob("*.yaml")), ids=lambda p: p.name)
def test_config_hub_files_parse(config_file, capsys):
    from litliger.cli import main

    command = config_file.parent.name  # config_hub/<command>/*.yaml
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", str(config_file), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    key = {"pretrain": "model_name:", "finetune": "checkpoint_dir:"}[command]
    assert key in printed and "train:" in printed


def test_pretrained_checkpoint_exports_to_transformers_and_generates(tmp_path, corpus):
    import transformers  # a test dependency: missing, this fails instead of skipping

    from litliger.convert import convert_to_hf
    from litliger.inference.generate import main as generate_main

    final = run(tmp_path / "out", corpus, steps=3)
    convert_to_hf(final, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = GPT.from_checkpoint(final).eval()
    idx = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-4, rtol=0)
    text = generate_main(final, prompt="alpha beta", max_new_tokens=5, temperature=0.0, device="cpu")
    assert text.startswith("alpha beta")
