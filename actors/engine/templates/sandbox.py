"""A jinja2 sandbox for untrusted chat templates that also bounds time and size.

A GGUF's ``tokenizer.chat_template`` is untrusted input. It renders in an
``ImmutableSandboxedEnvironment`` (no dunder attributes, no mutation of lists or dicts) that
is instrumented at parse time: every loop item, call, filter, attribute fetch and piece of
text written checks a per-render deadline; every piece of text written anywhere (the output,
macro bodies, ``{% set %}`` blocks, literal template text) counts against one allowance, so
no buffer can grow past it; operations that could build one huge value in a single step
(``*``, ``**``, ``%``, joins, replaces, padding widths, ``range``) are checked before they
run, and every value built is checked after. Anything wrong raises ``TemplateError`` with a
sentence saying what.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_context
from jinja2.visitor import NodeTransformer

MAX_RANGE = 100_000
"""Most items one ``range()`` may have."""
MAX_ITEMS = 1_000_000
"""Most items one list, tuple or dict built by a template may hold."""
MAX_WIDTH = 10_000
"""Largest integer argument to padding-like filters and methods (center, indent, …)."""
MAX_INT_BITS = 1 << 16
"""Largest integer, in bits, a template may compute."""
MAX_DEPTH = 256
"""Most levels of lists and dicts inside one another a value the template handles may nest:
twice what a request body may (``schemas.json_depth.MAX_JSON_DEPTH``), far under Python's
recursion limit, so ``tojson`` of a self-nesting value built in a loop is refused first."""
_WIDTH_ARGS = frozenset(
    {"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap", "truncate",
     "slice", "batch", "tojson", "pprint"}
)
_ITEM_FILTERS = frozenset(
    {"list", "sort", "dictsort", "unique", "groupby", "batch", "slice", "reverse", "max",
     "min", "sum", "map", "select", "reject", "selectattr", "rejectattr"}
)
"""Filters that walk every item of their input: refused before a walk past ``MAX_ITEMS``."""
MAX_WRAP_COST = 20_000_000_000
"""Largest ``len(text) ** 2 / width`` for ``wordwrap``, whose cost on long words is quadratic
(one word of a million characters at width 1 takes about nine seconds, in one call the
deadline cannot interrupt)."""
_WIDE_FORMAT = re.compile(r"%[-#0 +]*(?:\*|\d{5,}|\d*\.(?:\*|\d{5,}))|\{[^{}]*:[^{}]*(?:\d{5,}|\{)")


_PASSED_ARGS = (Context, EvalContext, jinja2.Environment)
"""What jinja passes to ``pass_context``-style filters ahead of their value."""


class TemplateError(ValueError):
    """A chat template could not be compiled or rendered; the message says why."""


class _Budget:
    """Deadline and written-text allowance of one render."""

    def __init__(self, time_limit_s: float, max_written: int) -> None:
        self.time_limit_s = time_limit_s
        self.deadline = time.monotonic() + time_limit_s
        self.left = max_written
        self.max_written = max_written

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(
                f"the chat template ran longer than {self.time_limit_s:g} s and was stopped as "
                "a runaway loop"
            )

    def write(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise TemplateError(
                f"the chat template wrote more than {self.max_written} characters and was "
                "stopped as an output bomb"
            )


# Hooks find the render they belong to here; renders on other threads have their own.
_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("budget", default=None)


def _tick() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.tick()


def _approx_len(value: object, limit: int, depth: int = 0) -> int:
    """Rough length of ``value`` as text; each shared reference counts again; stops past limit."""
    if isinstance(value, str | bytes):
        return len(value)
    if not isinstance(value, list | tuple | dict | set | frozenset):
        return 8
    if depth >= MAX_DEPTH:
        raise TemplateError(f"the chat template used a value nested more than {MAX_DEPTH} "
                            "levels deep")
    total = 2
    # A dict's key and value sit one level down, as in its JSON: a tool's schema nested as
    # deep as a request may carry (schemas.json_depth) is measured, not refused.
    for item in _parts(value):
        total += _approx_len(item, limit, depth + 1) + 2
        if total > limit:
            break
    return total


def _parts(value: list | tuple | dict | set | frozenset) -> Iterator[object]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield item
    else:
        yield from value


def _materialised(args: tuple[Any, ...]) -> tuple[Any, ...]:
    # A lazy map/select result can repeat one big value many times; as a list it is measured.
    return tuple(list(a) if isinstance(a, Iterator) else a for a in args)


def _too_big(what: str, size: int, limit: int, unit: str = "characters") -> TemplateError:
    return TemplateError(
        f"the chat template tried to build {what} of about {size} {unit}; at most {limit} "
        "are allowed"
    )


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # HF's tojson: no HTML escaping, unicode kept; the canonical tool-call form relies on it.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
        sort_keys=sort_keys,
    )


class _GenerationTag(Extension):
    """Accepts HF's ``{% generation %}…{% endgeneration %}`` and renders its body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Instrument(NodeTransformer):
    """Routes loops, concatenations and literal text through the budget filters."""

    def _wrap(self, node: nodes.Node, name: str) -> nodes.Filter:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = self._wrap(node.iter, "_budget_iter")
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        return self._wrap(node, "_budget_value")

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        # As Const nodes, literal text goes through finalize at run time and is counted.
        node.nodes = [
            nodes.Const(n.data, lineno=n.lineno) if isinstance(n, nodes.TemplateData) else n
            for n in node.nodes
        ]
        return node


class GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with time, size and written-text limits."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, max_chars: int) -> None:
        super().__init__(
            trim_blocks=True, lstrip_blocks=True, autoescape=False, optimized=False,
            extensions=[loopcontrols, _GenerationTag], finalize=self._finalize,
        )
        self.max_chars = max_chars
        self.filters["tojson"] = tojson
        self.filters = {name: self._guard_filter(name, f) for name, f in self.filters.items()}
        self.filters["_budget_iter"] = self._budget_iter
        self.filters["_budget_value"] = self._budget_value
        self.globals.pop("lipsum", None)
        self.globals.update(
            range=self._range, raise_exception=_raise_exception, strftime_now=_strftime_now
        )

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = _Instrument().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    # -- value checks -------------------------------------------------------------------
    def checked(self, value: Any) -> Any:
        if isinstance(value, str) and len(value) > self.max_chars:
            raise _too_big("a string", len(value), self.max_chars)
        if isinstance(value, list | tuple | dict | set) and len(value) > MAX_ITEMS:
            raise _too_big("a collection", len(value), MAX_ITEMS, "items")
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise _too_big("an integer", value.bit_length(), MAX_INT_BITS, "bits")
        return value

    def _precheck(self, name: str, owner: object, args: Sequence[object]) -> None:
        """Refuse a call whose result would be huge before it is built."""
        if name in _WIDTH_ARGS:
            for a in args:
                if isinstance(a, int) and abs(a) > MAX_WIDTH:
                    raise _too_big(f"{name}() with width", abs(a), MAX_WIDTH, "columns")
        walked = len(owner) if isinstance(owner, str | list | tuple | dict | range) else 0
        if name in _ITEM_FILTERS and walked > MAX_ITEMS:
            raise _too_big(f"{name}() over an input", walked, MAX_ITEMS, "items")
        if name == "wordwrap" and isinstance(owner, str):
            width = next((a for a in args if type(a) is int), 79)
            if len(owner) ** 2 // max(width, 1) > MAX_WRAP_COST:
                raise TemplateError(
                    f"the chat template tried to wrap {len(owner)} characters at width "
                    f"{width}, which would take too long; wrap shorter text or use a wider width"
                )
        fmt = owner if name in ("format", "format_map") else None
        if isinstance(fmt, str) and _WIDE_FORMAT.search(fmt):
            raise TemplateError("the chat template used a format width of 10000 or more")
        limit = self.max_chars
        size = _approx_len(owner, limit) + sum(_approx_len(a, limit) for a in args)
        items = next((a for a in args if isinstance(a, list | tuple)), ())
        if name == "join" and isinstance(owner, str):
            size += len(owner) * len(items)
        elif name == "replace" and isinstance(owner, str) and len(args) >= 2:
            old, new = args[0], args[1]
            if isinstance(old, str) and isinstance(new, str):
                size += (owner.count(old) if old else len(owner) + 1) * len(new)
        elif name in ("indent", "wordwrap") and isinstance(owner, str):
            width = next((a for a in args if type(a) is int), 4)
            pad = max((len(a) for a in args if isinstance(a, str)), default=width)
            lines = owner.count("\n") if name == "indent" else len(owner) // max(width, 1)
            size += (lines + 1) * pad
        if size > limit:
            raise _too_big(f"the result of {name}", size, limit)

    # -- hooks --------------------------------------------------------------------------
    def _guard_filter(self, name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            _tick()
            args = _materialised(args)
            values = [a for a in args if not isinstance(a, _PASSED_ARGS)]
            if name == "join" and len(values) >= 2:
                values = [values[1], values[0], *values[2:]]  # separator acts as owner
            head = values[0] if values else None
            self._precheck(name, head, [*values[1:], *kwargs.values()])
            return self.checked(f(*args, **kwargs))

        return guarded

    @pass_context
    def _budget_iter(self, context: Context, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            _tick()
            yield item

    @pass_context
    def _budget_value(self, context: Context, value: Any) -> Any:
        return self.checked(value)

    @pass_context
    def _finalize(self, context: Context, value: Any) -> str:
        if not isinstance(value, str):
            self._precheck("str", value, ())
        text = value if isinstance(value, str) else str(value)
        budget = _BUDGET.get()
        if budget is not None:
            budget.tick()
            budget.write(len(text))
        return text

    def _range(self, *args: int) -> range:
        try:
            r = range(*args)
            n = len(r)
        except (OverflowError, TypeError) as e:
            raise TemplateError(f"the chat template called range{args}, which fails: {e}") from e
        if n > MAX_RANGE:
            raise _too_big("a range", n, MAX_RANGE, "items")
        return r

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        _tick()
        target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            args = _materialised(args)
            self._precheck(getattr(target, "__name__", ""), owner, [*args, *kwargs.values()])
        return self.checked(super().call(context, obj, *args, **kwargs))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "*" and isinstance(left, int) and not isinstance(right, int):
            left, right = right, left
        if operator == "*" and isinstance(right, int) and not isinstance(left, int | float):
            size = _approx_len(left, self.max_chars) * max(right, 0)
            if size > self.max_chars:
                raise _too_big("a repeated sequence", size, self.max_chars)
        if operator == "**" and isinstance(right, int) and right > 1024:
            raise TemplateError(
                f"the chat template raised a number to the power {right}; exponents above 1024 "
                "are refused"
            )
        if operator == "%" and isinstance(left, str):
            self._precheck("format", left, [right])
        return self.checked(super().call_binop(context, operator, left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return self.checked(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return self.checked(super().getitem(obj, argument))

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise TemplateError(
            f"the chat template tried to reach {attribute!r} of a {type(obj).__name__}, which "
            "the sandbox forbids"
        )


def render_guarded(
    template: jinja2.Template, context: Mapping[str, object], time_limit_s: float, max_written: int
) -> str:
    """Render ``template`` (from a ``GuardedEnvironment``) within the time and text limits."""
    token = _BUDGET.set(_Budget(time_limit_s, max_written))
    try:
        return template.render(context)
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"the chat template broke the sandbox rules: {e}") from e
    except RecursionError as e:
        raise TemplateError("the chat template recursed too deeply") from e
    except Exception as e:  # any failure of untrusted code is the template's fault
        raise TemplateError(f"the chat template failed: {type(e).__name__}: {e}") from e
    finally:
        _BUDGET.reset(token)
