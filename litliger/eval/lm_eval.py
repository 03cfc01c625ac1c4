"""``LitligerLM``: a litliger checkpoint as an lm-evaluation-harness model (``pip install litliger[eval]``).

Imported only as ``litliger.eval.lm_eval.LitligerLM`` (or ``litliger.eval.evaluate.LitligerLM``): this module
needs ``lm_eval``; nothing else in litliger does, and without it importing this module is a ModuleNotFoundError
that says how to install it. ``lm_eval --model litliger --model_args checkpoint_dir=out/final`` finds it once
``LitligerLM`` has been imported (it registers itself), or pass an instance to
``lm_eval.simple_evaluate(model=LitligerLM(...))``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError as e:
    if e.name is None or e.name.split(".")[0] != "lm_eval":
        raise
    raise ModuleNotFoundError(
        "litliger evaluate's lm_eval model needs lm-evaluation-harness: pip install 'litliger[eval]'", name="lm_eval"
    ) from None

from ..inference.generate import prompt_ids
from ..inference.llm import LLM
from ..inference.loading import Precision


class LitligerLM(LM):
    """loglikelihood, loglikelihood_rolling and generate_until on a litliger checkpoint folder, through
    :class:`litliger.LLM` (one request at a time: scoring is exact at any batch size; batching is left out for
    clarity).

    A context is encoded as ``litliger generate`` encodes a prompt: BOS only when the tokenizer adds one; an
    empty context, and the token before a rolling text, is the start token (BOS if the tokenizer has one,
    else EOS), as lm_eval's Hugging Face model does (``LLM.split``).
    """

    def __init__(
        self, checkpoint_dir: str | Path, device: str = "auto", precision: Precision = "auto", **_: object
    ) -> None:
        super().__init__()
        self.llm = LLM.load(Path(checkpoint_dir), device, precision)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return [self.llm.loglikelihood(*r.args) for r in requests]

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [self.llm.loglikelihood_rolling(r.args[0]) for r in requests]

    def generate_until(self, requests) -> list[str]:
        answers = []
        tokenizer = self.llm.tokenizer
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or [tokenizer.decode([tokenizer.eos_id])]
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            ids = prompt_ids(tokenizer, context)[-(self.llm.max_seq_length - 1) :]
            answer = self.llm.generate_ids(ids, int(kwargs.get("max_gen_toks", 256)), temperature=temperature,
                                           stop=until)  # fmt: skip
            answers.append(answer)
        return answers


# `lm_eval --model litliger` once this module is imported; imported again (a reload), the name stays with the first
# import's class (lm_eval refuses a second registration)
with contextlib.suppress(ValueError):
    register_model("litliger")(LitligerLM)
