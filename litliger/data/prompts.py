"""Prompt styles: how a conversation becomes the text a model is finetuned on and later prompted with.

Two kinds. A tokenizer that ships a chat template (`chat_template` in tokenizer_config.json, or a
`chat_template.jinja` file) is used as the model's authors meant: the Jinja template rendered the way
transformers' `apply_chat_template` renders it. Without one, the plain Alpaca prompt. A style is a small
dict in finetune.yaml that holds the template's text and special tokens, so generate and chat rebuild
the exact training prompt without the tokenizer's config files.

A conversation is a list of `{"role": "system" | "user" | "assistant", "content": str}` messages. For
training, a style cuts it into `Segment`s: prompt text, and response text whose tokens are targets.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import SecurityError

from litliger.data.sandbox import BoundedSandbox, TemplateLimitError, render_budget
from litliger.data.tokenizer import Tokenizer, _token_name
from litliger.util.files import read_json_object

ROLES = ("system", "user", "assistant")
# The special tokens transformers hands a template (its SPECIAL_TOKENS_ATTRIBUTES), read from tokenizer_config.json.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
STYLE_NAMES = (None, "alpaca", "chat_template")  # what a `prompt_style` setting may say (None: automatic)
_PROBE = "litliger-probe-7f3a"  # an assistant reply that no template rewrites, to find the end-of-turn text
_USE_TEMPLATE = "use a tokenizer with a chat template (prompt_style=chat_template) for other conversations"


class RecordError(ValueError):
    """A conversation a style cannot format; `what` is wrong and `fix` says what to do (the data module adds where)."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"{what}; {fix}")
        self.what = what
        self.fix = fix


class Segment(NamedTuple):
    """A piece of a rendered conversation; the pieces concatenated are the whole text."""

    text: str
    trained: bool  # a response: its tokens are targets even when the prompt is masked
    eos: bool = False  # follow it with the tokenizer's EOS id: the style's text has no end-of-turn marker


def check_messages(messages: Any) -> list[dict[str, str]]:
    """`messages` as plain `{role, content}` dicts (other keys dropped); a RecordError says what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise RecordError("'messages' is not a non-empty list", "give a list of {role, content} objects")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RecordError(f"message {i} is a {type(m).__name__}, not an object", "give {role, content} objects")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RecordError(f"message {i} has unknown role {role!r}", f"use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            what = "no 'content'" if content is None else f"a {type(content).__name__} 'content'"
            raise RecordError(f"message {i} ({role}) has {what}", "give its content as a string")
        checked.append({"role": role, "content": content})
    return checked


def bos_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The BOS to put before `text` when it starts a sequence: none if the text already begins with BOS."""
    if not tokenizer.add_bos or tokenizer.bos_id is None:
        return []
    bos_text = tokenizer.backend.id_to_token(tokenizer.bos_id)
    return [] if bos_text and text.startswith(bos_text) else [tokenizer.bos_id]


class PromptStyle(ABC):
    """How conversations are rendered; `to_dict` / `from_dict` round-trip it through finetune.yaml."""

    name: ClassVar[str]

    @abstractmethod
    def render_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The text the model continues: the conversation up to and including the assistant turn header."""

    @abstractmethod
    def segments(self, messages: list[dict[str, Any]]) -> list[Segment]:
        """A conversation ending with an assistant reply, cut into prompt and response pieces."""

    @abstractmethod
    def stop_text(self) -> str | None:
        """What a template writes after an assistant reply (e.g. `<|im_end|>`), for generation to stop at;
        None when the style ends replies with the EOS id only (Alpaca)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-ready dict that `PromptStyle.from_dict` turns back into this style."""

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PromptStyle:
        name = d.get("name")
        if name == Alpaca.name:
            return Alpaca()
        if name == ChatTemplate.name:
            return ChatTemplate(d["template"], dict(d.get("special_tokens", {})), d.get("source", ""))
        raise ValueError(f"Unknown prompt style {name!r} in {d}; expected 'alpaca' or 'chat_template'.")

    def encode_prompt(self, tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> list[int]:
        """Ids of `render_prompt(messages)`, with BOS exactly as training put it."""
        text = self.render_prompt(messages)
        return bos_ids(tokenizer, text) + tokenizer.encode(text, bos=False)


class Alpaca(PromptStyle):
    """The Stanford Alpaca prompt, for base models without a chat template: one instruction, one response.

    The response is followed by the tokenizer's EOS id, so the model learns to stop. A user message made
    from an Alpaca record keeps its `instruction` and `input` keys, which give the prompt's Input section.
    """

    name = "alpaca"
    WITH_INPUT = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    )
    WITHOUT_INPUT = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    )

    def render_prompt(self, messages: list[dict[str, Any]]) -> str:
        check_messages(messages)
        if [m["role"] for m in messages] != ["user"]:
            raise RecordError("the alpaca prompt style takes a single user message", _USE_TEMPLATE)
        return self._prompt(messages[0])

    def segments(self, messages: list[dict[str, Any]]) -> list[Segment]:
        check_messages(messages)
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise RecordError("the alpaca prompt style takes one user and one assistant message", _USE_TEMPLATE)
        return [Segment(self._prompt(messages[0]), trained=False), Segment(messages[1]["content"], True, eos=True)]

    def stop_text(self) -> str | None:
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def _prompt(self, user: dict[str, Any]) -> str:
        instruction, extra = user.get("instruction", user["content"]), user.get("input")
        if extra:
            return self.WITH_INPUT.format(instruction=instruction, input=extra)
        return self.WITHOUT_INPUT.format(instruction=instruction)


@dataclass(eq=False)
class ChatTemplate(PromptStyle):
    """A tokenizer's Jinja chat template, rendered as transformers does (same environment, globals, variables).

    Training renders incrementally: for each assistant turn i, the prompt is the conversation before it
    rendered with `add_generation_prompt=True`, the response is what the full render up to turn i adds.
    Every assistant turn is trained when the template renders a conversation as a prefix of its longer
    continuations (ChatML, Llama, Mistral, ...). Templates that rewrite earlier turns (e.g. dropping past
    reasoning) train the last assistant turn only, with the rest as prompt. The text after the reply
    (the end-of-turn token, e.g. `<|im_end|>\\n`) is part of the response; EOS is appended only when the
    template writes nothing after the reply.
    """

    template: str
    special_tokens: dict[str, str] = field(default_factory=dict)
    source: str = ""  # where the template came from, for error messages

    name: ClassVar[str] = "chat_template"

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        """The template applied to `messages` (role and content only), as `apply_chat_template(tokenize=False)`.

        Rendering is bounded (see sandbox.py): a template that would render more than its budget, or that
        fails in any other way than refusing the conversation, is a ValueError that names the template's file.
        """
        where = self.source or "the tokenizer's chat template"
        fix = "fix the template, or use prompt_style=alpaca"
        try:
            compiled = _compile(self.template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(
                f"the chat template is not valid Jinja (template line {e.lineno}: {e.message}), in {where}; {fix}"
            ) from None
        except Exception as e:  # a template so large or deep that the compiler gives up
            raise ValueError(f"the chat template cannot be compiled ({_what(e)}), in {where}; {fix}") from None
        messages = check_messages(messages)
        size = sum(len(m["content"]) for m in messages) + sum(len(str(t)) for t in self.special_tokens.values())
        try:
            with render_budget(size):
                return compiled.render(
                    messages=messages,
                    tools=None,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **self.special_tokens,
                )
        except TemplateLimitError as e:
            raise ValueError(f"the chat template renders too much ({_at_line(e)}{e}), in {where}; {fix}") from None
        except SecurityError as e:  # what the sandbox forbids is the template's doing, not the conversation's
            raise ValueError(
                f"the chat template did what the sandbox forbids ({_at_line(e)}{e}), in {where}; {fix}"
            ) from None
        except jinja2.TemplateError as e:
            raise RecordError(
                f"the chat template of {self.source or 'the tokenizer'} refused the conversation ({e})",
                "give the roles in the order the template expects (usually user/assistant alternating)",
            ) from None
        except Exception as e:  # the template's own error: 1/0, a recursion without end, a wrong type ...
            raise ValueError(f"the chat template failed ({_at_line(e)}{_what(e)}), in {where}; {fix}") from None

    def render_prompt(self, messages: list[dict[str, Any]]) -> str:
        return self.render(messages, add_generation_prompt=True)

    def segments(self, messages: list[dict[str, Any]]) -> list[Segment]:
        messages = check_messages(messages)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise RecordError("the conversation has no assistant message", "end it with the assistant's reply")
        if "user" not in (m["role"] for m in messages[: turns[0]]):
            raise RecordError("an assistant message comes before any user message", "start with a user message")
        pieces, done = [], ""
        for i in turns:
            prompt, response = self._turn(messages, i)
            if not prompt.startswith(done):  # the template rewrote earlier turns: train the last one only
                prompt, response = self._turn(messages, turns[-1])
                return [Segment(prompt, False), response]
            pieces += [Segment(prompt[len(done) :], False), response]
            done = prompt + response.text
        return pieces

    def stop_text(self) -> str | None:
        conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
        _, response = self._turn(conversation, 1)
        end = response.text[response.text.rfind(_PROBE) + len(_PROBE) :].strip()
        return end or None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "template": self.template,
            "special_tokens": self.special_tokens,
            "source": self.source,
        }

    def _turn(self, messages: list[dict[str, str]], i: int) -> tuple[str, Segment]:
        """The render of messages[:i] with the generation prompt, and the response segment of message i."""
        prompt = self.render(messages[:i], add_generation_prompt=True)
        full = self.render(messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise RecordError(
                f"the chat template of {self.source or 'the tokenizer'} renders a conversation that does not start "
                "with its own generation prompt, so the response cannot be cut out of it",
                "use prompt_style=alpaca, or a tokenizer whose template supports add_generation_prompt",
            )
        response = full[len(prompt) :]
        content = messages[i]["content"].strip()
        unterminated = response.rstrip().endswith(content) if content else not response.strip()
        return prompt, Segment(response, trained=True, eos=unterminated)


def load_chat_template(tokenizer_dir: Path) -> ChatTemplate | None:
    """The chat template of a tokenizer folder (`chat_template.jinja` first, as transformers), or None."""
    config_file = tokenizer_dir / "tokenizer_config.json"
    config = read_json_object(config_file)
    jinja_file = tokenizer_dir / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            template, source = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        except UnicodeDecodeError as e:
            raise ValueError(
                f"the chat template is not UTF-8 text ({e.reason} at byte {e.start}), in {jinja_file}; save it as UTF-8"
            ) from None
    else:
        template, source = config.get("chat_template"), str(config_file)
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise ValueError(
                    f"{config_file} lists chat templates {sorted(map(str, named))} but none named 'default'; "
                    "name one 'default' or use prompt_style=alpaca."
                )
            template = named["default"]
    if not template:
        return None
    if not isinstance(template, str):
        raise ValueError(f"The chat_template in {config_file} is a {type(template).__name__}, not a string.")
    extra = config.get("extra_special_tokens")
    named = {**(extra if isinstance(extra, dict) else {}), **{n: config.get(n) for n in SPECIAL_TOKENS}}
    tokens = {n: t for n, value in named.items() if (t := _token_name(value)) is not None}
    return ChatTemplate(template, tokens, source)


def resolve_prompt_style(tokenizer_dir: Path | None, name: str | None) -> PromptStyle:
    """The style to train with: an explicit `name` > the tokenizer's chat template when it has one > Alpaca."""
    if name not in STYLE_NAMES:
        raise ValueError(f"Unknown prompt_style {name!r}: use 'alpaca' or 'chat_template', or leave it unset.")
    if name == Alpaca.name:
        return Alpaca()
    template = load_chat_template(Path(tokenizer_dir)) if tokenizer_dir is not None else None
    if template is not None:
        return template
    if name == ChatTemplate.name:
        where = f"the tokenizer in {tokenizer_dir} has" if tokenizer_dir is not None else "no tokenizer folder gives"
        raise ValueError(
            f"prompt_style=chat_template, but {where} no chat template (chat_template in tokenizer_config.json "
            "or a chat_template.jinja file); use prompt_style=alpaca or a tokenizer that has one."
        )
    return Alpaca()


class _GenerationBlock(Extension):
    """`{% generation %}` marks assistant text for transformers' assistant masks; here it renders its body as is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Sequence[str] | None = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    # transformers' filter: Jinja's own escapes HTML characters, which would change the rendered prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _what(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _at_line(e: BaseException) -> str:
    """`template line N: ` for the innermost line of the template that `e` went through (jinja2 puts the
    template's lines into the traceback as frames of "<template>")."""
    line, tb = None, e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"template line {line}: " if line is not None else ""


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Chat templates come from model hubs: the immutable sandbox keeps them from touching anything, the
    # bounds of BoundedSandbox from rendering without end (sandbox.py).
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
