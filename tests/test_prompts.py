"""Chat templates: rendered like Hugging Face does, and untrusted ones kept in the sandbox."""

from __future__ import annotations

import re
from datetime import datetime

import pytest

from mlxserve.errors import TemplateError
from mlxserve.prompts import CHATML_TEMPLATE, build_messages, compile_check, render_chat
from modelstore.chat_template import probe_template

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
]


def test_chatml_renders_system_user_and_assistant() -> None:
    prompt = render_chat(CHATML_TEMPLATE, CONVERSATION, add_generation_prompt=False)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_add_generation_prompt_opens_the_assistant_turn() -> None:
    prompt = render_chat(CHATML_TEMPLATE, CONVERSATION[:2])
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chatml_accepts_an_assistant_message_without_content() -> None:
    messages = [{"role": "assistant", "content": None, "tool_calls": []}]
    assert render_chat(CHATML_TEMPLATE, messages, add_generation_prompt=False) == (
        "<|im_start|>assistant\n<|im_end|>\n"
    )


def test_bos_and_eos_tokens_reach_the_template() -> None:
    template = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    assert render_chat(template, CONVERSATION[1:2], bos_token="<s>", eos_token="</s>") == (
        "<s>Hi</s>"
    )


def test_trim_blocks_and_lstrip_blocks_are_on() -> None:
    template = (
        "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}"
    )
    assert render_chat(template, CONVERSATION[1:2]) == "Hi\n"


def test_loop_controls_are_available() -> None:
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m.role }} {% endfor %}"
    )
    assert render_chat(template, CONVERSATION) == "user assistant "


def test_raise_exception_becomes_template_error() -> None:
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(TemplateError, match="user first") as info:
        render_chat(template, CONVERSATION)
    assert info.value.code == "template_error"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__base__ }}",
        "{{ ''['__class__'] }}",
        "{{ messages.append(1) }}",
    ],
)
def test_sandbox_refuses_unsafe_access(template: str) -> None:
    with pytest.raises(TemplateError) as info:
        render_chat(template, [{"role": "user", "content": "x"}])
    assert info.value.code == "template_error"


def test_sandbox_refuses_a_memory_bomb() -> None:
    with pytest.raises(TemplateError):
        render_chat("{{ 'x' * 10000000000 }}", [])


def test_ordinary_arithmetic_still_works() -> None:
    assert render_chat("{{ '-' * 3 }}{{ 2 ** 3 }}{{ 3 * 4 }}", []) == "---812"


def test_tools_and_tool_calls_pass_through() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    template = (
        "{% for t in tools %}{{ t.function.name }};{% endfor %}"
        "{% for m in messages %}{{ m.role }}:"
        "{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}{% endfor %}"
        "{{ m.content }}|{% endfor %}"
    )
    assert render_chat(template, messages, tools=tools) == (
        'get_weather;user:Weather in Zürich?|assistant:{"city": "Zürich"}|tool:sunny|'
    )


def test_tojson_keeps_non_ascii_and_order_and_takes_indent() -> None:
    template = "{{ {'b': 'é', 'a': '<x>'} | tojson }}|{{ [1] | tojson(indent=2) }}"
    assert render_chat(template, []) == '{"b": "é", "a": "<x>"}|[\n  1\n]'


def test_strftime_now_formats_the_current_date() -> None:
    rendered = render_chat("{{ strftime_now('%Y-%m-%d') }}", [])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", rendered)
    assert rendered[:4] == str(datetime.now().year)


def test_extra_variables_reach_the_template() -> None:
    assert render_chat("{{ enable_thinking }}", [], enable_thinking=False) == "False"


def test_compile_check_reports_the_line() -> None:
    with pytest.raises(TemplateError, match="line 3") as info:
        compile_check("{% for m in messages %}\n{{ m.content }}\n{% endfor %\n")
    assert info.value.details["line"] == 3


def test_compile_check_accepts_a_valid_template() -> None:
    compile_check(CHATML_TEMPLATE)


def test_render_error_becomes_template_error() -> None:
    with pytest.raises(TemplateError):
        render_chat("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "x"}])


def test_build_messages_prepends_the_default_system_prompt() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert build_messages(messages, "Be kind.") == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
    ]


def test_build_messages_keeps_the_conversations_own_system_prompt() -> None:
    assert build_messages(CONVERSATION, "Be kind.") == CONVERSATION


def test_build_messages_without_a_default_is_unchanged() -> None:
    assert build_messages(CONVERSATION[1:], None) == CONVERSATION[1:]


HOSTILE_TEMPLATES = {
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "nested range loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    ),
    "output in a loop": "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
    "center": "{{ ('x'|center(8000000000))|length }}",
    "str.center": "{{ 'x'.center(8000000000)|length }}",
    "ljust": "{{ 'x'.ljust(8000000000) }}",
    "indent": "{{ ('x\\n' * 100000)|indent(100000) }}",
    "format filter": "{{ '%99999999999s'|format('x') }}",
    "percent formatting": "{{ '%99999999999s' % 'x' }}",
    "percent star width": "{{ '%*s' % (99999999999, 'x') }}",
    "str.format width": "{{ '{:>99999999999}'.format('x') }}",
    "str.format nested width": "{{ '{:>{w}}'.format('x', w=99999999999) }}",
    "namespace doubling with ~": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"
    ),
    "namespace doubling with +": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}"
    ),
    "list doubling": (
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}"
        "{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}"
    ),
    "shared-list blow-up": (
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}"
        "{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}"
    ),
    "join": "{{ range(100000)|join('x' * 100000) }}",
    "str.join": "{{ ('x' * 100000).join(['a'] * 100000) }}",
    "replace": "{{ ('x' * 100000)|replace('x', 'y' * 100000) }}",
    "string multiplication": "{{ 'x' * 10000000000 }}",
    "list multiplication": "{{ ([1] * 10000000000)|length }}",
    "batch": "{{ [1]|batch(10000000000, 'x')|list|length }}",
    "slice": "{{ [1]|slice(10000000000, 'x')|list|length }}",
    "wordwrap": "{{ ('x ' * 500000)|wordwrap(1, wrapstring='y' * 100000) }}",
    "tojson indent": "{{ [[[[1]]]]|tojson(indent=100000000) }}",
    "sum of lists": "{{ ([[1] * 1000] * 1000)|sum(start=[])|length }}",
    "integer squaring": (
        "{% set ns = namespace(n=3) %}{% for i in range(64) %}"
        "{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n > 0 }}"
    ),
    "huge power": "{{ (10 ** 1000) ** 1000 }}",
    "recursive loop": (
        "{% for i in range(100000) recursive %}{{ loop(range(100000)) }}{% endfor %}"
    ),
}


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES.values(), ids=HOSTILE_TEMPLATES.keys())
def test_a_template_over_its_budget_is_a_template_error(template: str) -> None:
    with pytest.raises(TemplateError) as info:
        render_chat(template, [{"role": "user", "content": "x"}])
    assert info.value.code == "template_error"


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES.values(), ids=HOSTILE_TEMPLATES.keys())
def test_a_hostile_template_fails_the_probe(template: str) -> None:
    with pytest.raises(TemplateError):
        probe_template(template)


def test_lipsum_is_not_available() -> None:
    with pytest.raises(TemplateError, match="lipsum"):
        render_chat("{{ lipsum(100000000) }}", [])


def test_the_probe_passes_a_template_that_only_refuses_the_probe_conversation() -> None:
    probe_template("{% if messages|length > 1 %}{{ raise_exception('one turn only') }}{% endif %}")
    probe_template(CHATML_TEMPLATE)


def test_a_render_on_another_thread_keeps_its_own_budget() -> None:
    from concurrent.futures import ThreadPoolExecutor

    loop = (
        "{% for i in range(500) %}{% for j in range(800) %}{% endfor %}{% endfor %}"
        "{{ messages[0].content }}"
    )
    with ThreadPoolExecutor(4) as pool:
        prompts = list(
            pool.map(
                lambda n: render_chat(loop, [{"role": "user", "content": n}]), ["a", "b", "c", "d"]
            )
        )
    assert prompts == ["a", "b", "c", "d"]


def test_a_large_honest_conversation_still_renders() -> None:
    messages = [{"role": "user", "content": "word " * 400_000}] * 3
    assert len(render_chat(CHATML_TEMPLATE, messages)) > 6_000_000


SLOW_STEP_TEMPLATES = {
    "sort bomb": (
        "{% set l = range(100000)|list %}{% for i in range(100000) %}"
        "{{ (l|sort)|length }}{% endfor %}"
    ),
    "unique loop": (
        "{% set l = range(100000)|list %}{% for i in range(100000) %}"
        "{{ (l|unique|list)|length }}{% endfor %}"
    ),
}
BUDGET_SLACK_S = 2.0
"""Past ``RENDER_TIME_LIMIT_S``: one step of the template (a sort of 100,000 items) plus this
loaded machine's scheduling; before issue 21 these took 36 s to minutes."""


@pytest.mark.parametrize("template", SLOW_STEP_TEMPLATES.values(), ids=SLOW_STEP_TEMPLATES.keys())
def test_the_render_budget_is_checked_on_time_not_every_256_steps(template: str) -> None:
    import time

    from modelstore.chat_template import RENDER_TIME_LIMIT_S

    started = time.monotonic()
    with pytest.raises(TemplateError, match="longer than"):
        render_chat(template, [{"role": "user", "content": "x"}])
    assert time.monotonic() - started < RENDER_TIME_LIMIT_S + BUDGET_SLACK_S


def test_a_template_heavy_only_on_long_messages_is_bounded_whatever_their_size() -> None:
    """Passes the probe (its messages are short), then meets a long conversation."""
    import time

    from modelstore.chat_template import RENDER_TIME_LIMIT_S

    template = (
        "{% for m in messages %}{% for c in m.content[:5000] %}"
        "{{ (m.content|list|sort)|length }}{% endfor %}{% endfor %}"
    )
    probe_template(template)
    for size in (90_000, 2_000_000):
        started = time.monotonic()
        with pytest.raises(TemplateError):
            render_chat(template, [{"role": "user", "content": "x" * size}])
        assert time.monotonic() - started < RENDER_TIME_LIMIT_S + BUDGET_SLACK_S
