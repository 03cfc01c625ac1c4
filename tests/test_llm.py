"""``litliger.LLM``: the Python API is the commands' own code. Greedy text equals ``generate``'s tokens, a stream
joins to the same text, stop strings cut as the OpenAI API does, ``chat`` equals ``respond``, the scores equal the
scoring functions, finetuning step folders load, and a stream closed early frees the KV cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_finetune import make_base, run, tiny_config, write_instructions

from litliger import GPT, LLM, generate
from litliger.data import Tokenizer
from litliger.inference.chat import chat_style
from litliger.inference.generate import prompt_ids, respond
from litliger.inference.scoring import continuation_logprob, rolling_logprob

PROMPT = "alpha beta gamma"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("llm"), tiny_config())


@pytest.fixture(scope="module")
def llm(base: Path) -> LLM:
    return LLM.load(base, device="cpu")


def greedy_text(checkpoint: Path, prompt: str, n: int) -> str:
    """``litliger generate``'s path, by hand: the model, the prompt's ids, greedy tokens, EOS not shown."""
    model, tok = GPT.from_checkpoint(checkpoint).eval(), Tokenizer.from_dir(checkpoint)
    ids = prompt_ids(tok, prompt)
    out = generate(model, torch.tensor([ids]), n, temperature=0.0, eos_id=tok.eos_id, vocab_size=tok.vocab_size)
    return tok.decode([t for t in out[0, len(ids) :].tolist() if t != tok.eos_id])


def test_greedy_generate_equals_the_decoding_loop_and_streams_the_same_text(base: Path, llm: LLM) -> None:
    text = llm.generate(PROMPT, max_new_tokens=12)
    assert text == greedy_text(base, PROMPT, 12) and text  # the new text only, not the prompt
    pieces = list(llm.generate(PROMPT, max_new_tokens=12, stream=True))
    assert len(pieces) > 1 and "".join(pieces) == text
    assert llm.model.kv_cache_length is None  # freed when the stream ended


def test_stop_strings_cut_the_text_before_them(llm: LLM) -> None:
    full = llm.generate(PROMPT, max_new_tokens=16)
    stop = full[len(full) // 2 : len(full) // 2 + 2]  # a string the greedy text holds
    expected = full[: full.index(stop)]
    assert llm.generate(PROMPT, max_new_tokens=16, stop=[stop]) == expected
    assert "".join(llm.generate(PROMPT, max_new_tokens=16, stop=[stop], stream=True)) == expected
    assert llm.generate(PROMPT, max_new_tokens=16, stop=["never appears \x00"]) == full


def test_sampling_is_reproducible_with_a_seed(llm: LLM) -> None:
    first = llm.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=7)
    assert llm.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=7) == first
    others = {llm.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=s) for s in range(8, 14)}
    assert others - {first}  # another seed, another sample


def test_chat_is_litliger_chats_formatting(base: Path, llm: LLM) -> None:
    messages = [{"role": "user", "content": "repeat alpha beta"}]
    model, tok = GPT.from_checkpoint(base).eval(), Tokenizer.from_dir(base)
    expected = respond(model, tok, chat_style(base), messages, 10, max_seq_length=model.config.block_size,
                       device="cpu", temperature=0.0)  # fmt: skip
    assert llm.chat(messages, max_new_tokens=10) == expected
    assert "".join(llm.chat(messages, max_new_tokens=10, stream=True)) == expected


def test_scores_are_the_scoring_functions(llm: LLM) -> None:
    context, continuation = "alpha beta ", "gamma delta"
    ctx, cont = llm.split(context, continuation)
    assert llm.tokenizer.decode(ctx + cont) == context + continuation  # the trailing space moved, nothing lost
    assert llm.loglikelihood(context, continuation) == continuation_logprob(llm.model, ctx, cont)
    assert llm.loglikelihood(context, continuation)[0] < 0
    ids = llm.tokenizer.encode(PROMPT * 3, bos=False)
    assert llm.loglikelihood_rolling(PROMPT * 3) == rolling_logprob(llm.model, ids, llm.tokenizer.eos_id)


def test_a_finetuning_step_folder_loads_with_its_adapters(tmp_path: Path, base: Path) -> None:
    records = write_instructions(tmp_path / "records.jsonl", n=12)
    run(tmp_path / "ft", base, records, steps=3, save_interval=2)  # step-2, then final
    step = tmp_path / "ft" / "step-00000002"
    assert LLM.load(step, device="cpu").generate(PROMPT, max_new_tokens=8) == greedy_text(step, PROMPT, 8)


def test_bad_requests_are_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="ends with a user message"):
        llm.chat([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="temperature"):
        llm.generate(PROMPT, temperature=-1.0)
    with pytest.raises(ValueError, match="shorten it"):
        llm.generate("alpha " * 400)


def test_a_stream_closed_early_frees_the_cache(llm: LLM) -> None:
    pieces = llm.generate(PROMPT, max_new_tokens=40, stream=True)
    next(pieces)
    assert llm.model.kv_cache_length is not None  # decoding holds the cache
    pieces.close()
    assert llm.model.kv_cache_length is None
