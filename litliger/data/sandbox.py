"""The Jinja environment chat templates are rendered in: jinja2's immutable sandbox, bounded in size and work.

Chat templates come from model hubs, so rendering one must neither touch anything (the sandbox sees to that)
nor eat the machine: `{{ 'a' * 10**9 }}` would otherwise build a gigabyte before anything could refuse it.
Each render gets a `RenderBudget` of characters: the conversation's own size times a factor plus a fixed
allowance, so that a legitimate template never comes near it. Then

- the rendered text, and every buffer a macro, call block or `{% set %}` block joins, is at most that long
  (counted while it is produced, so an endless output stops at the limit);
- every string, list, tuple or dict an operator, a call or a filter returns is at most that long, and the
  operations that multiply sizes are checked *before* they run: `*` on sequences, `+` and `~`, `**` on
  integers, `%` and `str.format` widths, padding (`center`, `ljust`, `indent`, ...), `replace`, `join`,
  `batch`, `slice`, `tojson(indent)`, `wordwrap`, `lipsum`, and `{{ value }}` of a large container;
- all loops of a render together run at most that many iterations (jinja2 already caps one `range` at
  100,000 items; nested loops multiply);
- all the strings and containers those operations build, and all that is printed, come to at most
  WORK_FACTOR times that many characters: a loop that keeps building (or printing into a macro's buffer)
  large values stops there, so memory and time stay bounded too.

A template that passes a bound raises `TemplateLimitError` (a jinja2 `SecurityError`) saying which.
"""

from __future__ import annotations

import contextvars
import re
import string
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, ValuesView
from contextlib import contextmanager
from copy import copy
from functools import update_wrapper
from inspect import signature
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace, generate_lorem_ipsum

BASE_CHARS = 1 << 20  # what any render may produce beyond its inputs' share: 1 Mi characters
INPUT_FACTOR = 4  # ... plus this many characters per character of the conversation and the special tokens
WORK_FACTOR = 16  # all strings and containers a render builds together: this many times its character limit
MAX_INT_BITS = 1 << 16  # integers an operator may build (str() refuses more than 4,300 digits anyway)


class TemplateLimitError(SecurityError):
    """A chat template tried to render more than its `RenderBudget` allows."""


class RenderBudget:
    """The bounds of one render: `chars` characters (or container items) for any one value and for the output,
    as many loop iterations, and WORK_FACTOR times as many for all the values it builds together."""

    def __init__(self, chars: int) -> None:
        self.chars = chars
        self.iterations_left = chars
        self.work_left = WORK_FACTOR * chars
        self._sizes: dict[int, tuple[Any, int]] = {}  # id -> (the container, kept alive; its text size)

    def check(self, size: int, what: str) -> None:
        if size > self.chars:
            raise TemplateLimitError(f"{what} would be {size:,} characters, more than the limit of {self.chars:,}")

    def checked(self, value: Any) -> Any:
        """`value`, refused when it is a string or container longer than the limit; its size counts as work."""
        if isinstance(value, str | list | tuple | dict | set | frozenset):
            size = len(value)
            if size > self.chars:  # (the message is only built when it is needed: this runs for every operation)
                self.check(size, f"a {type(value).__name__}")
            self.spend(size)
        return value

    def spend(self, size: int) -> None:
        """Count `size` characters built towards the render's work limit."""
        self.work_left -= size
        if self.work_left < 0:
            raise TemplateLimitError(
                f"the template builds more than {WORK_FACTOR * self.chars:,} characters in all "
                f"({WORK_FACTOR} times the limit of {self.chars:,})"
            )

    def text_size(self, value: Any) -> int:
        """About len(str(value)) (an overestimate), found without building the text; stops past the limit."""
        if isinstance(value, str):
            return len(value)
        if isinstance(value, bool) or value is None:
            return 5
        if isinstance(value, int):
            return value.bit_length() // 3 + 2
        if isinstance(value, Namespace):  # its attributes change ({% set ns.x = ... %}): measured every time
            return 16 + self._items_size(getattr(value, "_Namespace__attrs", {}).items())
        if isinstance(value, dict):
            value = value.items()
        if not isinstance(value, list | tuple | set | frozenset | KeysView | ValuesView | ItemsView):
            return 32 if isinstance(value, float) else len(repr(value)) if isinstance(value, range) else 64
        # the sandbox lets no template change a list, tuple, set or dict: their sizes are measured once a render
        known = self._sizes.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        total = self._items_size(value)
        self._sizes[id(value)] = (value, total)
        return total

    def _items_size(self, items: Iterable[Any]) -> int:
        total = 2
        for item in items:
            total += self.text_size(item) + 4  # quotes and a separator
            if total > self.chars:
                break
        return total

    def loop(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.iterations_left -= 1
            if self.iterations_left < 0:
                raise TemplateLimitError(f"the template's loops run more than {self.chars:,} iterations in all")
            yield item


_BUDGET: contextvars.ContextVar[RenderBudget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def budget() -> RenderBudget:
    """The budget of the render in progress (outside one, e.g. while compiling, a fresh minimal one)."""
    return _BUDGET.get() or RenderBudget(BASE_CHARS)


@contextmanager
def render_budget(input_chars: int) -> Iterator[RenderBudget]:
    """Bound what is rendered inside the block: BASE_CHARS + INPUT_FACTOR * input_chars."""
    token = _BUDGET.set(RenderBudget(BASE_CHARS + INPUT_FACTOR * input_chars))
    try:
        yield _BUDGET.get()
    finally:
        _BUDGET.reset(token)


# --- size estimates of the operations that multiply sizes, made before they run ---------------------------

_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _widths(numbers: Iterable[str | None], args: Any) -> int:
    """The largest width or precision among `numbers` (digits, or `*`: every int in `args`)."""
    widest = 0
    for n in numbers:
        if n == "*":
            values = args if isinstance(args, tuple | list) else (args,)
            widest = max([widest, *(abs(v) for v in values if isinstance(v, int))])
        elif n:
            widest = max(widest, int(n))
    return widest


def _printf_size(b: RenderBudget, fmt: str, args: Any) -> int:
    numbers = [n for match in _PRINTF.finditer(fmt) for n in match.groups()]
    values = args if isinstance(args, tuple) else (args,)
    return len(fmt) + _widths(numbers, args) * max(1, len(numbers)) + sum(b.text_size(v) for v in values)


def _format_size(b: RenderBudget, fmt: str, args: tuple, kwargs: dict) -> int:
    """An overestimate of `fmt.format(*args, **kwargs)`: its text, the arguments, and every width in a spec."""
    numbers: list[str] = []
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if spec:
            numbers += re.findall(r"\d+", spec) + (["*"] if "{" in spec else [])
    values = (*args, *kwargs.values())
    fields = max(1, fmt.count("{"))
    return len(fmt) + _widths(numbers, values) * fields + sum(b.text_size(v) for v in values)


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(0, len(new) - len(old))


def _join_size(b: RenderBudget, items: Any, sep: Any) -> int:
    items = list(items)
    return sum(b.text_size(x) for x in items) + max(0, len(items) - 1) * len(str(sep))


def _pad_size(s: Any, width: Any, *_: Any) -> int:
    return max(len(str(s)), width if isinstance(width, int) else 0)


def _lines(s: Any) -> int:
    return str(s).count("\n") + 1


def _indent_size(s: Any, width: Any = 4, *_: Any) -> int:
    return len(str(s)) + _lines(s) * (width if isinstance(width, int) else len(str(width)))


def _wordwrap_size(s: Any, width: Any = 79, wrapstring: Any = None) -> int:
    lines = len(str(s)) // max(1, width if isinstance(width, int) else 1) + 1
    return len(str(s)) + lines * len(str(wrapstring or "\n"))


def _tojson_size(b: RenderBudget, x: Any, indent: Any = None) -> int:
    # each item goes on its own line, indented by at most its depth times `indent` (nesting is shallow in chats)
    return b.text_size(x) * (1 + (indent if isinstance(indent, int) and indent > 0 else 0))


def _expandtabs_size(s: str, tabsize: Any = 8) -> int:
    return len(s) + s.count("\t") * (tabsize if isinstance(tabsize, int) else 8)


# filter name -> estimate(budget, the filtered value, the other arguments by name) of the result's size
_FILTER_SIZES: dict[str, Callable[[RenderBudget, Any, dict[str, Any]], int]] = {
    "center": lambda b, v, k: _pad_size(v, k.get("width", 80)),
    "indent": lambda b, v, k: _indent_size(v, k.get("width", 4)),
    "replace": lambda b, v, k: _replace_size(v, k.get("old"), k.get("new"), k.get("count")),
    "join": lambda b, v, k: _join_size(b, v, k.get("d", "")),
    "format": lambda b, v, k: _printf_size(b, str(v), tuple(k.get("args", ())) or k.get("kwargs", {})),
    "batch": lambda b, v, k: k.get("linecount") if isinstance(k.get("linecount"), int) else 0,
    "slice": lambda b, v, k: k.get("slices") if isinstance(k.get("slices"), int) else 0,
    "wordwrap": lambda b, v, k: _wordwrap_size(v, k.get("width", 79), k.get("wrapstring")),
    "tojson": lambda b, v, k: _tojson_size(b, v, k.get("indent")),
}

# str method name -> estimate(budget, the string, its arguments) of the result's size
_METHOD_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda b, s, *a, **k: _pad_size(s, *a, *k.values()),
    "ljust": lambda b, s, *a, **k: _pad_size(s, *a, *k.values()),
    "rjust": lambda b, s, *a, **k: _pad_size(s, *a, *k.values()),
    "zfill": lambda b, s, *a, **k: _pad_size(s, *a, *k.values()),
    "expandtabs": lambda b, s, *a, **k: _expandtabs_size(s, *a, *k.values()),
    "replace": lambda b, s, *a, **k: _replace_size(s, *a, *k.values()),
    "join": lambda b, s, items: _join_size(b, items, s),
}


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` (a jinja2 filter) with its result checked, and its size estimated first when it multiplies."""
    estimate = _FILTER_SIZES.get(name)
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0  # the context jinja2 passes first
    positional, rest = [], None  # the names of the arguments after the filtered value
    if estimate is not None:
        for p in list(signature(function).parameters.values())[skip + 1 :]:
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                positional.append(p.name)
            elif p.kind is p.VAR_POSITIONAL:
                rest = p.name

    def bounded(*args: Any, **kwargs: Any) -> Any:
        b = _BUDGET.get() or RenderBudget(BASE_CHARS)
        if estimate is not None and len(args) > skip:
            value = args[skip]
            if name == "join" and not isinstance(value, list | tuple | str | dict):
                value = list(value)  # an iterator: measured here, then joined
                args = (*args[:skip], value, *args[skip + 1 :])
            named = dict(zip(positional, args[skip + 1 :], strict=False))
            if rest is not None:
                named[rest] = args[skip + 1 + len(positional) :]
                named["kwargs"] = kwargs
            b.check(estimate(b, value, {**kwargs, **named}), f"the result of the {name} filter")
        return b.checked(function(*args, **kwargs))

    return update_wrapper(bounded, function)


def _lipsum_size(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> int:  # lipsum's own names
    return n * max * 16 if isinstance(n, int) and isinstance(max, int) else 0


class _BoundedFilters(dict):
    """The environment's filters; each one set (jinja2's, an extension's, ours) is wrapped by `_bounded_filter`."""

    def __init__(self, filters: dict[str, Callable[..., Any]]) -> None:
        super().__init__()
        for name, function in filters.items():
            self[name] = function

    def __setitem__(self, name: str, function: Callable[..., Any]) -> None:
        super().__setitem__(name, _bounded_filter(name, function))


class _BoundedCodeGenerator(CodeGenerator):
    """Routes `~` through `environment.bounded_join` and every `{% for %}` through the render's loop budget."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"environment.bounded_join({join}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        bounded = copy(node)
        bounded.iter = nodes.Call(
            nodes.EnvironmentAttribute("bounded_loop"), [node.iter], [], None, None, lineno=node.lineno
        )
        super().visit_For(bounded, frame)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with every size and loop bounded by the render's `RenderBudget`."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, finalize=self._finalize, **kwargs)
        self.filters = _BoundedFilters(self.filters)

    # text: what `{{ }}` prints, what `~` joins, what a block or the whole render concatenates
    def _finalize(self, value: Any) -> Any:
        # what is printed inside a loop of a macro or block is kept until the block ends: it counts as work
        b = budget()
        size = len(value) if isinstance(value, str) else b.text_size(value)
        b.check(size, "a printed value")
        b.spend(size)
        return value

    def bounded_join(self, join: Callable[[Iterable[Any]], str], parts: tuple) -> str:
        b = budget()
        b.check(sum(b.text_size(p) for p in parts), "a ~ concatenation")
        return b.checked(join(parts))

    def concat(self, pieces: Iterable[str]) -> str:  # type: ignore[override]
        b, size, kept = budget(), 0, []
        for piece in pieces:
            size += len(piece)
            b.check(size, "the rendered text")
            kept.append(piece)
        b.spend(size)
        return "".join(kept)

    def bounded_loop(self, iterable: Iterable[Any]) -> Iterator[Any]:
        return budget().loop(iterable)

    # operators, calls and str.format
    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        b = _BUDGET.get() or RenderBudget(BASE_CHARS)
        if operator == "+":  # the common case first: templates join their pieces with +
            if isinstance(left, str) and isinstance(right, str):
                b.check(len(left) + len(right), "str + str")
            elif isinstance(left, list | tuple) and isinstance(right, list | tuple):
                b.check(b.text_size(left) + b.text_size(right), f"{type(left).__name__} + {type(right).__name__}")
            else:
                return left + right  # numbers (or a TypeError)
            return b.checked(left + right)
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                    _too_big_int()
            else:
                seq, n = (left, right) if isinstance(left, str | list | tuple) else (right, left)
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and n > 1:
                    size = len(seq) if isinstance(seq, str) else b.text_size(seq)
                    b.check(size * n, f"{type(seq).__name__} * {n}")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * (abs(left).bit_length() - 1) > MAX_INT_BITS:
                _too_big_int()
        elif operator == "%" and isinstance(left, str):
            b.check(_printf_size(b, left, right), "a % formatting")
        return b.checked(super().call_binop(context, operator, left, right))

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        b = budget()
        name = getattr(__obj, "__name__", None)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and name in _METHOD_SIZES:
            if name == "join" and args and not isinstance(args[0], list | tuple | str | dict):
                args = (list(args[0]), *args[1:])
            try:
                size = _METHOD_SIZES[name](b, owner, *args, **kwargs)
            except TypeError:
                size = 0  # wrong arguments: the method itself says so
            b.check(size, f"str.{name}()")
        elif __obj is generate_lorem_ipsum:
            b.check(_lipsum_size(*args, **kwargs), "lipsum()")
        return b.checked(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt: str = value.__self__

        def bounded(*args: Any, **kwargs: Any) -> str:
            b = budget()
            mapping = args[0] if value.__name__ == "format_map" and args and isinstance(args[0], dict) else {}
            b.check(_format_size(b, fmt, args, {**kwargs, **mapping}), f"str.{value.__name__}()")
            return b.checked(wrapped(*args, **kwargs))

        return update_wrapper(bounded, wrapped)


def _too_big_int() -> None:
    raise TemplateLimitError(f"an integer would have more than {MAX_INT_BITS:,} bits")
