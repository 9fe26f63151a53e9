"""Chat messages -> one prompt string, through the model's Jinja chat template.

Templates ship inside model files and are untrusted input (CVE-2024-34359 was remote code
execution through a GGUF chat template), so they render in Jinja's immutable sandbox, with
the helpers Hugging Face gives templates (``raise_exception``, ``strftime_now``, ``tojson``).
One builder for every runner: the same messages give the same prompt on MLX and llama.cpp.

Messages pass to the template as they are (roles system/user/assistant/tool, an assistant's
``tool_calls``), since each template has its own idea of how to show them. Raw mode (a
``/api/generate`` with ``raw``) skips templating: the prompt goes to the runner unchanged.
"""

from __future__ import annotations

import json
import operator
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

from jinja2 import Template, TemplateSyntaxError, meta
from jinja2 import TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from mlxserve.errors import TemplateError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""For models that ship no template at all."""

MAX_SEQUENCE_PRODUCT = 1_000_000
"""Longest string or list a template may build with ``*``: a cheap guard against memory bombs."""


class _TemplateEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, made stricter in two ways that no honest chat template notices.

    Jinja's sandbox answers an unsafe attribute (``''.__class__``) with an undefined value
    that fails only when used further; this fails at once, so a probing template is an
    error rather than a silent empty string. And ``'x' * 10**10`` is refused before it
    allocates.
    """

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r}")

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "**":
            if isinstance(right, int) and abs(right) > 1000:
                raise SecurityError("exponent too large")
            return left**right
        for sequence, count in ((left, right), (right, left)):
            if (
                isinstance(sequence, str | list | tuple)
                and isinstance(count, int)
                and len(sequence) * count > MAX_SEQUENCE_PRODUCT
            ):
                raise SecurityError("sequence repetition too large")
        return operator.mul(left, right)


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


def _environment() -> _TemplateEnvironment:
    environment = _TemplateEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


_ENVIRONMENT = _environment()


@lru_cache(maxsize=32)
def _compile(template: str) -> Template:
    """Compiled once per template text: compiling costs far more than rendering."""
    try:
        return _ENVIRONMENT.from_string(template)
    except TemplateSyntaxError as exc:
        raise TemplateError(
            f"the chat template does not compile (line {exc.lineno}): {exc.message}",
            line=exc.lineno,
        ) from None


def compile_check(template: str) -> None:
    """Raise ``TemplateError`` (with ``details['line']``) unless the template compiles here,
    in the sandbox chats render in. (``modelstore.spec`` checks a ModelSpec's template with
    the same Jinja extensions but without importing this package.)"""
    _compile(template)


def template_variables(template: str) -> frozenset[str]:
    """The names a template reads from its context (``tools``, ``enable_thinking``, ...)."""
    try:
        return frozenset(meta.find_undeclared_variables(_ENVIRONMENT.parse(template)))
    except TemplateSyntaxError:
        return frozenset()


def build_messages(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """The conversation with the model's default system prompt, unless it has its own."""
    if system and not any(message.get("role") == "system" for message in messages):
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """The prompt for ``messages``; any failure of the template becomes ``TemplateError``."""
    compiled = _compile(template)
    try:
        return compiled.render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **extra,
        )
    except TemplateError:
        raise
    except SecurityError as exc:
        raise TemplateError(f"the chat template tried an unsafe operation: {exc}") from None
    except (JinjaTemplateError, TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
        raise TemplateError(f"the chat template failed: {exc}") from None
