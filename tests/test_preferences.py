"""Preference pairs (litliger/data/preferences.py): the record formats, one-line errors naming file and line,
truncation and dropped pairs, the pair loader (2B rows, chosen first, reference values, exact resume) and the
embedded set's pairs from hand-made records. Data only: no model."""

# ruff: noqa: E501 (a row of the table reads best on one line)
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_instructions import CHATML, backend, tokenizer_dir  # noqa: F401 (fixture)

from litliger.data import Preferences, Tokenizer, infinite_batches
from litliger.data.example_loader import Example, ExampleLoader
from litliger.data.preferences import read_pairs, stdlib_pairs, to_pair

USER = {"role": "user", "content": "What is 2 + 2?"}
FOUR = {"role": "assistant", "content": "4."}
FIVE = {"role": "assistant", "content": "5."}
SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tok_dir(tmp_path: Path, backend) -> Path:  # noqa: F811 (the fixture imported above)
    return tokenizer_dir(tmp_path / "tok", backend, CHATML, add_bos=False)


def write(path: Path, records: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


def setup(path: Path, tok_dir: Path, batch_size: int = 2, max_seq_length: int = 256, **kw) -> Preferences:
    data = Preferences(json_path=path, **{"val_split_fraction": 0.0, **kw})
    data.select_prompt_style(tok_dir)
    data.connect(Tokenizer.from_dir(tok_dir), batch_size, max_seq_length)
    data.prepare_data()
    data.setup()
    return data


def numbered(i: int, reply_words: int = 2) -> dict:
    """A pair whose prompt names ``i``: chosen repeats "ok", rejected "no"."""
    return {
        "prompt": f"Say ok {i}",
        "chosen": " ".join(["ok"] * reply_words),
        "rejected": " ".join(["no"] * reply_words),
    }


# ---------------------------------------------------------------- records


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_the_record_formats_give_the_same_pair(tmp_path: Path, tok_dir: Path, suffix: str) -> None:
    strings = {"prompt": USER["content"], "chosen": "4.", "rejected": "5."}
    chat = {"chosen": [USER, FOUR], "rejected": [USER, FIVE], "score": 3}  # other keys are ignored
    prompt_and_replies = {"prompt": USER["content"], "chosen": [FOUR], "rejected": [FIVE]}
    multi_turn = {"chosen": [SYSTEM, USER, FOUR, USER, FOUR], "rejected": [SYSTEM, USER, FOUR, USER, FIVE]}
    for record in (strings, chat, prompt_and_replies):
        assert to_pair(record) == ([USER, FOUR], [USER, FIVE])
    assert to_pair(multi_turn) == (multi_turn["chosen"], multi_turn["rejected"])

    path = write(tmp_path / f"d{suffix}", [strings, chat, prompt_and_replies, multi_turn])
    pairs = read_pairs(path)
    where = [f"{path}:{n}" for n in range(1, 5)] if suffix == ".jsonl" else [f"{path}[{i}]" for i in range(4)]
    assert [p.where for p in pairs] == where and [p.group for p in pairs] == ["0", "1", "2", "3"]

    data = setup(path, tok_dir)
    assert data.stats["train"] == {"pairs": 4, "truncated": 0, "dropped": 0}
    assert data.stats["val"] == {"pairs": 0, "truncated": 0, "dropped": 0} and data.val_dataloader() is None
    examples = data.examples("train")  # [chosen 0, rejected 0, chosen 1, ...]
    assert len(examples) == 8
    for k in range(3):  # the three layouts of one pair tokenize identically
        for side in range(2):
            assert examples[2 * k + side].ids.tolist() == examples[side].ids.tolist()
            assert examples[2 * k + side].trained.tolist() == examples[side].trained.tolist()
    tok = data.tokenizer
    chosen, rejected = examples[0], examples[1]
    assert tok.decode(chosen.ids.tolist()) == data.style.render([USER, FOUR], add_generation_prompt=False)
    assert tok.decode(rejected.ids.tolist()) == data.style.render([USER, FIVE], add_generation_prompt=False)
    # the shared prompt is masked on both sides, the reply (and its end-of-turn text) trained
    prompt = int(np.argmax(chosen.trained))
    assert prompt == int(np.argmax(rejected.trained)) > 0
    assert chosen.ids[:prompt].tolist() == rejected.ids[:prompt].tolist()
    assert tok.decode(chosen.ids[chosen.trained].tolist()) == "4.<|im_end|>\n"
    assert tok.decode(rejected.ids[rejected.trained].tolist()) == "5.<|im_end|>\n"
    # a multi-turn pair: the earlier, shared reply is context; only the last reply is scored
    multi_c, multi_r = examples[6], examples[7]
    assert tok.decode(multi_c.ids[multi_c.trained].tolist()) == "4.<|im_end|>\n"
    assert tok.decode(multi_r.ids[multi_r.trained].tolist()) == "5.<|im_end|>\n"
    assert data.records["train"][0].messages == [USER, FOUR]  # the chosen conversations (prompts to sample from)
    assert "train 4 pairs (0 truncated, 0 dropped)" in data.summary() and "\n" not in data.summary()


@pytest.mark.parametrize(
    ("suffix", "content", "match"),
    [
        (".jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": "b"}\n', r"^missing field 'rejected' \(a pair needs both sides\), in .*d\.jsonl:3; give"),
        (".jsonl", '{"prompt": "a", "rejected": "c"}\n', r"^missing field 'chosen' .*, in .*d\.jsonl:1; "),
        (".json", '[{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": "b"}]', r"^'chosen' and 'rejected' are the same reply, in .*d\.json\[1\]; a pair must compare two different replies$"),
        (".jsonl", json.dumps({"chosen": [USER, FOUR], "rejected": [{"role": "user", "content": "2 + 3?"}, FIVE]}), r"^'chosen' and 'rejected' differ before their last reply, in .*d\.jsonl:1; both sides must share the prompt"),
        (".jsonl", json.dumps({"chosen": [SYSTEM, USER, FOUR], "rejected": [USER, FIVE]}), r"^'chosen' and 'rejected' differ before their last reply, in .*d\.jsonl:1; "),
        (".json", '{"prompt": "a", "chosen": "b", "rejected": "c"}', r"^the top level is a dict, not a list, in .*d\.json; give a list of pairs$"),
        (".jsonl", '{"chosen": "b", "rejected": "c"}\n', r"^'chosen' is a string but there is no 'prompt', in .*d\.jsonl:1; "),
        (".jsonl", json.dumps({"chosen": [USER, FOUR, USER], "rejected": [USER, FIVE]}), r"^the 'chosen' conversation does not end in an assistant reply, in .*d\.jsonl:1; "),
        (".jsonl", '{"prompt": 3, "chosen": "b", "rejected": "c"}\n', r"^field 'prompt' is a int, not a string, in .*d\.jsonl:1; "),
        (".jsonl", '{"prompt": "a", "chosen": "b", "rejected": 4}\n', r"^field 'rejected' is a int, not a string or a message list, in .*d\.jsonl:1; "),
        (".jsonl", '["a", "b"]\n', r"^the record is a list, not an object, in .*d\.jsonl:1; "),
        (".jsonl", '{"prompt": "a", "chosen": "b" "rejected": "c"}\n', r"invalid JSON .*d\.jsonl:1"),
        (".json", "[]", r"^no records in .*d\.json; add preference pairs"),
        (".txt", "hello", r"neither \.json nor \.jsonl"),
    ],
)  # fmt: skip
def test_malformed_records_are_one_line_naming_file_and_line(tmp_path: Path, suffix: str, content: str, match: str):
    (tmp_path / f"d{suffix}").write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        read_pairs(tmp_path / f"d{suffix}")
    assert "\n" not in str(info.value)


def test_bad_settings_are_refused_when_the_module_is_made(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"^packing=True is not supported for preference pairs: .*, in --data\.packing"
    ):
        Preferences(json_path=write(tmp_path / "d.jsonl", [numbered(0)]), packing=True)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl does not exist, in --data\.json_path; "):
        Preferences(json_path=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="val_split_fraction"):
        Preferences(json_path=tmp_path / "d.jsonl", val_split_fraction=1.0)
    with pytest.raises(ValueError, match=r"^Preferences needs json_path, in --data\.json_path"):
        Preferences().prepare_data()


# ---------------------------------------------------------------- truncation


def test_truncation_cuts_both_sides_alike_and_drops_a_pair_left_without_targets(tmp_path: Path, tok_dir: Path):
    long_replies = numbered(1, reply_words=80)
    short_and_long = {"prompt": "Say ok 2", "chosen": "ok", "rejected": " ".join(["no"] * 80)}
    long_prompt = {"prompt": "Say ok " * 80, "chosen": "ok", "rejected": "no"}
    path = write(tmp_path / "d.jsonl", [numbered(0), long_replies, short_and_long, long_prompt, numbered(4)])
    whole = setup(path, tok_dir, max_seq_length=4096)
    assert whole.stats["train"] == {"pairs": 5, "truncated": 0, "dropped": 0}
    lengths = [len(e.ids) for e in whole.examples("train")]
    limit = lengths[0] + 6  # the short pairs fit, the long replies do not, the long prompt fills everything
    assert lengths[0] <= limit + 1 < min(lengths[2], lengths[3], lengths[5]) and lengths[4] <= limit + 1

    data = setup(path, tok_dir, max_seq_length=limit)
    assert data.stats["train"] == {"pairs": 4, "truncated": 2, "dropped": 1}
    assert "train 4 pairs (2 truncated, 1 dropped)" in data.summary()
    examples = data.examples("train")
    assert len(examples) == 8
    cut_c, cut_r = examples[2], examples[3]  # both replies too long: both cut at max_seq_length + 1 tokens
    assert len(cut_c.ids) == len(cut_r.ids) == limit + 1
    prompt = int(np.argmax(cut_c.trained))
    assert prompt == int(np.argmax(cut_r.trained)) and cut_c.ids[:prompt].tolist() == cut_r.ids[:prompt].tolist()
    for k in (2, 3):  # a cut side is its whole example's first max_seq_length + 1 tokens
        assert examples[k].ids.tolist() == whole.examples("train")[k].ids[: limit + 1].tolist()
    # one side fits, the other is cut by the same rule
    assert examples[4].ids.tolist() == whole.examples("train")[4].ids.tolist()
    assert examples[5].ids.tolist() == whole.examples("train")[5].ids[: limit + 1].tolist()
    assert all(e.trained[1:].any() for e in examples)  # never a side without targets
    # the pair with the long prompt is gone, and the pairs after it keep their sides together
    assert examples[6].ids.tolist() == whole.examples("train")[8].ids.tolist()
    assert examples[7].ids.tolist() == whole.examples("train")[9].ids.tolist()
    with pytest.raises(ValueError, match=r"^no training pair fits max_seq_length=4: all 5 lose every reply token"):
        setup(path, tok_dir, max_seq_length=4)


def test_a_pair_is_dropped_when_either_side_alone_loses_its_targets(
    tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """With a shared prompt both sides usually lose their targets together; a pair whose one side alone is left
    without targets (as the tokenizer reports it) is dropped whole, so the examples stay [chosen, rejected]."""
    import litliger.data.preferences as preferences

    real = preferences.encode

    def rejected_of_pair_1_lost(records, *args, **kwargs):
        out = real(records, *args, **kwargs)
        if records:  # the chosen sides, then the rejected sides (the val split has none)
            out[len(records) // 2 + 1] = (None, True)
        return out

    path = write(tmp_path / "d.jsonl", [numbered(i) for i in range(3)])
    whole = setup(path, tok_dir).examples("train")
    monkeypatch.setattr(preferences, "encode", rejected_of_pair_1_lost)
    data = setup(path, tok_dir)
    assert data.stats["train"] == {"pairs": 2, "truncated": 0, "dropped": 1}
    kept = [e.ids.tolist() for e in data.examples("train")]
    assert kept == [e.ids.tolist() for e in (whole[0], whole[1], whole[4], whole[5])]


# ---------------------------------------------------------------- the pair loader


def pair_data(tmp_path: Path, tok_dir: Path, n: int = 11, **kw) -> Preferences:
    records = [numbered(i, reply_words=1 + i % 4) for i in range(n)]
    return setup(write(tmp_path / "pairs.jsonl", records), tok_dir, **kw)


def test_batches_hold_the_chosen_rows_then_the_rejected_rows(tmp_path: Path, tok_dir: Path) -> None:
    data = pair_data(tmp_path, tok_dir, batch_size=3)
    examples = data.examples("train")
    loader = data.train_dataloader()
    assert loader.pairs and loader.units == 11 and len(loader) == 3  # 11 pairs, 3 a batch, the rest dropped
    values = np.arange(22, dtype=np.float64).reshape(11, 2) * 0.5 - 7  # (pairs, 2): chosen, rejected
    seen = []
    for with_values in (False, True):
        loader.pair_values = values if with_values else None
        for batch in loader:
            pairs = batch["pair_index"]
            assert pairs.dtype == torch.int64 and pairs.shape == (3,)
            inputs, targets = batch["input_ids"], batch["targets"]
            assert inputs.shape[0] == targets.shape[0] == 6 and inputs.shape == targets.shape
            for row in range(6):
                side = row // 3  # rows 0..2 chosen, 3..5 rejected, of the same pairs in the same order
                e = examples[2 * int(pairs[row % 3]) + side]
                n = len(e.ids) - 1
                assert inputs[row, :n].tolist() == e.ids[:-1].tolist()
                assert targets[row, :n].tolist() == np.where(e.trained[1:], e.ids[1:], -100).tolist()
                assert (targets[row, n:] == -100).all()
            if with_values:
                ref = batch["ref_logps"]
                assert ref.dtype == torch.float64
                assert ref.tolist() == [*values[pairs.numpy(), 0], *values[pairs.numpy(), 1]]
            else:
                assert "ref_logps" not in batch
            seen += pairs.tolist()
    assert len(set(seen[:9])) == 9  # an epoch deals out distinct pairs
    assert sorted(seen[:9]) != sorted(seen[9:]) or seen[:9] != seen[9:]  # and reshuffles the next

    val = pair_data(tmp_path, tok_dir, batch_size=3, val_split_fraction=0.4, seed=1).val_dataloader()
    assert val is not None and val.pairs
    order = [i for batch in val for i in batch["pair_index"].tolist()]
    assert order == list(range(val.units)) and val.units >= 4  # every pair, in order; the last batch smaller

    with pytest.raises(ValueError, match="pairs=True deals out"):
        ExampleLoader(examples[:3], 1, 0, pairs=True)


def test_pair_loader_resumes_exactly(tmp_path: Path, tok_dir: Path) -> None:
    data = pair_data(tmp_path, tok_dir, batch_size=2)
    examples = data.examples("train")
    values = np.random.default_rng(0).normal(size=(len(examples) // 2, 2))

    def make() -> ExampleLoader:
        loader = ExampleLoader(examples, 2, 0, seed=5, rank=0, world_size=1, pairs=True)
        loader.pair_values = values
        return loader

    def walk(steps: int, cuts: frozenset = frozenset()) -> list[dict]:
        loader = make()
        batches = infinite_batches(loader)
        out = []
        for step in range(steps):
            if step in cuts:
                batches.close()
                state = json.loads(json.dumps(loader.state_dict()))
                loader = make()
                loader.load_state_dict(state)
                batches = infinite_batches(loader)
            out.append(next(batches))
        return out

    e = len(make())
    assert e == 5
    straight = walk(2 * e + 2)
    for cuts in [{1}, {e - 1}, {e}, {e + 1}, {2, e + 3}]:
        resumed = walk(2 * e + 2, frozenset(cuts))
        for a, b in zip(straight, resumed, strict=True):
            assert a.keys() == b.keys() == {"input_ids", "targets", "pair_index", "ref_logps"}
            assert all(torch.equal(a[k], b[k]) for k in a), cuts
    assert make().fingerprint == data.fingerprint("train")
    other = [Example(e.ids[::-1].copy(), e.trained) for e in examples]
    assert ExampleLoader(other, 2, 0, pairs=True, rank=0, world_size=1).fingerprint != data.fingerprint("train")


# ---------------------------------------------------------------- the embedded set's pairs


def test_stdlib_pairs_reject_another_function_or_the_reversed_body_in_turn() -> None:
    def function(name: str, body_lines: int) -> str:
        return "\n".join([f"def {name}(x):", *[f"    x = x + {i}" for i in range(body_lines - 1)], "    return x"])

    records = [
        {"file": "a.py", "output": function("f", 4)},  # 0: another function of a.py
        {"file": "a.py", "output": function("g", 5)},  # 1: its reversed body
        {"file": "a.py", "output": function("h", 2)},  # 2: another function of a.py (g is closest in length)
        {"file": "b.py", "output": function("k", 3)},  # 3: the reversed body (b.py has no other function)
        {"file": "c.py", "output": function("m", 3)},  # 4: no other function: the reversed body instead
        {"file": "d.py", "output": function("n", 2)},  # 5: neither: no pair
        {"file": "a.py", "output": function("p", 2)},  # 6: too short to reverse: another function
    ]
    for i, r in enumerate(records):
        r["instruction"] = f"Write {i}."

    def reversed_body(source: str) -> str:
        first, *body = source.split("\n")
        return "\n".join([first, *body[::-1]])

    pairs = stdlib_pairs(records)
    assert [p["prompt"] for p in pairs] == [f"Write {i}." for i in (0, 1, 2, 3, 4, 6)]
    by_prompt = {p["prompt"]: p for p in pairs}
    for i, p in enumerate(pairs):
        assert p["chosen"] == records[int(p["prompt"].split()[1][:-1])]["output"] and p["rejected"] != p["chosen"], i
        assert set(p) == {"prompt", "chosen", "rejected", "file"}
    f, g, h, k, m, q = (records[i]["output"] for i in (0, 1, 2, 3, 4, 6))
    assert by_prompt["Write 0."]["rejected"] == g and abs(len(g) - len(f)) < abs(len(h) - len(f))  # the closest
    assert by_prompt["Write 1."]["rejected"] == reversed_body(g)
    assert by_prompt["Write 2."]["rejected"] == q  # p: as long as h
    assert by_prompt["Write 3."]["rejected"] == reversed_body(k)
    assert by_prompt["Write 4."]["rejected"] == reversed_body(m)
    assert by_prompt["Write 6."]["rejected"] == h
    for p in pairs:  # every pair is a valid record
        assert to_pair(p) == (
            [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}],
            [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["rejected"]}],
        )
