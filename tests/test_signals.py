"""SIGTERM and SIGINT at every moment of a `litliger pretrain` run, and the out_dir run lock, end to end.

Each run is a real `litliger pretrain` process. A precise moment is hit without sleeps: the process is started
through ``arm()`` below, which wraps one function of litliger so that the process sends itself the signal
at exactly that point (see ``_targets``), then runs the ordinary command-line entry point.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pretrain import REPO, cli_args, losses, write_corpus

from litliger.checkpoint.layout import MODEL_FILE
from litliger.data.cache import reclaim_stale
from litliger.engine import find_resume_checkpoint

pytestmark = pytest.mark.slow

HOOK_ENV = "LITLIGER_TEST_SIGNAL"  # "<target>:<nth call>:<SIGNAME>:<how many signals>"
ARMED = "import test_signals; test_signals.arm(); from litliger.cli import main; main()"
STOPPED = "stopped after step"


# --- the hook, run inside the litliger process ----------------------------------------------------------


def _targets() -> dict:
    """target -> (module, function, fire after the call instead of before it, signal the parent process)."""
    import litliger.data.corpus
    import litliger.data.shards
    import litliger.data.tokenizer
    import litliger.engine.loop
    import litliger.recipes.common
    import litliger.recipes.pretrain

    return {
        # a signal while the BPE trainer (Rust) consumes the corpus: at the nth text it reads
        "tokenizer": (litliger.data.tokenizer, "_texts", False, False),
        # the chunks are written into the cache's private .tmp-* folder, which is not published yet
        "prepare": (litliger.data.corpus, "run_units", True, False),
        # while a preparation worker process reads documents: it signals the litliger process, as a scheduler would
        "prepare-worker": (litliger.data.shards, "read_documents", False, True),
        "validate": (litliger.engine.loop, "validation_sums", False, False),
        # after the step's backward, before its optimizer step
        "step": (litliger.engine.loop, "_clip_gradients", False, False),
        # mid-save: the optimizer state is written, the weights are not yet
        "save": (litliger.recipes.pretrain, "write_model_files", False, False),
        "sample": (litliger.recipes.common, "complete", False, False),
    }


def arm() -> None:
    """Make this process send itself the signal that $LITLIGER_TEST_SIGNAL describes."""
    where, nth, name, times = os.environ[HOOK_ENV].split(":")
    module, function, after, parent = _targets()[where]
    original = getattr(module, function)
    calls = 0

    def fire() -> None:
        nonlocal calls
        calls += 1
        if calls == int(nth):
            print(f"signal hook: {name} x{times} in {where}", file=sys.stderr, flush=True)
            for _ in range(int(times)):
                os.kill(os.getppid() if parent else os.getpid(), signal.Signals[name])
            if parent:
                time.sleep(1)  # the litliger process acts on it while this worker still runs

    def wrapper(*args, **kwargs):
        if not after:
            fire()
        result = original(*args, **kwargs)
        if after:
            fire()
        return result

    def generator_wrapper(*args, **kwargs):
        for item in original(*args, **kwargs):
            fire()
            yield item

    setattr(module, function, generator_wrapper if where in ("tokenizer", "prepare-worker") else wrapper)


# --- helpers -----------------------------------------------------------------------------------------------


class Run:
    """A `litliger pretrain` process (optionally armed) whose output goes to files, not pipes.

    It runs in a session of its own, so that the test can kill it with every process it started.
    """

    started: list["Run"] = []

    def __init__(self, args: list[str], cache: Path, logs: Path, hook: str | None = None) -> None:
        env = {**os.environ, "LITLIGER_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), str(REPO), env.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "litliger"]
        if hook is not None:
            env[HOOK_ENV] = hook
            command = [sys.executable, "-c", ARMED]
        n = len(list(logs.glob("*.out")))
        self.stdout_path, self.stderr_path = logs / f"{n}.out", logs / f"{n}.err"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [*command, *args], env=env, cwd=REPO, stdout=out, stderr=err, text=True, start_new_session=True
            )
        self.pid = self.proc.pid
        Run.started.append(self)

    def kill(self) -> None:
        """SIGKILL the run and every process it started (e.g. litdata's workers)."""
        with contextlib.suppress(ProcessLookupError):  # all of them are gone already
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: float = 300) -> "Run":
        self.returncode = self.proc.wait(timeout=timeout)
        self.stdout, self.stderr = self.stdout_path.read_text(), self.stderr_path.read_text()
        return self

    def last(self, stream: str) -> str:
        lines = [line for line in getattr(self, stream).splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The corpus and the model config (and a data/tokenizer cache for tests that do not test caching)."""
    root = tmp_path_factory.mktemp("signals")
    write_corpus(root / "corpus")
    return root


@pytest.fixture(autouse=True)
def no_runs_left():
    """A failed test leaves no litliger process (or worker of one) running."""
    yield
    while Run.started:
        Run.started.pop().kill()


def pretrain(root: Path, out: Path, steps: int, *extra: str, hook=None, cache=None, wait=True) -> Run:
    """`litliger pretrain` of the tiny model on ``root``'s corpus into ``out``; logs next to it."""
    logs = out.parent / f"{out.name}-logs"
    logs.mkdir(parents=True, exist_ok=True)  # the config file is written there: runs in parallel do not share it
    run = Run(cli_args(logs, root / "corpus", out, steps, *extra), cache or root / "cache", logs, hook)
    return run.wait() if wait else run


def checkpoints(out: Path) -> list[str]:
    if not out.exists():
        return []
    return sorted(p.name for p in out.iterdir() if p.name.startswith("step-") or p.name == "final")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_interrupted(run: Run, name: str, code: int) -> None:
    """Stopped with nothing unsaved: one line from the CLI, the signal's exit code, no traceback."""
    assert run.returncode == code, run
    assert f"signal hook: {name}" in run.stderr, run  # the signal was sent where the test meant it
    assert run.last("stderr").startswith(f"litliger: stopped by {name}"), run
    assert "Traceback" not in run.stderr, run


# --- scenarios ---------------------------------------------------------------------------------------------


def test_signals_before_any_step_exit_cleanly_and_leave_nothing(tmp_path, shared):
    # SIGTERM during the initial validation (data and tokenizer from the shared cache), alongside the rest
    validated = pretrain(
        shared, tmp_path / "validate", 3, "--eval.initial_validation", "true", hook="validate:1:SIGTERM:1", wait=False
    )
    cache = tmp_path / "cache"  # fresh: these runs train the tokenizer and prepare the data themselves
    out = tmp_path / "out"

    # Ctrl-C while the BPE tokenizer trains: exit 130, nothing written, nothing cached
    run = pretrain(shared, out, 2, hook="tokenizer:2:SIGINT:1", cache=cache)
    assert_interrupted(run, "SIGINT", 130)
    assert checkpoints(out) == [] and not (out / "metrics.jsonl").exists()
    assert not list(cache.rglob("*.json"))  # no tokenizer, no data entry

    # SIGTERM while the training split is tokenized into the cache: exit 0, no half-prepared entry, no .tmp-*
    run = pretrain(shared, out, 2, hook="prepare:1:SIGTERM:1", cache=cache)
    assert_interrupted(run, "SIGTERM", 0)
    assert checkpoints(out) == [] and not (out / "metrics.jsonl").exists()
    assert [p.name for p in (cache / "data").iterdir()] == []
    assert not (out / ".litliger-lock").read_text()  # released cleanly: the next run takes no stale lock over

    # what a SIGKILL during preparation leaves: a .tmp-* folder of a process that is gone. The next run reclaims it.
    stale = cache / "data" / f".tmp-train-0123-{socket.gethostname()}-{run.pid}-0123abcd"
    (stale / "sub").mkdir(parents=True)
    run = pretrain(shared, out, 2, cache=cache)
    assert run.returncode == 0, run
    assert run.last("stdout") == f"saved {out / 'final'}"
    assert "taking over" not in run.stdout
    assert not stale.exists() and not list((cache / "data").glob(".tmp-*"))
    assert checkpoints(out) == ["final"] and sorted(losses(out)) == [1, 2]

    assert_interrupted(validated.wait(), "SIGTERM", 0)
    assert checkpoints(tmp_path / "validate") == [] and not list((tmp_path / "validate").glob(".*tmp*"))
    assert not (tmp_path / "validate" / "metrics.jsonl").exists()


def test_second_sigterm_during_a_save_neither_breaks_it_nor_loses_a_step(tmp_path, shared):
    args = ("--train.save_interval", "3")
    straight = pretrain(shared, tmp_path / "straight", 6, *args, wait=False)  # the same run, uninterrupted
    out = tmp_path / "out"
    run = pretrain(shared, out, 6, *args, hook="save:1:SIGTERM:2")  # both signals while step-3 is written
    assert run.returncode == 0, run
    assert "signal hook: SIGTERM x2 in save" in run.stderr
    assert run.last("stdout") == f"SIGTERM: {STOPPED} 3; resume with --resume auto", run
    assert checkpoints(out) == ["step-00000003"] and not list(out.glob(".*tmp*"))
    assert find_resume_checkpoint(out) == out / "step-00000003"  # complete and loadable
    assert sorted(losses(out)) == [1, 2, 3]

    resumed = pretrain(shared, out, 6, *args, "--resume", "auto", wait=False)
    assert straight.wait().returncode == 0, straight
    expected = losses(tmp_path / "straight")

    # meanwhile: --resume auto never skips a checkpoint it cannot use (here the uninterrupted run's step-3 without
    # its weights): one line naming it, nothing deleted
    (tmp_path / "straight" / "step-00000003" / MODEL_FILE).unlink()
    before = sorted((tmp_path / "straight").rglob("*"))
    broken = pretrain(shared, tmp_path / "straight", 6, *args, "--resume", "auto")
    assert broken.returncode == 1, broken
    line = broken.last("stderr")
    assert line.startswith(f"litliger: error: out_dir {tmp_path / 'straight'}"), broken
    assert "cannot be resumed from: step-00000003" in line and "Traceback" not in broken.stderr
    assert set(before) <= set((tmp_path / "straight").rglob("*"))

    assert resumed.wait().returncode == 0, resumed
    assert f"resumed from {out / 'step-00000003'} at step 3" in resumed.stdout
    assert resumed.last("stdout") == f"saved {out / 'final'}"
    got = losses(out)
    assert sorted(got) == list(range(1, 7)) and all(got[s] == expected[s] for s in expected), (expected, got)
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps == list(range(1, 7))  # each step once: the resumed run replaced nothing twice


def test_sigterm_during_final_validation_saves_the_step_and_resume_finishes(tmp_path, shared):
    out = tmp_path / "out"
    run = pretrain(shared, out, 3, hook="validate:1:SIGTERM:1")  # the only validation: the final one
    assert run.returncode == 0, run
    assert "signal hook: SIGTERM x1 in validate" in run.stderr
    assert run.last("stdout") == f"SIGTERM: {STOPPED} 3; resume with --resume auto", run
    assert checkpoints(out) == ["step-00000003"] and find_resume_checkpoint(out) == out / "step-00000003"
    assert not any("val_loss" in m for m in metrics(out))

    resumed = pretrain(shared, out, 3, "--resume", "auto")
    assert resumed.returncode == 0, resumed
    assert f"resumed from {out / 'step-00000003'} at step 3" in resumed.stdout
    assert "step 3: val_loss" in resumed.stdout and resumed.last("stdout") == f"saved {out / 'final'}"
    assert checkpoints(out) == ["final", "step-00000003"]
    lines = metrics(out)
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3]
    assert [m["step"] for m in lines if "val_loss" in m] == [3]


def test_sigterm_at_the_end_of_a_run_prints_no_sample(tmp_path, shared):
    # during the end-of-run sample, and during the save of final/ just before it (the signal is deferred there);
    # Ctrl-C during that save: final/ is complete and the exit is 130, as for Ctrl-C at any other moment
    cases = {"sample": "SIGTERM", "save": "SIGTERM", "save-sigint": "SIGINT"}
    runs = {
        where: pretrain(
            shared, tmp_path / where, 2, "--sample.max_new_tokens", "8",
            hook=f"{where.split('-')[0]}:1:{name}:1", wait=False,
        )
        for where, name in cases.items()
    }  # fmt: skip
    for where, run in runs.items():
        out = tmp_path / where
        assert_interrupted(run.wait(), cases[where], 130 if cases[where] == "SIGINT" else 0)
        assert "--- sample ---" not in run.stdout
        assert run.last("stdout") == f"saved {out / 'final'}", run
        assert checkpoints(out) == ["final"] and find_resume_checkpoint(out) == out / "final"


def test_signal_during_training_saves_the_step_and_prints_no_sample(tmp_path, shared):
    # fresh caches: the runs prepare their data themselves (in worker processes)
    runs = {
        name: pretrain(
            shared, tmp_path / name, 6, "--sample.max_new_tokens", "8", hook=f"step:2:{name}:1",
            cache=tmp_path / f"cache-{name}", wait=False,
        )
        for name in ("SIGTERM", "SIGINT")
    }  # fmt: skip
    for name, run in runs.items():
        out = tmp_path / name
        # the step is saved either way; Ctrl-C still reports the interruption, as before the first step (README)
        assert run.wait().returncode == {"SIGTERM": 0, "SIGINT": 130}[name], run
        assert f"signal hook: {name}" in run.stderr and "Traceback" not in run.stderr, run
        assert run.last("stdout") == f"{name}: {STOPPED} 2; resume with --resume auto", run
        assert "--- sample ---" not in run.stdout
        assert checkpoints(out) == ["step-00000002"] and sorted(losses(out)) == [1, 2]


def test_second_run_into_a_locked_out_dir_stops_at_once_and_a_stale_lock_is_taken_over(tmp_path, shared):
    out = tmp_path / "out"
    first = pretrain(shared, out, 100000, "--train.save_interval", "2", wait=False)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and first.proc.poll() is None, first.wait()
        time.sleep(0.2)

    second = pretrain(shared, out, 4)
    assert second.returncode == 1, second
    line = second.last("stderr")
    assert line.startswith(f"litliger: error: out_dir {out} is in use by process {first.pid} on host"), second
    assert [s for s in second.stderr.splitlines() if s.startswith("litliger")] == [line]  # no work was started
    assert first.proc.poll() is None  # the first run is untouched

    first.kill()
    first.wait()
    stopped = find_resume_checkpoint(out)
    step = int(stopped.name.split("-")[1]) if stopped is not None else 0
    third = pretrain(shared, out, step + 1, "--resume", "auto")
    assert third.returncode == 0, third
    assert f"taking over the stale lock of process {first.pid} on host {socket.gethostname()}" in third.stdout
    if stopped is not None:
        assert f"resumed from {stopped} at step {step}" in third.stdout
    assert third.last("stdout") == f"saved {out / 'final'}"
    assert max(losses(out)) == step + 1 and not list(out.glob(".*tmp*"))


def test_sigterm_while_preparation_workers_run_exits_at_once(tmp_path, shared):
    cache, out = tmp_path / "cache", tmp_path / "out"
    run = pretrain(shared, out, 2, hook="prepare-worker:1:SIGTERM:1", cache=cache, wait=False)
    deadline = time.time() + 300
    while "litliger: stopped by" not in run.stderr_path.read_text():
        assert time.time() < deadline and run.proc.poll() is None, run.wait()
        time.sleep(0.2)
    try:
        run.wait(timeout=15)  # what is left to do is to exit
    except subprocess.TimeoutExpired:
        run.kill()
        pytest.fail("the process did not exit within 15 s of its 'stopped by SIGTERM' line")
    assert_interrupted(run, "SIGTERM", 0)
    assert checkpoints(out) == []
    # a temporary folder a worker still wrote into is one the next run reclaims: its process is gone
    reclaim_stale(cache / "data")
    assert not list((cache / "data").glob(".tmp-*"))
