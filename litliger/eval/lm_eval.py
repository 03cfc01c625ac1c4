"""``LitligerLM``: a litliger checkpoint as an lm-evaluation-harness model (``pip install litliger[eval]``).

Imported only as ``litliger.eval.lm_eval.LitligerLM`` (or ``litliger.eval.evaluate.LitligerLM``): this module
needs ``lm_eval``; nothing else in litliger does, and without it importing this module is a ModuleNotFoundError
that says how to install it. ``lm_eval --model litliger --model_args checkpoint_dir=out/final`` finds it once
``LitligerLM`` has been imported (it registers itself), or pass an instance to
``lm_eval.simple_evaluate(model=LitligerLM(...))``.
"""

from __future__ import annotations

from pathlib import Path

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError as e:
    if e.name is None or e.name.split(".")[0] != "lm_eval":
        raise
    raise ModuleNotFoundError(
        "litliger evaluate's lm_eval model needs lm-evaluation-harness: pip install 'litliger[eval]'", name="lm_eval"
    ) from None

from ..data.prompts import bos_ids
from ..inference.generate import TextStream, generate_tokens, prompt_ids, start_id
from ..inference.loading import Precision, load_for_inference
from .scoring import continuation_logprob, rolling_logprob


@register_model("litliger")
class LitligerLM(LM):
    """loglikelihood, loglikelihood_rolling and generate_until on a litliger checkpoint folder, one request
    at a time (scoring is exact at any batch size; batching is left out for clarity).

    A context is encoded as ``litliger generate`` encodes a prompt: BOS only when the tokenizer adds one; an
    empty context, and the token before a rolling text, is the start token (BOS if the tokenizer has one,
    else EOS), as lm_eval's Hugging Face model does.
    """

    def __init__(
        self, checkpoint_dir: str | Path, device: str = "auto", precision: Precision = "auto", **_: object
    ) -> None:
        super().__init__()
        self.model, self.tokenizer, self._device = load_for_inference(Path(checkpoint_dir), device, precision)

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # as lm_eval's Hugging Face model: trailing spaces of the context belong to the continuation
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation, bos=False)
        ctx = self.tokenizer.encode(context, bos=False)
        context_ids = bos_ids(self.tokenizer, context) + whole[: len(ctx)]
        return context_ids or [start_id(self.tokenizer)], whole[len(ctx) :]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return [continuation_logprob(self.model, *self._split(*r.args)) for r in requests]

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [
            rolling_logprob(self.model, self.tokenizer.encode(r.args[0], bos=False), start_id(self.tokenizer))
            for r in requests
        ]

    def generate_until(self, requests) -> list[str]:
        answers = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or [self.tokenizer.decode([self.tokenizer.eos_id])]
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            ids = prompt_ids(self.tokenizer, context)[-(self.model.max_seq_length - 1) :]
            shown = TextStream(self.tokenizer, skip=[self.tokenizer.eos_id])
            text = ""
            idx = torch.tensor([ids], device=self._device)
            steps = generate_tokens(self.model, idx, int(kwargs.get("max_gen_toks", 256)), temperature=temperature,
                                    eos_id=self.tokenizer.eos_id, vocab_size=self.tokenizer.vocab_size)  # fmt: skip
            for token in steps:
                text += shown.add(int(token))
                if any(stop in text for stop in until):
                    break
            cut = min((text.index(stop) for stop in until if stop in text), default=len(text))
            answers.append(text[:cut])
        return answers
