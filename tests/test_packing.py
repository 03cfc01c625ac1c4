# ruff: noqa: F811 (pytest fixtures imported from sibling test modules are redefined as arguments)
"""Packed finetuning: the bin packing, the packed batch, and a packed step against the unpacked one."""

import json

import numpy as np
import pytest
import torch
from test_finetune import base, losses, records, run  # noqa: F401 (fixtures)

from litliger import GPT
from litliger.data import Instructions, Tokenizer
from litliger.data.example_loader import Example, ExampleLoader, collate, collate_packed
from litliger.data.packing import pack
from litliger.engine import next_token_loss


def test_pack_places_every_example_once_within_capacity_and_leaves_little_room():
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(5, 200, size=3000)]  # a long tail of lengths, as SFT data has
    rows = pack(lengths, 256, window=512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    fill = [sum(lengths[i] for i in row) for row in rows]
    assert max(fill) <= 256
    assert 1 - sum(lengths) / (256 * len(rows)) < 0.03  # under 3% of the rows' positions left empty
    assert rows == pack(lengths, 256, window=512)  # deterministic
    assert all(row == sorted(row) for row in rows)


def test_pack_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="example 1 takes 9 positions, more than a packed row of max_seq_length=8"):
        pack([3, 9], 8)


def test_a_packed_row_longer_than_max_seq_length_is_refused():
    examples = [_example([1, 2, 3, 4], [False, True, True, True]), _example([5, 6, 7], [False, True, True])]
    with pytest.raises(ValueError, match="packed row 0 holds 5 positions, more than max_seq_length=4"):
        ExampleLoader(examples, 1, pad_id=0, rows=[[0, 1]], row_width=4)


def _example(ids, trained):
    return Example(np.array(ids, dtype=np.int32), np.array(trained, dtype=bool))


def test_collate_packed_lays_out_documents_and_padding():
    a = _example([1, 2, 3], [False, True, True])
    b = _example([4, 5], [False, True])
    c = _example([6, 7, 8, 9], [False, False, True, True])
    batch = collate_packed([[a, b], [c]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 4], [6, 7, 8]]
    assert batch["targets"].tolist() == [[2, 3, 5], [-100, 8, 9]]
    assert batch["document_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    wide = collate_packed([[b], [c]], pad_id=0)
    assert wide["document_ids"].tolist() == [[0, 1, 1], [0, 0, 0]]  # padding: a document of its own
    assert wide["targets"][0].tolist() == [5, -100, -100]


def _prepared(base, records, packing):
    data = Instructions(json_path=records, val_split_fraction=0.1, seed=3, packing=packing)
    data.connect(Tokenizer.from_dir(base), batch_size=2, max_seq_length=60)
    data.select_prompt_style(base)
    data.setup()
    return data


@pytest.mark.parametrize("config", ["llama", "gpt2"])
def test_a_packed_step_equals_the_unpacked_step_over_the_same_examples(base, records, config, tmp_path):
    """Loss and gradients of (summed target losses) / (target count) over packed rows and over the padded
    batches of the same examples agree in fp32 (rotary restarted, or GPT-2's learned positions restarted)."""
    data = _prepared(base, records, packing=True)
    rows = data.packed_rows()[:4]
    examples = data.examples("train")
    chosen = [examples[i] for row in rows for i in row]
    assert len(chosen) > len(rows)  # rows do hold several examples
    packed = [collate_packed([[examples[i] for i in row] for row in rows[:2]], data._pad_id()),
              collate_packed([[examples[i] for i in row] for row in rows[2:]], data._pad_id())]  # fmt: skip
    unpacked = [collate(chosen[k : k + 3], data._pad_id()) for k in range(0, len(chosen), 3)]

    torch.manual_seed(0)
    if config == "llama":
        model = GPT.from_checkpoint(base)
    else:
        from test_finetune import gpt2_config

        model = GPT(gpt2_config())
    model.max_seq_length = 60

    def step(batches):
        model.zero_grad()
        count = sum(int((b["targets"] != -100).sum()) for b in batches)
        loss = sum(next_token_loss(model, b) for b in batches) / count
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_p, grads_p = step(packed)
    loss_u, grads_u = step(unpacked)
    torch.testing.assert_close(loss_p, loss_u, atol=1e-5, rtol=0)
    worst = max((grads_p[n] - grads_u[n]).abs().max().item() for n in grads_u)
    assert worst < 1e-5, worst
    # the documents matter: without their ids the packed rows give another loss
    plain = [{k: v for k, v in b.items() if k != "document_ids"} for b in packed]
    assert abs(step(plain)[0] - loss_u) > 1e-4


def test_packed_loader_deals_each_example_once_an_epoch_and_reports_padding(base, records):
    data = _prepared(base, records, packing=True)
    loader = data.train_dataloader()
    rows = data.packed_rows()
    assert loader.rows == rows and len(loader) == len(rows) // 2
    seen = [tuple(b["input_ids"][r, : int((b["document_ids"][r] == 0).sum())].tolist())
            for b in loader for r in range(2)]  # fmt: skip
    assert len(seen) == 2 * len(loader)
    unpacked = ExampleLoader(data.examples("train"), 2, data._pad_id(), seed=3)
    assert loader.padding_fraction() < unpacked.padding_fraction()
    line = data.padding_report()
    assert line.startswith(f"padding: {unpacked.padding_fraction():.1%} of the positions of unpacked batches, ")
    assert f"{loader.padding_fraction():.1%} packed" in line and line.endswith("this run packs")


def test_exact_resume_with_packing_across_an_epoch_boundary(tmp_path, base, records):
    def data():
        return Instructions(json_path=records, val_split_fraction=0.1, seed=3, packing=True)

    probe = _prepared(base, records, packing=True)
    per_epoch = len(probe.packed_rows()) // 4  # steps of 2 x 2 rows
    assert 2 <= per_epoch < 5
    steps, cut = per_epoch + 2, per_epoch - 1  # the cut falls before the epoch boundary, the run crosses it
    straight = tmp_path / "straight"
    run(straight, base, records, steps=steps, save_interval=cut, data=data())
    resumed = tmp_path / "resumed"
    run(resumed, base, records, steps=steps, resume=straight / f"step-{cut:08d}", data=data())
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(cut + 1, steps + 1)) and all(a[s] == b[s] for s in b), (a, b)


def test_epochs_count_passes_over_the_examples(tmp_path, base, records, capsys):
    probe = _prepared(base, records, packing=True)
    out = tmp_path / "out"
    run(out, base, records, steps=None, epochs=1, data=Instructions(json_path=records, val_split_fraction=0.1,
                                                                     seed=3, packing=True))  # fmt: skip
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in lines if "loss" in m) == len(probe.packed_rows()) // 4
    printed = capsys.readouterr().out
    assert "this run packs" in printed and "document masking: attention stays inside packed examples" in printed


def test_pretraining_refuses_instruction_data(tmp_path, records):
    from test_finetune import tiny_config

    from litliger.engine import TrainArgs
    from litliger.recipes.pretrain import setup as pretrain

    with pytest.raises(ValueError, match="Instructions is instruction data, in --data; finetune on it"):
        pretrain(
            model_config=tiny_config(),
            out_dir=tmp_path / "out",
            accelerator="cpu",
            data=Instructions(json_path=records, packing=True),
            train=TrainArgs(global_batch_size=2, micro_batch_size=2, max_seq_length=16, max_steps=1),
        )
    assert not (tmp_path / "out").exists()
