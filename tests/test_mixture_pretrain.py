"""A Mixture through ``litliger pretrain``: bitwise resume (1 process, and 2 with DDP and FSDP), per-source metrics
and validation, a new phase with ``--data.reset true`` or ``--initial_checkpoint_dir``, and the error that names a
changed mixture."""

import json
from pathlib import Path

import pytest
from test_pretrain import assert_same_weights, cli, losses, tiny_config, write_corpus

from litliger.data import Mixture
from litliger.engine import EvalArgs, OptimizerArgs, TrainArgs
from litliger.recipes.pretrain import setup


def write_records(path: Path, n: int = 60) -> Path:
    rng = __import__("random").Random(5)
    words = "one two three four five six seven eight nine ten".split()  # noqa: SIM905
    path.write_text("".join(json.dumps({"body": " ".join(rng.choices(words, k=25))}) + "\n" for _ in range(n)))
    return path


@pytest.fixture
def two_sources(tmp_path, monkeypatch) -> list[dict]:
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))
    text = write_corpus(tmp_path / "text", files=6)
    records = write_records(tmp_path / "records.jsonl")
    return [
        {"name": "text", "path": str(text), "weight": 0.6, "glob": "*.txt"},
        {"name": "records", "path": str(records), "weight": 0.4, "text_key": "body"},
    ]


def run(out: Path, srcs: list[dict], *, steps: int, resume=False, save_interval=None, reset=False, **kw) -> Path:
    train = TrainArgs(
        global_batch_size=4, micro_batch_size=2, max_seq_length=16, max_steps=steps, lr_warmup_steps=2,
        min_lr=1e-4, save_interval=save_interval, log_interval=1,
    )  # fmt: skip
    return setup(
        model_config=tiny_config(),
        out_dir=out,
        accelerator="cpu",
        data=Mixture(sources=srcs, val_split_fraction=0.2, seed=3, reset=reset),
        train=train,
        eval=kw.pop("eval", EvalArgs(interval=None, max_iters=2, final_validation=False)),
        optimizer=OptimizerArgs(lr=1e-2),
        resume=resume,
        seed=1,
        **kw,
    )


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_mixture_trains_resumes_bitwise_and_logs_each_source(tmp_path, two_sources):
    straight = tmp_path / "straight"
    eval_args = EvalArgs(interval=4, max_iters=2, final_validation=True)
    run(straight, two_sources, steps=8, save_interval=3, eval=eval_args)
    lines = metrics(straight)
    train = [m for m in lines if "loss" in m]
    for m in train:  # tokens taken from each source, all ranks together, add up to the run's tokens
        assert m["tokens/text"] + m["tokens/records"] == m["tokens"] == m["step"] * 4 * 16
    assert train[-1]["epochs/text"] > 0 and train[-1]["epochs/records"] > 0
    assert 0.4 < train[-1]["tokens/text"] / train[-1]["tokens"] < 0.85
    val = [m for m in lines if "val_loss" in m]
    assert len(val) == 2 and all({"val_loss/text", "val_loss/records"} <= set(m) for m in val)
    assert min(m["val_loss/text"] for m in val) <= val[-1]["val_loss"] <= max(m["val_loss/records"] for m in val) or (
        min(m["val_loss/records"] for m in val) <= val[-1]["val_loss"] <= max(m["val_loss/text"] for m in val)
    )  # the overall loss lies between the per-source ones

    resumed = tmp_path / "resumed"
    run(resumed, two_sources, steps=8, resume=straight / "step-00000003", eval=eval_args)
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(4, 9)) and all(a[s] == b[s] for s in b), (a, b)  # bitwise
    per_source = {m["step"]: (m["tokens/text"], m["tokens/records"]) for m in metrics(resumed) if "loss" in m}
    assert all(per_source[m["step"]] == (m["tokens/text"], m["tokens/records"]) for m in train if m["step"] > 3)
    assert_same_weights(straight / "final", resumed / "final")


def test_a_changed_mixture_is_refused_and_a_new_phase_starts_it_fresh(tmp_path, two_sources):
    phase1 = tmp_path / "phase1"
    run(phase1, two_sources, steps=4)
    annealing = [{**two_sources[0], "weight": 0.2}, {**two_sources[1], "weight": 0.8}]
    out = tmp_path / "phase2"
    with pytest.raises(ValueError, match=r"source 'text' weight 0\.6 -> 0\.2.*--data\.reset true"):
        run(out, annealing, steps=6, resume=phase1 / "final")
    assert not (out / "final").exists()

    # --resume ... --data.reset true: model, optimizer and counters go on; the new mixture starts at its beginning
    run(out, annealing, steps=6, resume=phase1 / "final", reset=True)
    train = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in train] == [5, 6] and train[0]["tokens"] == 5 * 64
    assert train[0]["tokens/text"] + train[0]["tokens/records"] == 64  # counted from the new phase's start
    fresh = tmp_path / "fresh"  # the same mixture from the start, for comparison of the data stream
    run(fresh, annealing, steps=1)
    first = [m for m in metrics(fresh) if "loss" in m][0]
    assert (first["tokens/text"], first["tokens/records"]) == (train[0]["tokens/text"], train[0]["tokens/records"])

    # --initial_checkpoint_dir: the model only (new optimizer, step 0), then the new mixture
    model_only = tmp_path / "model_only"
    run(model_only, annealing, steps=2, initial_checkpoint_dir=phase1 / "final")
    assert [m["step"] for m in metrics(model_only) if "loss" in m] == [1, 2]
    assert losses(model_only)[1] < losses(fresh)[1]  # it starts from the trained weights


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp"])  # ranks read the mixture alike under DDP: DDP adds nothing here
def test_mixture_resumes_bitwise_on_two_processes(tmp_path, two_sources, strategy):
    config = tmp_path / "model.yaml"
    tiny_config().save(config)
    data = json.dumps({"class_path": "litliger.data.Mixture", "init_args": {"sources": two_sources, "seed": 3}})
    common = [
        "pretrain", "--model_config", str(config), "--accelerator", "cpu", "--devices", "2", "--strategy", strategy,
        "--data", data, "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
        "--train.max_seq_length", "16", "--train.max_steps", "4", "--train.lr_warmup_steps", "2",
        "--train.log_interval", "1", "--eval.interval", "null", "--eval.max_iters", "2", "--seed", "1",
    ]  # fmt: skip
    env = {"LITLIGER_CACHE": str(tmp_path / "cache")}
    straight = cli([*common, "--out_dir", str(tmp_path / "s"), "--train.save_interval", "2"], env)
    assert straight.returncode == 0, straight.stderr
    resumed = cli([*common, "--out_dir", str(tmp_path / "r"), "--resume", str(tmp_path / "s" / "step-00000002")], env)
    assert resumed.returncode == 0, resumed.stderr
    la, lb = losses(tmp_path / "s"), losses(tmp_path / "r")
    assert sorted(lb) == [3, 4] and all(la[s] == lb[s] for s in lb), (la, lb)
    assert_same_weights(tmp_path / "s" / "final", tmp_path / "r" / "final")
    last = [m for m in metrics(tmp_path / "r") if "loss" in m][-1]
    assert last["tokens/text"] + last["tokens/records"] == last["tokens"] == 4 * 4 * 16
