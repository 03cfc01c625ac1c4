"""Launching beyond Fabric's own launcher, and recovering by itself: torchrun on one and on two (simulated)
nodes gives the same run bitwise, a rank killed under ``torchrun --max-restarts`` costs only the steps since
the last checkpoint, and the checkpoint-keeping options (``keep_last``, time-based saves)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pretrain import REPO, assert_same_weights, cli_args, losses, run, write_corpus

from litliger.engine import TrainArgs, find_resume_checkpoint
from litliger.engine.training_state import _wait_until_visible, prune_step_checkpoints, read_state

STEPS = 24
SAVE_EVERY = 4
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # what torchrun gives each worker: the same kernels in every launch


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    write_corpus(root / "corpus")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_args(root: Path, out: Path, *extra: str) -> list[str]:
    args = cli_args(root, root / "corpus", out, STEPS, "--train.save_interval", str(SAVE_EVERY), *extra)
    return [*args, "--strategy", "ddp"]


def environment(root: Path) -> dict[str, str]:
    return {**os.environ, **ONE_THREAD, "LITLIGER_CACHE": str(root / "cache"), "PYTHONUNBUFFERED": "1"}


def torchrun(*options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *options, "-m", "litliger"]


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(*procs: subprocess.Popen) -> list[str]:
    """Wait for every process; all must exit 0. Returns their outputs."""
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * len(procs), outputs
    return outputs


@pytest.fixture(scope="module")
def reference(workspace) -> dict[int, float]:
    """The uninterrupted run, 2 processes started by Fabric's own launcher."""
    out = workspace / "fabric"
    command = [sys.executable, "-m", "litliger", *launch_args(workspace, out, "--devices", "2")]
    finish(start(command, environment(workspace)))
    return losses(out)


@pytest.mark.slow
def test_torchrun_one_node_and_two_nodes_match_fabric_launch(workspace, reference):
    one_node = workspace / "torchrun-1x2"
    command = torchrun("--nnodes", "1", "--nproc_per_node", "2", "--master_port", str(free_port()))
    finish(start(command + launch_args(workspace, one_node, "--devices", "2"), environment(workspace)))
    # two "nodes" of one process each on this host, joined by the c10d rendezvous
    two_nodes, port = workspace / "torchrun-2x1", free_port()
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"]
    args = launch_args(workspace, two_nodes, "--devices", "1", "--num_nodes", "2")
    node = lambda rank: torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), *rdzv) + args
    finish(*[start(node(rank), environment(workspace)) for rank in (0, 1)])
    assert losses(one_node) == reference
    assert losses(two_nodes) == reference
    assert_same_weights(one_node / "final", workspace / "fabric" / "final")
    assert_same_weights(two_nodes / "final", workspace / "fabric" / "final")


@pytest.mark.slow
def test_srun_tasks_match_fabric_launch(workspace, reference):
    """What ``srun --ntasks-per-node 2`` gives each task (Fabric's SLURM environment), on this host."""
    out = workspace / "srun-1x2"
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "SLURM_JOB_ID": str(free_port()), "SLURM_JOB_NAME": "litliger-test"}  # fmt: skip
    command = [sys.executable, "-m", "litliger", *launch_args(workspace, out, "--devices", "2")]
    task_env = lambda rank: {**environment(workspace), **slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}
    finish(*[start(command, task_env(rank)) for rank in (0, 1)])
    assert losses(out) == reference
    assert_same_weights(out / "final", workspace / "fabric" / "final")


def worker_pid(out_dir: Path, rank: int) -> int | None:
    """The pid of the training process of global ``rank`` writing into ``out_dir`` (from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = str(out_dir).encode() in cmdline and b"torch.distributed.run" not in cmdline
        if ours and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_killed_rank_restarts_the_group_which_resumes_and_finishes(workspace, reference):
    out = workspace / "recovering"
    options = ["--nnodes", "1", "--nproc_per_node", "2", "--max-restarts", "1", "--master_port", str(free_port())]
    command = torchrun(*options)
    command += launch_args(workspace, out, "--devices", "2", "--resume", "auto")
    proc = start(command, environment(workspace))
    # kill rank 1 while the second checkpoint is being written (its hidden temporary folder exists)
    first, second = out / f"step-{SAVE_EVERY:08d}", out / f"step-{2 * SAVE_EVERY:08d}"
    writing = out / f".litliger-tmp.{second.name}"
    deadline = time.monotonic() + 300
    while not first.is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    pid = worker_pid(out, rank=1)
    assert pid is not None
    while not (writing.is_dir() or second.is_dir()):  # a starved poller may miss the short save: then after it
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.001)
    os.kill(pid, 9)
    killed_at = time.monotonic()
    published = second.is_dir()  # the save may just have finished between the check and the kill
    [output] = finish(proc)
    recovered_in = time.monotonic() - killed_at
    resumed = [line for line in output.splitlines() if line.startswith("resumed from")]
    assert len(resumed) == 1, output
    resumed_step = int(resumed[0].split()[-1])
    # the interrupted save left the previous checkpoint intact and was never picked up half-written
    assert resumed_step == (2 * SAVE_EVERY if published else SAVE_EVERY), (published, output)
    assert losses(out) == reference  # the restarted group continues exactly: every step equals the straight run's
    assert_same_weights(out / "final", workspace / "fabric" / "final")  # and so do the final weights
    assert find_resume_checkpoint(out).name == "final" and not [
        p for p in out.iterdir() if p.is_dir() and p.name[0] == "."
    ]
    state = "after it was published" if published else "while it was written"
    print(f"killed rank 1 at {second.name} {state}; resumed at step {resumed_step}; done {recovered_in:.1f} s later")


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name == "final" or p.name.startswith("step-"))


def test_keep_last_and_time_based_saves_and_a_resume_from_the_oldest_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus")

    def train(**kw) -> TrainArgs:
        values = dict(global_batch_size=4, micro_batch_size=2, max_seq_length=16, lr_warmup_steps=2, log_interval=1)
        return TrainArgs(**{**values, **kw})

    out = tmp_path / "kept"
    run(out, corpus, steps=8, train=train(max_steps=8, save_interval=2, keep_last=2))
    assert checkpoints(out) == ["final", "step-00000004", "step-00000006"]
    straight = losses(out)

    # resume from the oldest kept checkpoint, into the same folder, keeping 1: the folder resumed from stays
    oldest = out / "step-00000004"
    resumed_out = tmp_path / "resumed"
    run(resumed_out, corpus, steps=8, resume=oldest, train=train(max_steps=8, save_interval=2, keep_last=1))
    assert checkpoints(resumed_out) == ["final", "step-00000006"]
    assert {s: v for s, v in losses(resumed_out).items() if s > 4} == {s: v for s, v in straight.items() if s > 4}
    assert_same_weights(resumed_out / "final", out / "final")
    run(out, corpus, steps=10, resume=oldest, train=train(max_steps=10, save_interval=2, keep_last=1))
    assert checkpoints(out) == ["final", "step-00000004", "step-00000008"]

    # time-based: a (tiny) interval that has always passed saves at every log point, step-based saves off
    timed = tmp_path / "timed"
    every_log_point = train(max_steps=7, save_interval=None, save_interval_minutes=1e-9, log_interval=3)
    run(timed, corpus, steps=7, train=every_log_point)
    assert checkpoints(timed) == ["final", "step-00000003", "step-00000006"]


def test_prune_never_touches_final_or_the_protected_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    run(out, write_corpus(tmp_path / "corpus"), steps=6, save_interval=1)
    assert prune_step_checkpoints(out, 1, keep={out / "step-00000001"}) == [
        "step-00000002", "step-00000003", "step-00000004"
    ]  # fmt: skip
    assert checkpoints(out) == ["final", "step-00000001", "step-00000005"]
    assert read_state(out / "final")["step"] == 6


def test_publishing_waits_for_files_other_nodes_reported(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(b"12345")
    _wait_until_visible(tmp_path, [{"a": {"size": 5}}])  # visible at full size: returns at once
    monkeypatch.setenv("LITLIGER_FS_WAIT", "0")
    with pytest.raises(OSError, match=r"1 files written by other ranks did not appear .* \(e\.g\. b\)"):
        _wait_until_visible(tmp_path, [{"a": {"size": 5}}, {"b": {"size": 3}}])
    with pytest.raises(OSError, match="e.g. a"):  # still being written: smaller than reported
        _wait_until_visible(tmp_path, [{"a": {"size": 6}}])
