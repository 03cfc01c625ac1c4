"""The OpenAI request bodies ``litliger serve`` accepts (pydantic, strict: ``"16"`` is not a number).

Fields people send are accepted with OpenAI's meaning and defaults; unknown fields are ignored (clients send
many), but a known field of the wrong type or out of range is refused (400). What this server does not do is
refused by name rather than ignored: ``n`` > 1, ``best_of`` > 1, penalties, ``suffix``, ``echo`` with
``logprobs``, several prompts in one request. ``top_k`` is an extension (as in vLLM).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LOGPROBS = 20


class Refused(ValueError):
    """A valid request this server does not serve: 400 with the parameter's name."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class Sampling(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        return [s for s in stops if s]

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise Refused(f"n={self.n}: this server returns one choice per request; send n=1 or leave it out", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise Refused(f"{name} is not supported; leave it out or send 0", name)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(Sampling):
    """``POST /v1/completions``: ``prompt`` is a string, a list of one string, or a list of token ids."""

    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        several = isinstance(self.prompt, list) and len(self.prompt) > 1 and isinstance(self.prompt[0], str)
        if several:
            raise Refused(f"{len(self.prompt)} prompts in one request; send one prompt per request", "prompt")
        if self.best_of not in (None, 1):
            raise Refused(f"best_of={self.best_of} is not supported; leave it out or send 1", "best_of")
        if self.suffix:
            raise Refused("suffix (insertion) is not supported; leave it out", "suffix")
        if self.echo and self.logprobs is not None:
            raise Refused("echo with logprobs (prompt log-probabilities) is not supported; send one of them", "echo")
        if self.prompt in ("", [], [""]):
            raise Refused("the prompt is empty; send the text to continue", "prompt")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    """``POST /v1/chat/completions``: ``max_completion_tokens`` is the newer name of ``max_tokens``."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.messages[-1].role != "user":
            raise Refused("the conversation must end with a user message", "messages")
        if not self.messages[-1].text:
            raise Refused("the last user message is empty; send the question", "messages")

    @property
    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def conversation(self) -> list[dict[str, str]]:
        """The messages as prompt styles take them (``developer`` is OpenAI's newer name for ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in self.messages]
