"""Weighted mixtures: proportions, exact resume (1 and 2 ranks, across every source's epoch boundary), per-source
validation and metrics, resume checks and a new phase (``reset``), bad sources."""

import json
import multiprocessing
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from litliger.data import Mixture, Tokenizer
from litliger.data.mixture import draws

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()  # noqa: SIM905


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))


def write_jsonl(path: Path, records: int, seed: int, key: str = "text", words: int = 30) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({key: f"{path.stem} {i}: " + " ".join(rng.choices(WORDS, k=words))}) for i in range(records)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=40)) + " 0123456789:" for _ in range(200)]
    return Tokenizer.train_bpe([], 300, texts=lambda: iter(texts), identity="test-mixture", use_cache=False)


def sources(tmp_path: Path, weights=(0.7, 0.3), sizes=(120, 25)) -> list[dict]:
    """Source "big" (jsonl, many samples) and "small" (a folder of text files: wraps around every few batches)."""
    big = write_jsonl(tmp_path / "big.jsonl", sizes[0], seed=1)
    small = tmp_path / "small"
    rng = random.Random(2)
    for i in range(sizes[1]):
        (small / f"d{i:02d}.txt").parent.mkdir(parents=True, exist_ok=True)
        (small / f"d{i:02d}.txt").write_text(f"small {i} " + " ".join(rng.choices(WORDS, k=12)))
    return [
        {"name": "big", "path": str(big), "weight": weights[0]},
        {"name": "small", "path": str(small), "weight": weights[1], "glob": "*.txt"},
    ]


def mixture(tok: Tokenizer, srcs: list[dict], batch_size: int = 3, seq: int = 16, **kw) -> Mixture:
    data = Mixture(sources=srcs, val_split_fraction=kw.pop("val_split_fraction", 0.1), **kw)
    data.connect(tok, batch_size, seq)
    data.prepare_data()
    data.setup()
    return data


def run(make, steps: int, cuts=frozenset()) -> list[torch.Tensor]:
    """``steps`` batches; at each cut the loader is rebuilt from its (JSON round-tripped) state, twice."""
    loader = make().train_dataloader()
    batches = iter(loader)
    out = []
    for step in range(steps):
        if step in cuts:
            for _ in range(2):
                state = json.loads(json.dumps(loader.state_dict()))
                loader = make().train_dataloader()
                loader.load_state_dict(state)
            batches = iter(loader)
        out.append(next(batches))
    return out


def test_proportions_follow_the_weights_over_10000_samples(tok: Tokenizer, tmp_path: Path) -> None:
    srcs = sources(tmp_path, weights=(0.5, 0.3))
    srcs.append({"name": "third", "path": str(write_jsonl(tmp_path / "third.jsonl", 60, seed=3)), "weight": 0.2})
    loader = mixture(tok, srcs, batch_size=10, seq=8).train_dataloader()
    batches = iter(loader)
    for _ in range(1000):  # 10,000 samples
        next(batches)
    observed = np.array(loader.consumed) / loader.position
    print(f"requested 0.5/0.3/0.2, observed {'/'.join(f'{p:.4f}' for p in observed)} over {loader.position} samples")
    assert loader.position == 10_000
    assert np.abs(observed - [0.5, 0.3, 0.2]).max() < 0.015
    metrics = loader.metrics()
    assert (
        metrics["tokens/big"] == loader.consumed[0] * 8 and sum(metrics[f"tokens/{s['name']}"] for s in srcs) == 80_000
    )
    assert metrics["epochs/small"] > 1  # the small source repeated
    # the draw is a function of (seed, position) alone
    assert np.array_equal(draws(42, np.array([0.5, 0.3, 0.2]), 1), draws(42, np.array([0.5, 0.3, 0.2]), 1))


def test_exact_resume_at_every_position_across_source_epochs(tok: Tokenizer, tmp_path: Path) -> None:
    srcs = sources(tmp_path, weights=(0.5, 0.5), sizes=(120, 8))

    def make() -> Mixture:
        return mixture(tok, srcs)

    steps = 24
    loader = make().train_dataloader()
    batches = iter(loader)
    straight = [next(batches) for _ in range(steps)]
    assert loader.metrics()["epochs/small"] >= 2  # the small source wraps around at least twice within the run
    assert all(torch.equal(a, b) for a, b in zip(straight, run(make, steps), strict=True))  # deterministic
    for cut in range(1, steps):
        resumed = run(make, steps, {cut})
        same = [torch.equal(a, b) for a, b in zip(straight, resumed, strict=True)]
        assert all(same), f"cut {cut}: first differing batch {same.index(False)}"
    resumed = run(make, steps, {2, 9, 10, 17})
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))


def test_validation_per_source(tok: Tokenizer, tmp_path: Path) -> None:
    srcs = sources(tmp_path)
    srcs[1]["val_split_fraction"] = 0.0  # a source may override the mixture's hold-out
    data = mixture(tok, srcs)
    val = data.val_dataloader()
    assert set(val) == {"big"}
    first = list(val["big"])
    assert first and all(torch.equal(a, b) for a, b in zip(first, list(val["big"]), strict=True))
    train_rows = {tuple(r.tolist()) for b in run(lambda: data, 20) for r in b}
    assert not train_rows & {tuple(r.tolist()) for b in first for r in b}  # held out


def test_resume_with_another_mixture_names_the_difference(tok: Tokenizer, tmp_path: Path) -> None:
    srcs = sources(tmp_path)
    loader = mixture(tok, srcs).train_dataloader()
    batches = iter(loader)
    for _ in range(4):
        next(batches)
    state = json.loads(json.dumps(loader.state_dict()))
    reweighted = [{**srcs[0], "weight": 0.5}, {**srcs[1], "weight": 0.5}]
    with pytest.raises(ValueError, match=r"source 'big' weight 0\.7 -> 0\.5; source 'small' weight 0\.3 -> 0\.5"):
        mixture(tok, reweighted).train_dataloader().load_state_dict(state)
    third = {"name": "third", "path": str(write_jsonl(tmp_path / "third.jsonl", 40, seed=3)), "weight": 0.1}
    with pytest.raises(ValueError, match=r"source 'small' is gone; source 'third' is new.*--data\.reset true"):
        mixture(tok, [srcs[0], third]).train_dataloader().load_state_dict(state)
    write_jsonl(tmp_path / "big.jsonl", 121, seed=1)  # the source's data changed
    with pytest.raises(ValueError, match=r"source 'big' data changed"):
        mixture(tok, srcs).train_dataloader().load_state_dict(state)
    with pytest.raises(ValueError, match=r"batch_size=3, this run 2"):
        write_jsonl(tmp_path / "big.jsonl", 120, seed=1)
        mixture(tok, srcs, batch_size=2).train_dataloader().load_state_dict(state)
    with pytest.raises(ValueError, match="not a mixture's"):
        mixture(tok, srcs).train_dataloader().load_state_dict({"version": 1, "epoch": 1})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.append(dict(s[0])), r"duplicate source name 'big'"),
        (
            lambda s: s[0].update(weight=0),
            r"source 'big' has weight 0, in --data\.sources; a weight is a number above 0",
        ),
        (lambda s: s[0].update(weight=-1.5), r"weight -1\.5"),
        (lambda s: s[0].update(weight="abc"), r"weight 'abc'"),
        (lambda s: s[0].update(weight=True), r"weight True"),
        (lambda s: s[0].pop("weight"), r"source 0 has no 'weight'"),
        (lambda s: s[0].update(wieght=1), r"source 0 has unknown key 'wieght'"),
        (lambda s: s.clear(), r"at least one source"),
    ],
)
def test_bad_sources_are_one_line_errors(tmp_path: Path, change, message) -> None:
    srcs = sources(tmp_path)
    change(srcs)
    with pytest.raises(ValueError, match=message):
        Mixture(sources=srcs)


def test_an_empty_source_names_itself(tok: Tokenizer, tmp_path: Path) -> None:
    srcs = sources(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    srcs.append({"name": "empty", "path": str(tmp_path / "empty.jsonl"), "weight": 0.1})
    with pytest.raises(ValueError, match=r"No text in .*empty\.jsonl"):
        mixture(tok, srcs)


def _rank_main(rank: int, port: int, srcs: list[dict], tok: Tokenizer, cache: str, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LITLIGER_CACHE=cache)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:

        def make() -> Mixture:
            data = Mixture(sources=srcs, val_split_fraction=0.1)
            data.connect(tok, 3, 16)
            if rank == 0:
                data.prepare_data()
            dist.barrier()
            data.setup()
            return data

        straight = run(make, 14)
        exact = [all(torch.equal(a, b) for a, b in zip(straight, run(make, 14, {c}), strict=True)) for c in (3, 8)]
        rows = {tuple(r.tolist()) for b in straight[:4] for r in b}
        results.put((rank, exact, rows))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_resume_exactly_and_read_disjoint_shares(tok: Tokenizer, tmp_path: Path) -> None:
    srcs = sources(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    args = (port, srcs, tok, str(tmp_path / "cache"), results)
    procs = [ctx.Process(target=_rank_main, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    out = sorted(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    (_, exact0, rows0), (_, exact1, rows1) = out
    assert all(exact0) and all(exact1), (exact0, exact1)
    assert not rows0 & rows1  # each rank reads its own share of every source
