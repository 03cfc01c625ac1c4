"""``AnswerText``: the text of an answer as its tokens arrive, ended by a stop id or a stop string.

Shared by ``litliger.LLM`` (``generate`` / ``chat``, streamed or not) and ``litliger serve``, so an answer ends
at the same place through either. Text that could still be the start of a stop string is held back until it
can no longer be one; a stop string itself is never shown (the OpenAI API's ``stop``), nor is a stop id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .generate import TextStream


class AnswerText:
    """Feed tokens with :meth:`add`; when it reports the answer finished, stop. Otherwise :meth:`finish` gives
    the held-back text once no more tokens come (the token limit or the context's end)."""

    def __init__(self, tokenizer, stop_ids: Iterable[int] = (), stop: Sequence[str] | None = ()) -> None:
        self.stop_ids = set(stop_ids)
        self.stop = [s for s in stop or () if s]
        self.shown = TextStream(tokenizer, skip=self.stop_ids)
        self.held = ""

    def add(self, token: int) -> tuple[str, bool]:
        """(text to show now, whether the answer is finished). A stop id finishes it; a stop string finishes
        it with the text before it."""
        if token in self.stop_ids:
            return self.finish(), True
        self.held += self.shown.add(token)
        cut = self._cut()
        if cut is not None:
            text, self.held = self.held[:cut], ""
            return text, True
        keep = max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if self.held.endswith(s[:k])), default=0)
        text, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return text, False

    def finish(self) -> str:
        """The text not shown yet (an incomplete character as U+FFFD), cut at a stop string."""
        self.held += self.shown.flush()
        cut = self._cut()
        text, self.held = self.held[: len(self.held) if cut is None else cut], ""
        return text

    def _cut(self) -> int | None:
        return min((self.held.index(s) for s in self.stop if s in self.held), default=None)
