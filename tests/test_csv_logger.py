"""The CSV logger gets every logged line (train and validation), on disk at the end, at saves and on SIGTERM.

Lightning's CSVLogger buffers 100 steps and nothing wrote the rest out: a 7-step run left
``logs/csv/version_0/`` empty, and a 150-step run kept steps 1-99 only.
"""

import csv
from pathlib import Path

import pytest
from test_pretrain import run, write_corpus
from test_signals import Run, pretrain

from litliger.engine import EvalArgs


def csv_rows(out: Path, version: int = 0) -> list[dict[str, str]]:
    with open(out / "logs" / "csv" / f"version_{version}" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def steps_with(rows: list[dict[str, str]], key: str) -> list[int]:
    return [int(r["step"]) for r in rows if r.get(key)]


def test_every_train_and_val_line_reaches_metrics_csv(tmp_path, monkeypatch):
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    eval_args = EvalArgs(interval=3, max_iters=1, final_validation=True)
    run(out, corpus, steps=7, eval=eval_args, logger="csv")
    rows = csv_rows(out)
    assert steps_with(rows, "loss") == list(range(1, 8))
    assert steps_with(rows, "val_loss") == [3, 6, 7]
    first = next(r for r in rows if r.get("loss"))
    assert {"loss", "lr", "tokens", "grad_norm"} <= {k for k, v in first.items() if v}
    assert float(first["tokens"]) == 64


@pytest.fixture
def no_runs_left():
    yield
    while Run.started:
        Run.started.pop().kill()


@pytest.mark.slow
def test_sigterm_stopped_run_has_its_rows_and_a_resume_writes_the_rest(tmp_path, no_runs_left):
    write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    # SIGTERM during step 5: the run finishes the step, saves step-5 and stops (exit 0)
    stopped = pretrain(tmp_path, out, 7, hook="step:5:SIGTERM:1")
    assert stopped.returncode == 0, stopped
    assert "stopped after step 5" in stopped.stdout, stopped
    assert steps_with(csv_rows(out), "loss") == [1, 2, 3, 4, 5]
    # the resumed run writes its own version_1: the steps after the checkpoint, each once, and the final val
    resumed = pretrain(tmp_path, out, 7, "--resume", "auto")
    assert resumed.returncode == 0, resumed
    assert f"plot the curves with: litliger plot {out}" in resumed.stdout
    rows = csv_rows(out, version=1)
    assert steps_with(rows, "loss") == [6, 7] and steps_with(rows, "val_loss") == [7]
    assert steps_with(csv_rows(out), "loss") == [1, 2, 3, 4, 5]  # the stopped run's rows stay as they were
