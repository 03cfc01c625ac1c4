"""Validation counts batches over all ranks: the same weights give the same val_loss on 1 and 2 processes, and
``litliger evaluate`` on a run's checkpoint reproduces the run's last val_loss from the checkpoint's run.yaml."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from test_finetune import write_instructions
from test_pretrain import cli, cli_args, tiny_config, write_corpus

from litliger import GPT
from litliger.checkpoint.checksums import write_checksums
from litliger.checkpoint.layout import RUN_FILE, TRAINING_STATE_DIR
from litliger.cli import main as cli_main
from litliger.data import Instructions, TextFiles, Tokenizer
from litliger.data.base import rank_share
from litliger.engine import EvalArgs, OptimizerArgs, TrainArgs
from litliger.engine import next_token_loss as instruction_loss
from litliger.engine.losses import validation_sums
from litliger.eval.evaluate import main as evaluate
from litliger.recipes.finetune import response_tokens
from litliger.recipes.pretrain import setup as pretrain


class _Ranks:
    """What validation_sums needs of a Fabric: its place in the process group, and a sum over ranks."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        dist = torch.distributed
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.global_rank = dist.get_rank() if dist.is_initialized() else 0

    def all_reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor


def _sums(root: Path, tok: Tokenizer, records: Path) -> dict[str, tuple[float, float]]:
    """(loss sum, targets) of the same model over token blocks and instruction data, several prefix lengths."""
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=256))
    text = TextFiles(root, val_split_fraction=0.3)
    text.connect(tok, batch_size=2, max_seq_length=16)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        text.prepare_data()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    text.setup()
    instructions = Instructions(json_path=records, val_split_fraction=0.3)
    instructions.select_prompt_style(None)
    instructions.connect(tok, batch_size=3, max_seq_length=255)
    instructions.setup()
    fabric, out = _Ranks(), {}
    for n in (1, 3, 1000):  # fewer batches than ranks, an odd number, more than the split holds
        out[f"text{n}"] = validation_sums(fabric, model, text.val_dataloader(), n)
        out[f"instr{n}"] = validation_sums(
            fabric, model, instructions.val_dataloader(), n, instruction_loss, response_tokens
        )
        # a loss function with stats (as the preference losses'): summed like the loss, fillers counting zero
        out[f"stats{n}"] = validation_sums(
            fabric, model, instructions.val_dataloader(), n, _with_stats, response_tokens
        )
    return out


def _with_stats(model, batch):  # noqa: ANN001, ANN202
    return instruction_loss(model, batch), {"targets": response_tokens(batch).double()}


def _rank_main(rank: int, port: int, root: Path, tok: Tokenizer, records: Path, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results.put((rank, _sums(root, tok, records)))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_validate_the_same_batches_as_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))
    root = write_corpus(tmp_path / "corpus", files=10, words=150)
    tok = Tokenizer.train_bpe(sorted(root.glob("*.txt")), vocab_size=300)
    records = write_instructions(tmp_path / "records.jsonl", n=40)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: a fork of a process whose OpenMP threads ran torch ops (any earlier test in this pytest
    # process) can deadlock in the child's first parallel op (libgomp is not fork-safe)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, root, tok, records, results)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    one = _sums(root, tok, records)
    assert out[0] == out[1]  # both ranks report the all-reduced sums
    assert one["text1"][1] == 2 * 16 and one["text3"][1] == 3 * 2 * 16 < one["text1000"][1]
    for key, (loss, count, stats) in one.items():
        # the next-token loss reports no stats; a stat summed like the loss equals the target count
        assert stats == ({"targets": count} if key.startswith("stats") else {}), key
        assert out[0][key][2] == stats, key
        assert out[0][key][1] == count, key  # the same targets: the same samples
        assert out[0][key][0] == pytest.approx(loss, rel=1e-5), key


def test_rank_share_gives_every_rank_the_same_number_of_forwards():
    batches = list(range(7))
    shares = [list(rank_share(batches, 5, r, 3)) for r in range(3)]
    assert shares == [[(0, True), (3, True)], [(1, True), (4, True)], [(2, True), (0, False)]]
    assert list(rank_share(batches, None, 0, 1)) == [(b, True) for b in batches]
    assert [list(rank_share([9], 4, r, 2)) for r in range(2)] == [[(9, True)], [(9, False)]]


@pytest.mark.slow
def test_cli_fsdp_step_zero_val_loss_equals_one_process(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", files=12, words=200)
    env = {"LITLIGER_CACHE": str(tmp_path / "cache")}

    def step0(out: Path, *extra: str) -> float:
        args = cli_args(tmp_path, corpus, out, 1, "--eval.initial_validation", "true", "--eval.max_iters", "3")
        result = cli([*args, *extra], env)
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return next(m["val_loss"] for m in lines if m["step"] == 0 and "val_loss" in m)

    one = step0(tmp_path / "one")
    assert step0(tmp_path / "two", "--devices", "2", "--strategy", "fsdp") == pytest.approx(one, rel=1e-5)


# --- litliger evaluate on a run's checkpoint ---------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("run")
    patch = pytest.MonkeyPatch()  # module scope: the monkeypatch fixture is per test
    patch.setenv("LITLIGER_CACHE", str(root / "cache"))
    corpus = write_corpus(root / "corpus", files=10, words=150)
    train = TrainArgs(global_batch_size=4, micro_batch_size=2, max_seq_length=16, max_steps=3, lr_warmup_steps=1)
    pretrain(
        model_config=tiny_config(),
        out_dir=root / "out",
        accelerator="cpu",
        data=TextFiles(train_data_path=corpus, val_split_fraction=0.3, seed=3),
        train=train,
        eval=EvalArgs(interval=None, max_iters=3, final_validation=True),
        optimizer=OptimizerArgs(lr=1e-2),
        seed=1,
    )
    yield root / "out"
    patch.undo()


def test_evaluate_reproduces_the_runs_last_val_loss(run_dir, capsys):
    record = yaml.safe_load((run_dir / "final" / RUN_FILE).read_text())
    assert record["data"]["class_path"] == "litliger.data.TextFiles"
    assert record["validation"] == {"max_seq_length": 16, "batch_size": 2, "max_batches": 3}
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_loss = [m["val_loss"] for m in lines if "val_loss" in m][-1]
    capsys.readouterr()
    cli_main(["evaluate", str(run_dir / "final"), "--device", "cpu"])  # no flags: the run's data and settings
    printed = json.loads(capsys.readouterr().out)
    assert (printed["data"], printed["batches"], printed["batch_size"], printed["max_seq_length"]) == (
        "TextFiles",
        3,
        2,
        16,
    )
    assert printed["loss"] == pytest.approx(val_loss, rel=1e-6)
    whole = evaluate(run_dir / "final", device="cpu", max_batches=1000)  # a flag overrides the record
    assert whole["batches"] > 3 and whole["loss"] != printed["loss"]


def _copy_without_state(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(TRAINING_STATE_DIR))
    return dst


def test_checkpoint_without_run_record_uses_the_defaults(run_dir, tmp_path):
    old = _copy_without_state(run_dir / "final", tmp_path / "old")
    (old / RUN_FILE).unlink()
    write_checksums(old)
    data = TextFiles(train_data_path=run_dir.parent / "corpus", val_split_fraction=0.3)
    result = evaluate(old, data=data, device="cpu")
    assert (result["batch_size"], result["max_seq_length"], result["max_batches"]) == (4, 32, None)
    assert result["batches"] >= 1


@pytest.mark.parametrize("class_path", ["os.system", "subprocess.Popen", "litliger.data.base.Tokenizer", "litliger"])
def test_run_record_naming_another_class_is_refused(run_dir, tmp_path, class_path, capsys):
    ckpt = _copy_without_state(run_dir / "final", tmp_path / "crafted")
    record = yaml.safe_load((ckpt / RUN_FILE).read_text())
    record["data"] = {"class_path": class_path, "init_args": {"command": "touch pwned"}}
    (ckpt / RUN_FILE).write_text(yaml.safe_dump(record))
    write_checksums(ckpt)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", str(ckpt), "--device", "cpu"])
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"names the data module {class_path!r}, in {RUN_FILE}; only litliger.data classes" in line
    assert not Path("touch pwned").exists() and not (tmp_path / "pwned").exists()


def test_a_whole_held_out_folder_is_evaluated_and_cannot_be_trained_on(run_dir, tmp_path):
    held_out = write_corpus(tmp_path / "held_out", files=3, words=100, seed=5)
    data = TextFiles(train_data_path=held_out, val_split_fraction=1.0)
    result = evaluate(run_dir / "final", data=data, device="cpu")
    # the same as naming the folder as validation data: every file of it is evaluated
    named = evaluate(run_dir / "final", data=TextFiles(held_out, val_data_path=held_out), device="cpu")
    assert result["tokens"] == named["tokens"] > 0 and result["loss"] == pytest.approx(named["loss"], rel=1e-9)
    with pytest.raises(ValueError, match=r"^val_split_fraction=1\.0 holds out all of .*held_out for validation"):
        pretrain(
            model_config=tiny_config(),
            out_dir=tmp_path / "out",
            accelerator="cpu",
            data=TextFiles(train_data_path=held_out, val_split_fraction=1.0),
            train=TrainArgs(global_batch_size=2, micro_batch_size=2, max_seq_length=16, max_steps=1),
            tokenizer_dir=run_dir / "final",
        )
