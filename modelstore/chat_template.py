"""The sandbox chat templates render in, under a budget; shared by the store and the runtime.

Templates ship inside model files and ModelSpecs and are untrusted input (CVE-2024-34359 was
remote code execution through a GGUF chat template), so they render in Jinja's immutable
sandbox, with the helpers Hugging Face gives templates (``raise_exception``, ``strftime_now``,
``tojson``). Jinja's sandbox stops code execution but not exhaustion: a nested ``range`` loop,
a recursive macro or ``'x'|center(8000000000)`` froze or OOM-killed the daemon. So every render
here runs under a ``RenderBudget`` (loop iterations, characters written, size of every string
or list a template builds, call depth and wall-clock time), enforced inside the sandbox by
hooks Jinja offers (intercepted operators, ``call``, ``finalize``, filters) and by wrapping each
``for`` loop and ``~`` in a counting filter when a template is compiled. No library does this
(Jinja's sandbox documents that it does not), hence the hand-written hooks.

The budget state lives in a ``ContextVar``, so a render is safe on any thread (the daemon renders
on worker threads, off the event loop). ``modelstore`` uses ``probe_template`` to refuse a
hostile template at import and create, before it is stored; ``mlxserve.prompts`` renders chats.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

from jinja2 import Template, TemplateSyntaxError, nodes
from jinja2 import TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

from modelstore.errors import TemplateError

MAX_LOOP_ITERATIONS = 1_000_000
"""Items all ``for`` loops of one render may visit together (a chat needs a few per message)."""
RENDER_TIME_LIMIT_S = 2.0
"""Wall-clock time one render may take; an honest chat template renders in milliseconds."""
OUTPUT_CHARS_FLOOR = 1_000_000
OUTPUT_CHARS_PER_INPUT_CHAR = 4
"""Characters a render may write, in total, and the longest string or list it may build:
the floor plus this many per character of the conversation it was given (a prompt is about
as long as the messages it shows, so a large request still renders)."""
MAX_CALL_DEPTH = 64
"""Nested macro / function calls: recursive JSON-schema macros need a handful."""
MAX_FORMAT_WIDTH = 10_000
"""Widest field a ``%``- or ``str.format`` spec may ask for (``'%99999999999s'``)."""
MAX_JSON_INDENT = 16
MAX_INT_BITS = 1 << 16
"""Largest integer arithmetic may build (repeated squaring doubles the bits each time)."""
MAX_ITEMS = 100_000
"""Longest list, tuple or mapping a template may build (as Jinja's sandbox bounds ``range``),
whatever the conversation's size: sorting or de-duplicating one costs at most milliseconds,
where a list of the conversation's characters took minutes (issue 21). A chat has at most
``mlxserve/server/limits.py``'s 10,000 messages."""
_WIDTH_ARGUMENT_METHODS = frozenset({"center", "ljust", "rjust", "zfill"})
_REFUSED_METHODS = frozenset({"translate", "maketrans"})
"""String methods whose output size a caller-built table decides: no chat template uses them."""
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_STRINGIFYING_FILTERS = frozenset(
    {"string", "tojson", "pprint", "join", "format", "e", "escape", "forceescape", "safe",
     "urlencode", "indent", "center", "wordwrap", "truncate", "replace", "trim", "upper",
     "lower", "title", "capitalize", "striptags", "urlize", "wordcount"}
)  # fmt: skip
_ITERATE = "_budget_iterate"
_OPERAND = "_budget_operand"
_SIZED = "_budget_sized"
_WRITE = "_budget_write"


@dataclass
class RenderBudget:
    """What one render may still spend; exceeding any part raises ``SecurityError``."""

    max_chars: int
    deadline: float
    iterations: int = 0
    written: int = 0
    depth: int = 0

    def tick(self) -> None:
        """Every step checks the clock (~50 ns): the budget is one of time, not of steps, and
        one step can be a sort of a large list."""
        if time.monotonic() > self.deadline:
            raise SecurityError(f"rendering took longer than {RENDER_TIME_LIMIT_S:g} s")

    def size(self, value: Any, what: str = "a value") -> Any:
        """``value`` if its (shallow) length is within the budget."""
        if isinstance(value, str | bytes | list | tuple | dict) and len(value) > self.max_chars:
            raise SecurityError(f"{what} of {len(value)} items is over the template budget")
        if isinstance(value, list | tuple | dict | set | frozenset) and len(value) > MAX_ITEMS:
            raise SecurityError(f"{what} of {len(value)} items is over {MAX_ITEMS} items")
        return value

    def expanded(self, value: Any) -> int:
        """About how many characters writing ``value`` out as text takes, if within the budget.

        Containers can share children, so a small DAG (``[l, l]`` nested sixty times) prints
        as 2**60 items: walk it with a step count that stops at the budget instead.
        """
        steps = 0
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, str | bytes):
                steps += len(item)
            elif isinstance(item, dict):
                steps += 1 + len(item)
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list | tuple | set | frozenset):
                steps += 1 + len(item)
                stack.extend(item)
            else:
                steps += 1
            if steps > self.max_chars:
                raise SecurityError("a value too large to write out is over the template budget")
        return steps


class HostileTemplateError(TemplateError):
    """A render stopped by the sandbox or the budget: the template, not the conversation, is
    at fault (same code as every template error)."""


_BUDGET: contextvars.ContextVar[RenderBudget | None] = contextvars.ContextVar(
    "chat_template_budget", default=None
)


def _budget() -> RenderBudget:
    """The running render's budget; outside a render (Jinja folding constants while it
    compiles) there is none, and refusing makes Jinja leave the expression to render time."""
    budget = _BUDGET.get()
    if budget is None:
        raise SecurityError("evaluated outside a render")
    return budget


def _check_percent_format(template: str) -> None:
    for match in _PERCENT_SPEC.finditer(template):
        for number in match.groups():
            if number == "*" or (number and int(number) > MAX_FORMAT_WIDTH):
                raise SecurityError("a %-format field wider than the template budget")


def _check_brace_format(template: str) -> None:
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise SecurityError(f"bad format string: {exc}") from None
    for _, _, spec, _ in fields:
        if not spec:
            continue
        if "{" in spec:
            raise SecurityError("nested format fields are not allowed in templates")
        if any(int(number) > MAX_FORMAT_WIDTH for number in re.findall(r"\d+", spec)):
            raise SecurityError("a format field wider than the template budget")


def _joined(items: Iterable[Any], separator: Any) -> list[Any]:
    """``items`` as a list (a generator is consumed here, so the caller joins this list), if
    joining them with ``separator`` stays within the budget."""
    budget = _budget()
    items = list(_iterate(items))
    total = max(len(items) - 1, 0) * len(str(separator))
    for item in items:
        total += budget.expanded(item)
    if total > budget.max_chars:
        raise SecurityError("a join over the template budget")
    return items


def _replaced_size(text: str, old: str, new: str, count: int | None) -> int:
    occurrences = text.count(old) if old else len(text) + 1
    if count is not None and count >= 0:
        occurrences = min(occurrences, count)
    return len(text) + occurrences * (len(new) - len(old))


def _check_string_method(owner: str | bytes, name: str, args: tuple, kwargs: dict) -> tuple:
    """Methods of a string whose result can be far larger than the string itself; returns the
    arguments to call it with."""
    budget = _budget()
    if name in _REFUSED_METHODS:
        raise SecurityError(f"str.{name} is not available to templates")
    numbers = [a for a in (*args, *kwargs.values()) if isinstance(a, int)]
    if name in _WIDTH_ARGUMENT_METHODS and any(n > budget.max_chars for n in numbers):
        raise SecurityError(f"str.{name} wider than the template budget")
    if name == "expandtabs" and len(owner) * max(numbers or [8]) > budget.max_chars:
        raise SecurityError("str.expandtabs result over the template budget")
    if name == "join" and args:
        args = (_joined(args[0], owner), *args[1:])
    if name == "replace" and len(args) >= 2 and isinstance(owner, str):
        count = args[2] if len(args) > 2 else kwargs.get("count")
        if _replaced_size(owner, str(args[0]), str(args[1]), count) > budget.max_chars:
            raise SecurityError("a replace over the template budget")
    return args


def _check_filter(name: str, value: Any, args: tuple, kwargs: dict) -> Any:
    """What a filter would build, checked before it allocates; returns the value to filter."""
    budget = _budget()
    if name in _STRINGIFYING_FILTERS:
        budget.expanded(value)
        for argument in (*args, *kwargs.values()):
            budget.expanded(argument)
    if any(isinstance(a, int) and a > budget.max_chars for a in (*args, *kwargs.values())):
        raise SecurityError(f"|{name} argument over the template budget")
    text = value if isinstance(value, str) else None
    if name == "indent" and text is not None:
        width = args[0] if args else kwargs.get("width", 4)
        width = len(width) if isinstance(width, str) else int(width)
        if len(text) + (text.count("\n") + 1) * width > budget.max_chars:
            raise SecurityError("|indent result over the template budget")
    elif name == "join":
        separator = args[0] if args else kwargs.get("d", "")
        if kwargs.get("attribute") is None and len(args) < 2:
            value = _joined(value, separator)
    elif name == "replace" and text is not None and len(args) >= 2:
        count = args[2] if len(args) > 2 else kwargs.get("count")
        if _replaced_size(text, str(args[0]), str(args[1]), count) > budget.max_chars:
            raise SecurityError("|replace result over the template budget")
    elif name == "format" and text is not None:
        _check_percent_format(text)
    elif name == "wordwrap" and text is not None:
        wrapstring = args[2] if len(args) > 2 else kwargs.get("wrapstring") or "\n"
        if len(text) * (1 + len(str(wrapstring))) > budget.max_chars:
            raise SecurityError("|wordwrap result over the template budget")
    elif name == "tojson":
        indent = args[0] if args else kwargs.get("indent")
        width = len(indent) if isinstance(indent, str) else int(indent or 0)
        if width > MAX_JSON_INDENT:
            raise SecurityError("|tojson indent over the template budget")
    elif name == "sum":
        start = args[1] if len(args) > 1 else kwargs.get("start", 0)
        if not isinstance(start, int | float):
            raise SecurityError("|sum over sequences is not available to templates")
    return value


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with its result size and its arguments checked against the budget."""
    passes_context = getattr(function, "jinja_pass_arg", None) is not None

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        head, rest = (args[:1], args[1:]) if passes_context else ((), args)
        if not rest:
            return budget.size(function(*head, **kwargs), f"the result of |{name}")
        value = _check_filter(name, rest[0], rest[1:], kwargs)
        result = function(*head, value, *rest[1:], **kwargs)
        return budget.size(result, f"the result of |{name}")

    return bounded


def _iterate(iterable: Any) -> Iterator[Any]:
    budget = _budget()
    for item in iterable:
        budget.iterations += 1
        if budget.iterations > MAX_LOOP_ITERATIONS:
            raise SecurityError(f"more than {MAX_LOOP_ITERATIONS} loop iterations")
        budget.tick()
        yield item


def _write(value: Any) -> Any:
    """Every piece of output (of the template, a macro or a ``set`` block) counts."""
    budget = _budget()
    budget.tick()
    budget.written += len(value) if isinstance(value, str) else budget.expanded(value)
    if budget.written > budget.max_chars:
        raise SecurityError(f"output longer than {budget.max_chars} characters")
    return value


def _operand(value: Any) -> Any:
    """A ``~`` operand, if writing it out as text stays within the budget."""
    _budget().expanded(value)
    return value


class _Budgeted(NodeTransformer):
    """Routes every loop, ``~`` operand and output through the budget's counting filters."""

    def _filter(self, node: nodes.Expr, name: str) -> nodes.Filter:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self._filter(node.iter, _ITERATE)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [self._filter(child, _OPERAND) for child in node.nodes]
        return self._filter(node, _SIZED)

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [
            nodes.Filter(
                nodes.Const(child.data) if isinstance(child, nodes.TemplateData) else child,
                _WRITE, [], [], None, None, lineno=child.lineno,
            )
            for child in node.nodes
        ]  # fmt: skip
        return node


class TemplateEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, made stricter in ways no honest chat template notices.

    An unsafe attribute (``''.__class__``) fails at once instead of as a silent undefined
    value, and every operator, call and filter that can build a large value is bounded.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r}")

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        if operator_ == "**":
            if isinstance(right, int) and abs(right) > 1000:
                raise SecurityError("exponent too large")
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and right > 0
                and abs(left).bit_length() * right > MAX_INT_BITS
            ):
                raise SecurityError("a power over the template budget")
            return left**right
        if operator_ == "%":
            if isinstance(left, str):
                _check_percent_format(left)
                budget.expanded(right)
            return budget.size(left % right, "a %-formatted string")
        if operator_ == "+":
            sequences = all(isinstance(side, str | list | tuple) for side in (left, right))
            if sequences and len(left) + len(right) > budget.max_chars:
                raise SecurityError("a concatenation over the template budget")
            return budget.size(left + right, "a concatenation")
        for sequence, count in ((left, right), (right, left)):
            if (
                isinstance(sequence, str | bytes | list | tuple)
                and isinstance(count, int)
                and len(sequence) * count > budget.max_chars
            ):
                raise SecurityError("sequence repetition too large")
            repeated_list = isinstance(sequence, list | tuple) and isinstance(count, int)
            if repeated_list and len(sequence) * count > MAX_ITEMS:
                raise SecurityError(f"a repeated list of over {MAX_ITEMS} items")
        integers = isinstance(left, int) and isinstance(right, int)
        if integers and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise SecurityError("a product over the template budget")
        return left * right

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str | bytes):
            args = _check_string_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        if budget.depth >= MAX_CALL_DEPTH:
            raise SecurityError(f"calls nested deeper than {MAX_CALL_DEPTH} (recursion?)")
        budget.depth += 1
        try:
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        return budget.size(result, "a call's result")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        formatter = super().wrap_str_format(value)
        if formatter is None:
            return None
        template = value.__self__

        def bounded(*args: Any, **kwargs: Any) -> str:
            budget = _budget()
            _check_brace_format(str(template))
            for argument in (*args, *kwargs.values()):
                budget.expanded(argument)
            return budget.size(formatter(*args, **kwargs), "a formatted string")

        return bounded


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(f"the chat template refused the conversation: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Hugging Face's ``tojson``: Jinja's own escapes HTML and sorts keys; models never saw that."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> TemplateEnvironment:
    environment = TemplateEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols"],
    )
    environment.filters["tojson"] = _tojson
    environment.filters = {
        name: _bounded_filter(name, function) for name, function in environment.filters.items()
    }
    environment.filters.update({_ITERATE: _iterate, _OPERAND: _operand, _WRITE: _write})
    environment.filters[_SIZED] = lambda value: _budget().size(value, "a joined string")
    environment.globals.pop("lipsum", None)
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


ENVIRONMENT = _environment()


@lru_cache(maxsize=32)
def compile_template(template: str) -> Template:
    """Compiled once per template text (compiling costs far more than rendering); raises
    ``TemplateError`` with ``details['line']`` if it does not compile."""
    try:
        tree = ENVIRONMENT.parse(template)
        return ENVIRONMENT.from_string(_Budgeted().visit(tree))
    except TemplateSyntaxError as exc:
        raise TemplateError(
            f"the chat template does not compile (line {exc.lineno}): {exc.message}",
            line=exc.lineno,
        ) from None


def _input_chars(context: dict[str, Any]) -> int:
    try:
        return len(json.dumps(context, default=str))
    except (TypeError, ValueError, RecursionError):
        return 0


def render_template(template: str, context: dict[str, Any]) -> str:
    """``template`` rendered with ``context`` under a fresh budget; any failure, hostile or
    not, becomes ``TemplateError``."""
    compiled = compile_template(template)
    budget = RenderBudget(
        max_chars=OUTPUT_CHARS_FLOOR + OUTPUT_CHARS_PER_INPUT_CHAR * _input_chars(context),
        deadline=time.monotonic() + RENDER_TIME_LIMIT_S,
    )
    token = _BUDGET.set(budget)
    try:
        return compiled.render(**context)
    except TemplateError:
        raise
    except SecurityError as exc:
        raise HostileTemplateError(
            f"the chat template tried an unsafe or over-budget operation: {exc}"
        ) from None
    except RecursionError:
        raise HostileTemplateError("the chat template recursed too deeply") from None
    except MemoryError:
        raise HostileTemplateError("the chat template ran out of memory") from None
    except (JinjaTemplateError, TypeError, ValueError, KeyError, IndexError, OverflowError,
            AttributeError, ZeroDivisionError) as exc:  # fmt: skip
        raise TemplateError(f"the chat template failed: {exc}") from None
    finally:
        _BUDGET.reset(token)


PROBE_CONVERSATIONS: tuple[list[dict[str, Any]], ...] = (
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
)
"""Conversations every chat template must render within the budget to be stored."""


def refuse_hostile_template(template: str) -> None:
    """``probe_template`` for a template that came inside model files: one that does not
    compile here is let through (it fails at chat time, as it always did) unless it is hostile."""
    try:
        probe_template(template)
    except HostileTemplateError:
        raise
    except TemplateError:
        return


def probe_template(template: str) -> None:
    """Raise ``TemplateError`` if ``template`` does not compile, or if rendering an ordinary
    conversation breaks the sandbox or the budget (a hostile template), so it is refused before
    it is stored. A template that merely refuses a probe (``raise_exception``, a role it does
    not know) is not hostile and passes."""
    compile_template(template)
    for messages in PROBE_CONVERSATIONS:
        context = {
            "messages": messages,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "add_generation_prompt": True,
            "tools": None,
        }
        try:
            render_template(template, context)
        except HostileTemplateError:
            raise
        except TemplateError:
            continue
