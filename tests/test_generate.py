"""Decoding with the KV cache: greedy tokens identical to transformers' ``generate`` for every family, cached
logits equal to the uncached forward at every position, left-padded batches equal to their rows alone,
stop tokens, streaming, the cache's lifetime, a finetune step folder, and ``litliger generate``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  (a test dependency, pyproject's test extra: missing, this module fails)
from test_convert import hf_model
from test_finetune import gpt2_config, make_base, run, tiny_config, write_instructions

from litliger import GPT
from litliger.cli import main as cli_main
from litliger.convert import convert_from_hf
from litliger.inference.generate import generate, generate_tokens, left_pad_prompts

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gpt_neox", "gpt2"]  # mistral: sliding window 4
PROMPT, NEW = 10, 44  # 10 + 44 tokens fit the tiny models' 64 positions; Mistral's prompt is longer than its window


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    """(family, transformers model, the same weights as a litliger model from its converted folder)."""
    root = tmp_path_factory.mktemp(request.param)
    hf = hf_model(request.param)
    with torch.no_grad():  # large random biases (final norm's) add the same logits everywhere: greedy repeats
        for name, p in hf.named_parameters():  # one token. Small ones leave continuations that vary.
            if name.endswith("bias"):
                p.mul_(0.1)
    hf.save_pretrained(root / "hf")
    convert_from_hf(root / "hf", root / "lit")
    return request.param, hf, GPT.from_checkpoint(root / "lit").eval()


def prompts(n: int = 2, T: int = PROMPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed))


def test_greedy_is_token_identical_to_transformers(converted):
    family, hf, ours = converted
    idx = prompts(4)
    with torch.no_grad():
        expected = hf.generate(
            idx, attention_mask=torch.ones_like(idx), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
    out = generate(ours, idx, NEW, temperature=0)
    assert out.shape == expected.shape == (4, PROMPT + NEW)
    assert torch.equal(out, expected), (out[:, PROMPT:] != expected[:, PROMPT:]).nonzero()[:5].tolist()
    assert len(set(out[:, PROMPT:].flatten().tolist())) >= 10  # real continuations, not one token repeated
    assert ours.kv_cache_length is None  # generate freed its cache


def cached_logits(model: GPT, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of ``idx`` fed through the cache in chunks of the given sizes (then one token at a time)."""
    B, T = idx.shape
    model.set_kv_cache(B, T + 3)  # sized by the caller, not block_size
    out, pos = [], 0
    with torch.no_grad():
        for size in chunks + [1] * (T - sum(chunks)):
            out.append(model(idx[:, pos : pos + size], input_pos=pos))
            pos += size
    model.clear_kv_cache()
    return torch.cat(out, dim=1)


def test_cached_logits_equal_the_uncached_forward_at_every_position(converted):
    family, _, ours = converted
    idx = prompts(T=40)
    with torch.no_grad():
        full = ours(idx)
    # a prefill, a chunk after it (a chat turn: a causal block at an offset), then single tokens
    cached = cached_logits(ours, idx, [7, 6])
    # fp32 rounding only: ~1e-6 of the largest logit (Gemma, logits up to 8.5: 1.2e-5; transformers' own
    # cached-vs-uncached difference there is 1.05e-5)
    assert (cached - full).abs().max().item() < 3e-6 * full.abs().max().item()


def test_left_padded_rows_generate_what_they_generate_alone(converted):
    family, _, ours = converted
    rows = [prompts(1, T, seed=T)[0].tolist() for T in (3, 12, 7)]  # Mistral: shorter and longer than the window
    idx, mask = left_pad_prompts(rows, pad_id=5)
    batched = generate(ours, idx, 20, temperature=0, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = generate(ours, torch.tensor([row]), 20, temperature=0)
        assert batched[i, idx.shape[1] :].tolist() == alone[0, len(row) :].tolist(), (family, i)


def test_padding_never_changes_a_row_and_its_logits():
    torch.manual_seed(0)
    model = GPT(tiny_config(sliding_window=4)).eval()
    idx = torch.randint(0, 300, (2, 12))
    padded = torch.cat((torch.full((2, 5), 7), idx), dim=1)
    padded[0, :5] = idx[0, :5]  # row 0 is a longer prompt (no padding), row 1 is left-padded by 5
    left_pad = torch.tensor([0, 5])
    model.set_kv_cache(2, 20)
    with torch.no_grad():
        logits = model(padded, input_pos=0, left_pad=left_pad)
        alone = model(idx[1:])
    assert (logits[1, 5:] - alone[0]).abs().max().item() < 1e-5


def test_stop_tokens_end_a_row_and_pad_it():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 300, (2, 6))
    free = generate(model, idx, 12, temperature=0)[:, 6:]
    stop = free[0, 3].item()  # row 0's 4th token
    assert stop not in free[0, :3].tolist()
    out = generate(model, idx, 12, temperature=0, stop_ids=[stop], pad_id=-1)[:, 6:]
    assert out[0, :4].tolist() == free[0, :4].tolist() and set(out[0, 4:].tolist()) <= {-1}
    if stop not in free[1].tolist():  # the other row runs to the end (unless it stops too)
        assert out[1].tolist() == free[1].tolist()
    single = generate(model, idx[:1], 12, temperature=0, eos_id=stop)
    assert single.shape == (1, 6 + 4) and single[0, -1].item() == stop


def test_streaming_and_sampling_are_the_cached_decoding():
    torch.manual_seed(0)
    model = GPT(gpt2_config()).eval()
    idx = torch.randint(0, 300, (1, 5))
    streamed = list(generate_tokens(model, idx, 10, temperature=0))
    assert len(streamed) == 10 and all(t.shape == (1,) for t in streamed)
    assert torch.equal(torch.stack(streamed, 1), generate(model, idx, 10, temperature=0)[:, 5:])
    for kwargs in [dict(temperature=0), dict(temperature=1.3, top_k=20, top_p=0.9)]:
        a = generate(model, idx, 15, generator=torch.Generator().manual_seed(3), **kwargs)
        b = generate(model, idx, 15, generator=torch.Generator().manual_seed(3), kv_cache=False, **kwargs)
        assert torch.equal(a, b), kwargs


def test_the_cache_is_sized_by_the_caller_and_refuses_what_does_not_fit():
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=32)).eval()
    model.set_kv_cache(3, 10)
    cache = model.transformer.h[0].attn.kv_cache
    assert cache.k.shape == (3, 1, 10, 16) and cache.k.dtype == torch.float32  # GQA: only the 1 kv head
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        model(torch.zeros(3, 11, dtype=torch.long), input_pos=0)
    with pytest.raises(ValueError, match="exceeds the model's block_size=32"):
        model.set_kv_cache(1, 33)
    model.clear_kv_cache()
    assert model.kv_cache_length is None
    with pytest.raises(ValueError, match="needs a KV cache"):
        model(torch.zeros(1, 2, dtype=torch.long), input_pos=0)
    with pytest.raises(ValueError, match="the prompt has 33 tokens, more than the KV cache's max_seq_length=32"):
        generate(model, torch.zeros(1, 33, dtype=torch.long), 5)
    # generation ends when the cache is full: 30 + 3 new tokens (the last is never stored)
    assert generate(model, torch.zeros(1, 30, dtype=torch.long), 10, temperature=0).shape == (1, 33)


def test_training_is_untouched_by_a_cache():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 300, (2, 16))
    loss = model(idx[:, :-1], targets=idx[:, 1:])
    model.set_kv_cache(2, 16)
    assert torch.equal(model(idx[:, :-1], targets=idx[:, 1:]), loss)  # no input_pos: the cache is not used
    assert torch.equal(model.transformer.h[0].attn.kv_cache.k, torch.zeros_like(model.transformer.h[0].attn.kv_cache.k))
    assert not any("kv_cache" in name for name in model.state_dict())


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> tuple[Path, Path]:
    """(base checkpoint with a chat template, a LoRA finetune's step folder on it)."""
    root = tmp_path_factory.mktemp("finetuned")
    base = make_base(root, tiny_config())
    records = write_instructions(root / "records.jsonl")
    run(root / "ft", base, records, steps=2, save_interval=1)
    return base, root / "ft" / "step-00000001"


def test_a_finetune_step_folder_decodes_with_the_cache(finetuned):
    _, step = finetuned
    model = GPT.from_checkpoint(step).eval()
    assert model.transformer.h[0].attn.qkv.lora_a is not None  # unmerged adapters
    idx = prompts(T=30)
    with torch.no_grad():
        full = model(idx)
    assert (cached_logits(model, idx, [9]) - full).abs().max().item() < 1e-5
    cached = generate(model, idx[:, :8], 20, temperature=0)
    assert torch.equal(cached, generate(model, idx[:, :8], 20, temperature=0, kv_cache=False))


STATS = re.compile(
    r"^prompt tokens: (\d+) \| new tokens: (\d+) \| time to first token: [\d.]+ s \| decode: [\d.]+ tokens/s$"
)


def test_cli_generate_streams_text_and_ends_with_the_figures(finetuned, capsys):
    base, step = finetuned
    cli_main(["generate", str(base), "--prompt", "alpha beta", "--max_new_tokens", "12", "--temperature", "0",
              "--device", "cpu"])  # fmt: skip
    out, err = capsys.readouterr()
    assert out.startswith("alpha beta") and len(out) > len("alpha beta\n")
    stats = STATS.match(err.strip().splitlines()[-1])
    assert stats and int(stats[2]) == 12, err
    # a finetune step folder: the prompt is the user turn of its prompt style; the answer stops at its end of turn
    cli_main(["generate", str(step), "--prompt", "repeat alpha", "--max_new_tokens", "30", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert STATS.match(err.strip().splitlines()[-1]), err
    assert "<|endoftext|>" not in out
