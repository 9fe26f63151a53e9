"""Chat messages -> one prompt string, through the model's Jinja chat template.

Templates are untrusted input: they render in the sandbox and under the budget of
``modelstore.chat_template`` (shared with the store, which probes a template before storing
it), with the helpers Hugging Face gives templates. One builder for every runner: the same
messages give the same prompt on MLX and llama.cpp. A render may run on any thread; the daemon
renders off its event loop.

Messages pass to the template as they are (roles system/user/assistant/tool, an assistant's
``tool_calls``), since each template has its own idea of how to show them. Raw mode (a
``/api/generate`` with ``raw``) skips templating: the prompt goes to the runner unchanged.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateSyntaxError, meta

from modelstore.chat_template import ENVIRONMENT, compile_template, render_template

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""For models that ship no template at all."""


def compile_check(template: str) -> None:
    """Raise ``TemplateError`` (with ``details['line']``) unless the template compiles in the
    sandbox chats render in."""
    compile_template(template)


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
    """The prompt for ``messages``; any failure of the template, or a render over its
    budget, becomes ``TemplateError``."""
    context = {
        "messages": messages,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "add_generation_prompt": add_generation_prompt,
        "tools": tools,
        **extra,
    }
    return render_template(template, context)


def template_variables(template: str) -> frozenset[str]:
    """The names a template reads from its context (``tools``, ``enable_thinking``, ...)."""
    try:
        return frozenset(meta.find_undeclared_variables(ENVIRONMENT.parse(template)))
    except TemplateSyntaxError:
        return frozenset()
