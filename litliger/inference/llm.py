"""``LLM``: a checkpoint as a Python object, text in and text out.

    from litliger import LLM
    llm = LLM.load("out/finetune/debug/final")
    llm.generate("def add(a, b):", max_new_tokens=40, temperature=0)      # the new text only
    for piece in llm.generate("def add(a, b):", stream=True): ...          # the same text, piece by piece
    llm.chat([{"role": "user", "content": "Write a function that adds two numbers."}])
    llm.loglikelihood("The capital of France is", " Paris")              # (log P, is it the greedy answer)

Every method is the same code as the commands: ``generate`` is ``litliger generate``'s decoding loop (the KV
cache, ``generate_tokens``), ``chat`` formats with the prompt style ``litliger chat`` uses (the finetune's saved
style, else the tokenizer's chat template, else Alpaca) and stops at its end-of-turn token, and
``loglikelihood`` / ``loglikelihood_rolling`` are the scoring functions of ``litliger.eval.scoring``, which the
lm_eval adapter (``litliger.eval.lm_eval.LitligerLM``) calls through this class. It loads full checkpoint folders
and finetuning step folders through the one checkpoint loader.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..data.prompts import bos_ids
from .answer import AnswerText
from .chat import chat_style, conversation_ids
from .generate import generate_tokens, prompt_ids, start_id, stop_ids
from .loading import Precision, load_for_inference
from .sampling import check_sampling
from .scoring import continuation_logprob, rolling_logprob


class LLM:
    """A loaded checkpoint: its model (eval mode), tokenizer, device and prompt style (see the module docstring).

    Sampling follows ``litliger generate``: ``temperature=0`` is greedy; a ``seed`` makes a sampled answer
    reproducible (None: the global RNG). ``stop`` strings end the text (not included), as the OpenAI API does.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, device: str, checkpoint_dir: Path) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.checkpoint_dir = Path(checkpoint_dir)
        self.style = chat_style(self.checkpoint_dir)

    @classmethod
    def load(cls, checkpoint_dir: str | Path, device: str = "auto", precision: Precision = "auto") -> LLM:
        """A checkpoint folder or a finetuning step folder on ``device`` (auto: CUDA when available), weights in
        ``precision`` (auto: bf16 on GPUs that support it, else fp32)."""
        model, tokenizer, device = load_for_inference(Path(checkpoint_dir), device, precision)
        return cls(model, tokenizer, device, Path(checkpoint_dir))

    @property
    def max_seq_length(self) -> int:
        """The longest context plus answer (the model's block size)."""
        return self.model.config.block_size

    # --- text out -----------------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 100,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stream: bool = False,
    ) -> str | Iterator[str]:
        """The text that follows ``prompt`` (not the prompt), ended by EOS, ``max_new_tokens`` or a ``stop`` string;
        with ``stream=True`` an iterator of its pieces as they are decoded (joined: the same text)."""
        return self.generate_ids(prompt_ids(self.tokenizer, prompt), max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed, stop=stop, stream=stream)  # fmt: skip

    def generate_ids(
        self,
        ids: list[int],
        max_new_tokens: int = 100,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stream: bool = False,
    ) -> str | Iterator[str]:
        """:meth:`generate` after prompt ids already encoded (e.g. cut to fit, as lm_eval's contexts are)."""
        pieces = self._pieces(ids, [self.tokenizer.eos_id], max_new_tokens, temperature, top_k, top_p, seed, stop)
        return pieces if stream else "".join(pieces)

    def chat(
        self,
        messages: list[dict[str, str]],
        max_new_tokens: int = 256,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stream: bool = False,
    ) -> str | Iterator[str]:
        """The assistant's reply to ``messages`` (a conversation ending with a user turn), formatted as ``litliger
        chat`` formats it and ended by EOS or the style's end-of-turn token."""
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("chat needs a conversation that ends with a user message, in messages")
        ids = self.chat_ids(messages)
        pieces = self._pieces(ids, stop_ids(self.tokenizer, self.style), max_new_tokens, temperature, top_k, top_p,
                              seed, stop)  # fmt: skip
        return pieces if stream else "".join(pieces)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The ids ``chat`` feeds for ``messages``: the conversation as ``litliger chat`` formats it."""
        return conversation_ids(self.style, self.tokenizer, messages)

    def prompt_tokens(self, prompt: str) -> list[int]:
        """The ids ``generate`` feeds for ``prompt`` (BOS as the tokenizer adds it)."""
        return prompt_ids(self.tokenizer, prompt)

    def _pieces(
        self,
        ids: list[int],
        stops: list[int],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float,
        seed: int | None,
        stop: Sequence[str],
    ) -> Iterator[str]:
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        if len(ids) >= self.max_seq_length:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the model holds {self.max_seq_length} with the answer: shorten it"
            )
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        steps = generate_tokens(
            self.model, torch.tensor([ids], device=self.device), max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, stop_ids=stops, vocab_size=self.tokenizer.vocab_size, generator=generator,
        )  # fmt: skip
        return _until(steps, AnswerText(self.tokenizer, stops, stop))

    # --- scores -------------------------------------------------------------------------------------------------

    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm_eval's Hugging Face model splits them: the pair is encoded
        whole, trailing spaces of the context belong to the continuation, and BOS comes as the tokenizer adds
        it (an empty context is the start token)."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation, bos=False)
        ctx = self.tokenizer.encode(context, bos=False)
        context_ids = bos_ids(self.tokenizer, context) + whole[: len(ctx)]
        return context_ids or [start_id(self.tokenizer)], whole[len(ctx) :]

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """log P(continuation | context), and whether the continuation is the greedy one token by token."""
        return continuation_logprob(self.model, *self.split(context, continuation))

    def loglikelihood_rolling(self, text: str) -> float:
        """log P(text) of a whole text, in windows of the model's length (lm_eval's rolling loglikelihood)."""
        return rolling_logprob(self.model, self.tokenizer.encode(text, bos=False), start_id(self.tokenizer))


def _until(steps: Iterator[torch.Tensor], answer: AnswerText) -> Iterator[str]:
    """The decoded pieces of ``steps`` (one row) until the answer is finished (see ``AnswerText``)."""
    try:
        for token in steps:
            text, done = answer.add(int(token))
            if text:
                yield text
            if done:
                return
    finally:
        steps.close()  # frees the KV cache at once, also when the caller stops reading
    tail = answer.finish()
    if tail:
        yield tail
