"""Chat messages -> one prompt string, through the model's Jinja chat template.

Templates ship inside model files and are untrusted input (CVE-2024-34359 was remote code
execution through a GGUF chat template), so they render in Jinja's immutable sandbox, with
the helpers Hugging Face gives templates (``raise_exception``, ``strftime_now``, ``tojson``).
One builder for every runner: the same messages give the same prompt on MLX and llama.cpp.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError as JinjaTemplateError
from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from mlxserve.errors import TemplateError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""For models that ship no template at all."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the chat template refused the conversation: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(template)
    except TemplateSyntaxError as exc:
        raise TemplateError(
            f"the chat template does not compile (line {exc.lineno}): {exc.message}",
            line=exc.lineno,
        ) from None


def compile_check(template: str) -> None:
    _compile(template)


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
    except (JinjaTemplateError, TypeError, ValueError, KeyError) as exc:
        raise TemplateError(f"the chat template failed: {exc}") from None
