"""Instruction data: records, prompt styles (vs transformers), masking, BOS/EOS, limits, the loader, docstrings."""

import ast
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from litliger.data import Instructions, PromptStyle, PythonDocstrings, Tokenizer, infinite_batches, resolve_prompt_style
from litliger.data.example_loader import Example, ExampleLoader
from litliger.data.instructions import read_records, to_messages
from litliger.data.prompts import Alpaca

SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
# Mistral-like: emits bos_token itself, refuses non-alternating roles, ends replies with eos_token.
WITH_BOS = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# A `{% generation %}` block (transformers' assistant-mask marker) and the tojson filter on non-ASCII text.
GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m.content | tojson }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": 'And 3 + 3? <tag> & "quotes" é'},
    {"role": "assistant", "content": "6."},
]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def backend() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [json.dumps(CHAT), Alpaca.WITH_INPUT, Alpaca.WITHOUT_INPUT, "def add(a, b):\n    return a + b\n"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text, trainer)
    return tok


def tokenizer_dir(root: Path, backend: HFTokenizer, template: str | list | None, add_bos: bool, **config) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    backend.save(str(root / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", **config}
    config["add_bos_token"] = add_bos
    if template is not None:
        config["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


def write_records(path: Path, records: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


def alpaca(i: int, words: int = 3) -> dict:
    return {"instruction": f"Repeat {i}", "input": "" if i % 2 else f"x{i}", "output": " ".join(["ok"] * words)}


def setup_data(path: Path, tok: Tokenizer, batch_size: int = 2, max_seq_length: int = 256, **kw) -> Instructions:
    data = Instructions(path, **kw)
    data.connect(tok, batch_size, max_seq_length)
    data.prepare_data()
    data.setup()
    return data


# ---------------------------------------------------------------- records


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_alpaca_and_chat_records_parse(tmp_path: Path, backend: HFTokenizer, suffix: str) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "tok", backend, CHATML, add_bos=False))
    records = [alpaca(0), alpaca(1), {"messages": CHAT}, {"messages": CHAT[1:3], "extra": 1}]
    data = Instructions(write_records(tmp_path / f"d{suffix}", records), val_split_fraction=0.0)
    data.select_prompt_style(tmp_path / "tok")
    data.connect(tok, 1, 256)
    data.setup()
    assert data.stats["train"] == {"examples": 4, "truncated": 0, "dropped": 0}
    assert data.stats["val"] == {"examples": 0, "truncated": 0, "dropped": 0} and data.val_dataloader() is None
    texts = [tok.decode(e.ids.tolist()) for e in data.examples("train")]
    assert "<|im_start|>user\nRepeat 0\n\nx0<|im_end|>" in texts[0]  # the input joins the instruction
    assert texts[1].endswith("<|im_start|>user\nRepeat 1<|im_end|>\n<|im_start|>assistant\nok ok ok<|im_end|>\n")
    assert texts[2] == data.style.render(CHAT, add_generation_prompt=False)
    assert texts[3] == data.style.render(CHAT[1:3], add_generation_prompt=False)  # extra keys are ignored
    assert data.training_files() == [tmp_path / f"d{suffix}"]


@pytest.mark.parametrize(
    ("suffix", "content", "match"),
    [
        (".jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a" "output"}\n', r"invalid JSON .*l:3;"),
        (".jsonl", '{"instruction": "a"}\n', r"missing field 'output', in .*d\.jsonl:1; give"),
        (".jsonl", '{"instruction": "a", "output": 3}\n', r"field 'output' is a int, not a string, in .*d\.jsonl:1;"),
        (".jsonl", '{"messages": [{"role": "bot", "content": "x"}]}\n', r"unknown role 'bot', in .*d\.jsonl:1; use"),
        (".jsonl", '{"messages": [{"role": "user", "content": 1}]}\n', r"has a int 'content', in .*d\.jsonl:1;"),
        (".jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', r"no assistant message, in .*d\.jsonl:1;"),
        (".jsonl", "[1, 2]\n", r"the record is a list, not an object, in .*d\.jsonl:1;"),
        (".json", '[{"instruction": "a", "output": "b"}, {"output": "b"}]', r"field 'instruction', in .*\[1\];"),
        (".json", '{"instruction": "a", "output": "b"}', r"the top level is a dict, not a list, in .*d\.json;"),
        (".json", '[{"instruction": "a",\n "output": }]', r"invalid JSON .*d\.json:2;"),
        (".json", "[]", r"no records in .*d\.json;"),
        (".txt", "hello", r"neither \.json nor \.jsonl"),
    ],
)  # fmt: skip
def test_malformed_records_name_file_and_line(tmp_path: Path, suffix: str, content: str, match: str) -> None:
    (tmp_path / f"d{suffix}").write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        read_records(tmp_path / f"d{suffix}")
    assert "\n" not in str(info.value)  # one line


def test_missing_file_and_bad_settings(tmp_path: Path, backend: HFTokenizer) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "tok", backend, None, add_bos=False))
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl does not exist, in --data\.json_path"):
        Instructions(tmp_path / "missing.jsonl")  # refused when the command is parsed, before any work
    (tmp_path / "x.json").write_text("[]")
    assert tok.vocab_size > 0
    with pytest.raises(ValueError, match="val_split_fraction"):
        Instructions(tmp_path / "x.json", val_split_fraction=1.0)
    with pytest.raises(ValueError, match="Unknown prompt_style 'llama'"):
        Instructions(tmp_path / "x.json", prompt_style="llama")
    with pytest.raises(RuntimeError, match="setup"):
        Instructions(tmp_path / "x.json").train_dataloader()


def test_alpaca_style_refuses_conversations(tmp_path: Path, backend: HFTokenizer) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "tok", backend, None, add_bos=False))
    path = write_records(tmp_path / "d.jsonl", [alpaca(0), {"messages": CHAT[1:3]}, {"messages": CHAT}])
    with pytest.raises(ValueError, match=r"one user and one assistant message, in .*d\.jsonl:3; use a tokenizer with"):
        setup_data(path, tok, val_split_fraction=0.0)
    with pytest.raises(ValueError, match="single user message"):
        Alpaca().render_prompt(CHAT[1:3])


# ---------------------------------------------------------------- prompt styles


@pytest.mark.parametrize("template", [CHATML, WITH_BOS, GENERATION, "jinja file", "named"])
def test_chat_template_renders_like_transformers(tmp_path: Path, backend: HFTokenizer, template: str) -> None:
    from transformers import PreTrainedTokenizerFast

    folder, extra = tmp_path / "tok", {"pad_token": "<|endoftext|>"}
    if template == "jinja file":  # chat_template.jinja wins over the config's template, as in transformers
        (folder / "chat_template.jinja").parent.mkdir()
        (folder / "chat_template.jinja").write_text(CHATML)
        tokenizer_dir(folder, backend, "{{ 'not this one' }}", add_bos=False, **extra)
        template = CHATML
    elif template == "named":  # a list of named templates: "default" is the one
        named = [{"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": GENERATION}]
        tokenizer_dir(folder, backend, named, add_bos=False, **extra)
        template = GENERATION
    else:
        tokenizer_dir(folder, backend, template, add_bos=False, **extra)
    hf = PreTrainedTokenizerFast.from_pretrained(str(folder))
    style = resolve_prompt_style(folder, None)
    assert style.name == "chat_template" and style.template == template
    restored = PromptStyle.from_dict(json.loads(json.dumps(style.to_dict())))  # as finetune.yaml keeps it
    convs = [CHAT[1:2], CHAT[1:3], CHAT[1:4], CHAT[1:]] if template == WITH_BOS else [CHAT[:2], CHAT, CHAT[1:4]]
    for conv in convs:
        for gen in (False, True):
            expected = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert style.render(conv, add_generation_prompt=gen) == expected
            assert restored.render(conv, add_generation_prompt=gen) == expected
        assert restored.render_prompt(conv) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def test_style_resolution_and_stop_text(tmp_path: Path, backend: HFTokenizer) -> None:
    plain = tokenizer_dir(tmp_path / "plain", backend, None, add_bos=False)
    chatml = tokenizer_dir(tmp_path / "chatml", backend, CHATML, add_bos=False)
    assert resolve_prompt_style(chatml, None).name == "chat_template"
    assert resolve_prompt_style(chatml, "alpaca").name == "alpaca"  # explicit wins
    assert resolve_prompt_style(plain, None).name == "alpaca" and resolve_prompt_style(None, None).name == "alpaca"
    with pytest.raises(ValueError, match="has no chat template .*; use prompt_style=alpaca"):
        resolve_prompt_style(plain, "chat_template")
    with pytest.raises(ValueError, match="Unknown prompt_style 'chatml'"):
        resolve_prompt_style(chatml, "chatml")
    assert resolve_prompt_style(chatml, None).stop_text() == "<|im_end|>"
    bos = tokenizer_dir(tmp_path / "bos", backend, WITH_BOS, add_bos=True)
    assert resolve_prompt_style(bos, None).stop_text() == "</s>" and Alpaca().stop_text() is None
    assert PromptStyle.from_dict(Alpaca().to_dict()).render_prompt(CHAT[1:2]) == Alpaca().render_prompt(CHAT[1:2])
    with pytest.raises(ValueError, match=r"refused the conversation \(Conversation roles must alternate"):
        resolve_prompt_style(bos, None).segments(CHAT)  # its system message breaks the alternation
    broken = tokenizer_dir(tmp_path / "broken", backend, "{% if %}", add_bos=False)
    with pytest.raises(ValueError, match="is not valid Jinja"):
        resolve_prompt_style(broken, None).render_prompt(CHAT[1:2])


# ---------------------------------------------------------------- tokenization


def test_prompt_is_masked_and_response_targets_are_the_next_tokens(tmp_path: Path, backend: HFTokenizer) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "tok", backend, None, add_bos=True))
    records = [alpaca(i, words=1 + i) for i in range(6)]
    data = setup_data(write_records(tmp_path / "d.jsonl", records), tok, batch_size=3, val_split_fraction=0.0)
    for r, example in zip(records, data.examples("train"), strict=True):
        prompt = [tok.bos_id, *tok.encode(Alpaca().render_prompt(to_messages(r)[:1]), bos=False)]
        response = [*tok.encode(r["output"], bos=False), tok.eos_id]  # EOS ends the response...
        assert example.ids.tolist() == prompt + response  # ...and BOS starts the prompt, once
        assert example.trained.tolist() == [False] * len(prompt) + [True] * len(response)  # ...and is trained

    widths = []
    for batch in data.train_dataloader():
        inputs, targets = batch["input_ids"], batch["targets"]
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == targets.shape
        widths.append(inputs.shape[1])
        for row in range(len(inputs)):
            trained = (targets[row] != -100).nonzero().flatten()
            n = int(trained[-1]) + 1  # the example's length: its last target is the EOS
            assert targets[row, n - 1] == tok.eos_id and (targets[row, n:] == -100).all()
            assert (inputs[row, n:] == tok.eos_id).all()  # padding
            assert torch.equal(targets[row, trained[:-1]], inputs[row, trained[:-1] + 1])  # the next tokens
            (example,) = [e for e in data.examples("train") if e.ids[:-1].tolist() == inputs[row, :n].tolist()]
            assert len(trained) == int(example.trained.sum())  # exactly the response is trained
    lengths = sorted(len(e.ids) - 1 for e in data.examples("train"))
    assert sorted(widths) != [lengths[-1]] * len(widths) and max(widths) == lengths[-1]  # padded per batch

    unmasked = setup_data(write_records(tmp_path / "d.jsonl", records), tok, val_split_fraction=0.0, mask_prompt=False)
    assert all(e.trained[1:].all() for e in unmasked.examples("train"))


@pytest.mark.parametrize("template", [CHATML, WITH_BOS])
def test_chat_template_examples_train_every_assistant_turn(tmp_path: Path, backend: HFTokenizer, template: str) -> None:
    add_bos = template == WITH_BOS  # the template writes BOS itself: it must not be doubled
    folder = tokenizer_dir(tmp_path / "tok", backend, template, add_bos=add_bos)
    tok = Tokenizer.from_dir(folder)
    conv = CHAT if template == CHATML else CHAT[1:]
    data = Instructions(write_records(tmp_path / "d.json", [{"messages": conv}]), val_split_fraction=0.0)
    style = data.select_prompt_style(folder)
    data.connect(tok, 1, 512)
    data.setup()
    (example,) = data.examples("train")
    ids, trained = example.ids.tolist(), example.trained.tolist()
    assert tok.decode(ids) == style.render(conv, add_generation_prompt=False)  # nothing added, nothing lost
    assert ids.count(tok.bos_id) == int(add_bos) and (ids[0] == tok.bos_id) == add_bos
    spans, current = [], []  # the trained stretches of ids
    for i, t in zip([*ids, -1], [*trained, False], strict=True):
        if t:
            current.append(i)
        elif current:
            spans, current = [*spans, current], []
    replies = [m["content"] for m in conv if m["role"] == "assistant"]
    if template == CHATML:  # each reply with the end-of-turn text after it; no EOS id of its own
        assert [tok.decode(s) for s in spans] == [r + "<|im_end|>\n" for r in replies]
    else:
        assert [tok.decode(s) for s in spans] == [" " + r + "</s>" for r in replies]


def test_templates_that_rewrite_history_train_the_last_turn_and_inconsistent_ones_fail(
    tmp_path: Path, backend: HFTokenizer
) -> None:
    # Earlier replies are shortened once the conversation goes on (as templates that drop past reasoning do).
    forgetful = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}..."
        "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    style = resolve_prompt_style(tokenizer_dir(tmp_path / "a", backend, forgetful, add_bos=False), None)
    segments = style.segments(CHAT)
    assert "".join(s.text for s in segments) == style.render(CHAT, add_generation_prompt=False)
    assert [s.text for s in segments if s.trained] == ["6.<|im_end|>\n"]  # the last reply only

    renamed = forgetful.replace(
        "<|im_start|>{{ m.role }}", "<|im_start|>{{ 'bot' if m.role == 'assistant' else m.role }}"
    )
    style = resolve_prompt_style(tokenizer_dir(tmp_path / "b", backend, renamed, add_bos=False), None)
    with pytest.raises(ValueError, match=r"chat template of .*b/tokenizer_config.json renders a conversation that"):
        style.segments(CHAT)


def test_bos_only_when_the_tokenizer_adds_one(tmp_path: Path, backend: HFTokenizer) -> None:
    path = write_records(tmp_path / "d.jsonl", [alpaca(1)])
    for add_bos in (True, False):
        tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / f"t{add_bos}", backend, None, add_bos=add_bos))
        (example,) = setup_data(path, tok, val_split_fraction=0.0).examples("train")
        ids = example.ids.tolist()
        assert ids.count(tok.bos_id) == int(add_bos) and (ids[0] == tok.bos_id) == add_bos
        prompt_ids = Alpaca().encode_prompt(tok, to_messages(alpaca(1))[:1])
        assert ids[: len(prompt_ids)] == prompt_ids and len(prompt_ids) < len(ids)  # generate sees training's prompt


def test_truncation_drops_and_no_example_fits(tmp_path: Path, backend: HFTokenizer) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "tok", backend, None, add_bos=False))
    short, long_output = alpaca(1, words=2), alpaca(3, words=80)
    long_prompt = {"instruction": "Repeat " * 60, "output": "ok"}
    path = write_records(tmp_path / "d.json", [short, long_output, long_prompt, short])
    n_short = len(tok.encode(Alpaca().render_prompt(to_messages(short)[:1]) + "ok ok")) + 1
    data = setup_data(path, tok, max_seq_length=n_short + 10, val_split_fraction=0.0)
    assert data.stats["train"] == {"examples": 3, "truncated": 1, "dropped": 1}
    examples = data.examples("train")
    assert [len(e.ids) for e in examples] == [n_short, n_short + 11, n_short]  # cut to max_seq_length + 1
    assert all(e.trained[1:].any() for e in examples)  # never an example without targets
    assert "train 3 (1 truncated, 1 dropped)" in data.summary() and "\n" not in data.summary()
    with pytest.raises(ValueError, match=r"no example fits max_seq_length=8: .*; raise --train.max_seq_length"):
        setup_data(path, tok, max_seq_length=8, val_split_fraction=0.0)


def test_split_is_deterministic_by_seed_and_keeps_groups(tmp_path: Path, backend: HFTokenizer) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "tok", backend, None, add_bos=False))
    records = [{**alpaca(i), "source": f"s{i // 3}"} for i in range(30)]
    path = write_records(tmp_path / "d.jsonl", records)

    def val(**kw) -> list[str]:
        return [r.where for r in setup_data(path, tok, **kw).records["val"]]

    assert val(seed=1) == val(seed=1) and val(seed=1) != val(seed=2)
    assert len(val(val_split_fraction=0.1)) == 3 and len(val(val_split_fraction=0.001)) == 1
    grouped = setup_data(path, tok, val_split_fraction=0.2, group_by="source").records
    assert len(grouped["val"]) == 6  # two whole groups of three
    assert not {r.group for r in grouped["val"]} & {r.group for r in grouped["train"]}
    data = setup_data(write_records(tmp_path / "two.jsonl", records[:2]), tok, batch_size=1, val_split_fraction=0.01)
    assert data.stats["train"]["examples"] == data.stats["val"]["examples"] == 1  # >= 1 val example from two
    first, again = list(data.val_dataloader()), list(data.val_dataloader())
    assert len(first) == 1 and torch.equal(first[0]["input_ids"], again[0]["input_ids"])


# ---------------------------------------------------------------- loader


def synthetic(n: int, seed: int = 0) -> list[Example]:
    """`n` examples of random lengths whose first id is their index."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 12))
        ids = np.concatenate([[i], rng.integers(1, 50, length - 1)]).astype(np.int32)
        out.append(Example(ids, np.arange(length) >= length // 2))
    return out


def names(batches: list[dict]) -> list[int]:
    return [int(i) for b in batches for i in b["input_ids"][:, 0]]


def test_ranks_get_equal_disjoint_strided_shares() -> None:
    examples = synthetic(23)
    loaders = [ExampleLoader(examples, 2, pad_id=0, seed=5, rank=r, world_size=3) for r in range(3)]
    assert [len(x) for x in loaders] == [3, 3, 3]  # 23 // 3 = 7 per rank -> 3 full batches of 2
    for epoch in (1, 2):
        shares = [names(list(x)) for x in loaders]
        order = np.random.default_rng([5, epoch]).permutation(23)[:18]
        assert sorted(sum(shares, [])) == sorted(order.tolist())  # disjoint: the epoch minus its remainder
        assert all(shares[r] == order[r::3].tolist() for r in range(3))
    val = [ExampleLoader(examples, 3, 0, shuffle=False, drop_last=False, rank=r, world_size=3) for r in range(3)]
    assert [len(x) for x in val] == [3, 3, 3]  # 7 each: the last batch holds one
    assert sorted(sum((names(list(x)) for x in val), [])) == list(range(21))
    assert [len(b["input_ids"]) for b in ExampleLoader(examples, 3, 0, shuffle=False, drop_last=False)] == [3] * 7 + [2]


def test_batches_pad_inputs_and_mask_padded_targets() -> None:
    examples = synthetic(4)
    (batch,) = list(ExampleLoader(examples, 4, pad_id=7, shuffle=False, drop_last=False))
    width = max(len(e.ids) for e in examples) - 1
    assert batch["input_ids"].shape == batch["targets"].shape == (4, width)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        assert batch["input_ids"][row, :n].tolist() == e.ids[:-1].tolist()
        assert batch["targets"][row, :n].tolist() == np.where(e.trained[1:], e.ids[1:], -100).tolist()
        assert (batch["input_ids"][row, n:] == 7).all() and (batch["targets"][row, n:] == -100).all()


def run(make, steps: int, cuts: frozenset = frozenset()) -> list[dict]:
    """`steps` batches through infinite_batches, rebuilding the loader from a JSON round-tripped state at each
    cut, twice (a state saved right after a resume must resume the same)."""
    loader = make()
    batches = infinite_batches(loader)
    out = []
    for step in range(steps):
        if step in cuts:
            batches.close()
            for _ in range(2):
                state = json.loads(json.dumps(loader.state_dict()))
                loader = make()
                loader.load_state_dict(state)
            batches = infinite_batches(loader)
        out.append(next(batches))
    return out


def test_exact_resume_mid_epoch_at_epoch_end_and_across_epochs() -> None:
    examples = synthetic(21)

    def make() -> ExampleLoader:
        return ExampleLoader(examples, 3, pad_id=0, seed=3, rank=1, world_size=2)

    e = len(make())
    assert e == 3
    steps = 3 * e + 2
    straight = run(make, steps)
    assert names(straight[:e]) != names(straight[e : 2 * e])  # reshuffled every epoch...
    assert sorted(names(straight[:e])) != sorted(names(straight[e : 2 * e]))  # ...with a different remainder
    for cuts in [{c} for c in range(steps)] + [{1, e, e + 1}, {e - 1, 2 * e, 2 * e + 1}]:
        resumed = run(make, steps, frozenset(cuts))
        for a, b in zip(straight, resumed, strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"]), cuts

    loader = make()
    batches = iter(loader)
    for _ in range(e):
        next(batches)
    assert (loader.state_dict()["epoch"], loader.state_dict()["batches_in_epoch"]) == (1, e)  # an epoch's end
    start_of_second = make()
    start_of_second.load_state_dict({**loader.state_dict(), "epoch": 2, "batches_in_epoch": 0})
    assert start_of_second.state_dict()["epoch"] == 2 and names(list(start_of_second)) == names(straight[e : 2 * e])


def test_bad_resume_is_refused() -> None:
    examples = synthetic(12)
    loader = ExampleLoader(examples, 2, 0, seed=1, rank=0, world_size=2)
    next(iter(loader))
    state = loader.state_dict()
    assert set(state) == {"version", "epoch", "batches_in_epoch", "batch_size", "world_size", "seed", "fingerprint"}
    with pytest.raises(ValueError, match="batch_size=2, this run 3. Resume with batch_size=2"):
        ExampleLoader(examples, 3, 0, seed=1, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size=2, this run 1. Resume with world_size=2"):
        ExampleLoader(examples, 2, 0, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="Not a litliger example-loader state"):
        loader.load_state_dict({"epoch": 1})
    with pytest.warns(UserWarning, match="changed seed"):
        ExampleLoader(examples, 2, 0, seed=2, rank=0, world_size=2).load_state_dict(state)
    with pytest.warns(UserWarning, match="changed training data"):
        ExampleLoader(synthetic(12, seed=9), 2, 0, seed=1, rank=0, world_size=2).load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ExampleLoader(examples, 2, 0, seed=1, rank=0, world_size=2).load_state_dict(state)


def test_instructions_loaders_count_and_refuse_too_little_data(tmp_path: Path, backend: HFTokenizer) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "tok", backend, None, add_bos=False))
    path = write_records(tmp_path / "d.jsonl", [alpaca(i) for i in range(11)])
    data = setup_data(path, tok, batch_size=4, val_split_fraction=0.1)
    assert data.stats["train"]["examples"] == 10 and len(data.train_dataloader()) == 2  # the remainder is dropped
    assert len(list(data.train_dataloader())) == 2 and len(list(data.val_dataloader())) == 1
    with pytest.raises(ValueError, match="no full batch of 16"):
        setup_data(path, tok, batch_size=16).train_dataloader()


# ---------------------------------------------------------------- the embedded set


def test_python_docstrings(tmp_path: Path, backend: HFTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    import litliger.data.docstrings as docstrings

    path = PythonDocstrings(max_examples=150).source()
    again = PythonDocstrings(max_examples=150, cache_dir=tmp_path / "other").source()
    assert path != again and path.read_text() == again.read_text()  # two builds, the same records
    monkeypatch.setattr(docstrings, "file_records", lambda *a: pytest.fail("rebuilt a cached entry"))
    assert PythonDocstrings(max_examples=150).source() == path  # cached: the second run parses nothing

    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 150
    for r in records:
        assert r["instruction"].startswith("Write the Python ") and len(r["output"]) <= 500
        (fn,) = ast.parse(r["output"]).body  # every response is valid Python: one def, without its docstring
        assert isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and ast.get_docstring(fn) is None
        assert f"`{fn.name}(" in r["instruction"]

    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "tok", backend, None, add_bos=False))
    data = PythonDocstrings(max_examples=150, val_split_fraction=0.2)
    data.connect(tok, 2, 256)
    data.prepare_data()
    data.setup()
    train, val = ({r.group for r in data.records[s]} for s in ("train", "val"))
    assert data.stats["train"]["examples"] > 50 and data.stats["val"]["examples"] > 0
    assert val and not train & val  # split by file
    assert all(f.is_file() and f.suffix == ".py" for f in data.training_files())
    assert len(data.training_files()) == len(train | val)
