"""What coding agents send and lean on, through the real daemon (issue 19).

The requests are written the way the agents' current releases send them on the wire (Claude
Code, Codex, aider, llm; see ``/work/shared/FACTS.md``), so most go through ``httpx`` as JSON:
the SDKs would send the same bytes, and some of these fields are not in their types. The
models are the fixtures of ``tests/conftest.py``'s ``chat_daemon``: ``tiny:gguf`` never emits
EOS under greedy decoding (it runs to whatever limit it is given), the scripted families say
their script.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import anthropic
import httpx
import openai
import pytest
from pydantic import BaseModel

TIMEOUT_S = 120.0
SMALL_CONTEXT = 600
"""A context the tiny model is loaded with so that "until the context is full" is short."""


def post(daemon: Any, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{daemon.url}{path}", json=body, headers=headers, timeout=TIMEOUT_S)


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event name or "", data)`` of each SSE message with JSON data."""
    events = []
    for block in text.split("\n\n"):
        name, data = "", None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and line != "data: [DONE]":
                data = json.loads(line.removeprefix("data: "))
        if data is not None:
            events.append((name, data))
    return events


# --- Limits: no silent output cap; overflow worded as each service words it -------------------


def test_without_a_limit_generation_runs_until_the_context_is_full(chat_daemon) -> None:
    """No API has a hidden output cap: a model that never stops fills the context (Codex sends
    no ``max_output_tokens`` and gives up on a silently cut answer)."""
    loaded = post(
        chat_daemon,
        "/api/chat",
        {
            "model": "tiny:gguf",
            "messages": [{"role": "user", "content": "Hi"}],
            "options": {"num_ctx": SMALL_CONTEXT, "temperature": 0},
            "stream": False,
        },
    ).json()
    assert loaded["done_reason"] == "length", loaded
    assert loaded["prompt_eval_count"] + loaded["eval_count"] == SMALL_CONTEXT
    messages = [{"role": "user", "content": "Hi"}]
    chat = post(
        chat_daemon,
        "/v1/chat/completions",
        {"model": "tiny:gguf", "messages": messages, "temperature": 0},
    ).json()
    assert chat["choices"][0]["finish_reason"] == "length"
    assert chat["usage"]["total_tokens"] == SMALL_CONTEXT
    responses = post(
        chat_daemon, "/v1/responses", {"model": "tiny:gguf", "input": "Hi", "temperature": 0}
    ).json()
    assert responses["status"] == "incomplete"
    assert responses["usage"]["total_tokens"] == SMALL_CONTEXT


OVERFLOW = "word " * 3000
"""Longer than any context the tiny models are loaded with (they are trained for 2048)."""


def test_context_overflow_is_worded_as_each_service_words_it(chat_daemon) -> None:
    """Agents compact the conversation when the error reads like their service's, and retry
    (or give up) otherwise."""
    user = [{"role": "user", "content": OVERFLOW}]
    native = post(chat_daemon, "/api/chat", {"model": "tiny:gguf", "messages": user})
    assert native.status_code == 400
    assert native.json()["code"] == "context_overflow"
    assert native.json()["error"].startswith("the input length exceeds the context length")
    for path, body in (
        ("/v1/chat/completions", {"messages": user}),
        ("/v1/chat/completions", {"messages": user, "stream": True}),
        ("/v1/responses", {"input": OVERFLOW}),
        ("/v1/responses", {"input": OVERFLOW, "stream": True}),
    ):
        answer = post(chat_daemon, path, {"model": "tiny:gguf", **body})
        assert answer.status_code == 400, (path, body.keys())
        error = answer.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert error["type"] == "invalid_request_error"
        assert re.search(r"maximum context length is \d+ tokens", error["message"]), error
    for stream in (False, True):
        answer = post(
            chat_daemon,
            "/v1/messages",
            {"model": "tiny:gguf", "max_tokens": 8, "messages": user, "stream": stream},
        )
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error"
        found = re.fullmatch(r"prompt is too long: (\d+) tokens > (\d+) maximum", error["message"])
        assert found and int(found[1]) > int(found[2]), error


def test_anthropic_overflow_reaches_the_sdk_as_claude_code_reads_it(chat_daemon) -> None:
    client = anthropic.Anthropic(base_url=chat_daemon.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model="tiny:gguf", max_tokens=8, messages=[{"role": "user", "content": OVERFLOW}]
        )
    assert "prompt is too long" in str(info.value)


# --- Codex's tools on /v1/responses ------------------------------------------------------------

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def responses(daemon: Any, body: dict[str, Any]) -> dict[str, Any]:
    answer = post(daemon, "/v1/responses", body)
    assert answer.status_code == 200, answer.text
    if not body.get("stream"):
        return answer.json()
    events = sse_events(answer.text)
    assert events[-1][0] == "response.completed", events[-1]
    return {"events": events, **events[-1][1]["response"]}


@pytest.mark.parametrize("stream", [False, True])
def test_a_namespace_function_is_called_by_its_name_in_the_namespace(chat_daemon, stream):
    """Codex groups MCP tools in ``namespace`` tools; the model sees them flattened (a
    namespace ending in ``_`` is a prefix: ``get_`` + ``weather`` is the scripted model's
    ``get_weather``) and the call comes back named as the client named it."""
    answer = responses(
        chat_daemon,
        {
            "model": "scripted-hermes:gguf",
            "input": "What is the weather in Paris?",
            "tools": [
                {
                    "type": "namespace",
                    "name": "get_",
                    "description": "Weather tools.",
                    "tools": [{"type": "function", "name": "weather", "parameters": CITY}],
                },
                {"type": "web_search"},
            ],
            "max_output_tokens": 32,
            "stream": stream,
        },
    )
    (call,) = [item for item in answer["output"] if item["type"] == "function_call"]
    assert (call["namespace"], call["name"]) == ("get_", "weather")
    assert json.loads(call["arguments"]) == {"city": "Paris"}


def test_a_namespace_call_in_the_history_reaches_the_prompt(chat_daemon):
    call = {"type": "function_call", "namespace": "get_", "name": "weather", "call_id": "c1"}
    body = {
        "model": "scripted-plain:gguf",
        "input": [
            {"role": "user", "content": "Weather?"},
            {**call, "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
        ],
        "tools": [
            {
                "type": "namespace",
                "name": "get_",
                "tools": [{"type": "function", "name": "weather", "parameters": CITY}],
            }
        ],
        "max_output_tokens": 4,
    }
    assert responses(chat_daemon, body)["output"]  # answered (the scripted text, cut at 4)


PATCH_REGEX = r"\*\*\* Begin Patch\n[a-z]{1,8}\n\*\*\* End Patch"
PATCH_LARK = r"""
start: begin body end
begin: "*** Begin Patch\n"
body: /[a-z]{1,8}\n/
end: "*** End Patch"
"""
"""A patch tool's grammar, bounded so that a random model completes it within the limit."""


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("syntax", ["lark", "regex"])
@pytest.mark.parametrize("model", ["tiny:gguf", "tiny:mlx"])
def test_a_forced_custom_tool_call_follows_its_grammar(chat_daemon, model, syntax, stream):
    """Codex's ``apply_patch`` is a ``custom`` tool with a Lark grammar: forced, the model's
    input is held to that grammar (llguidance, on both runners) and comes back as a
    ``custom_tool_call`` item, streamed with ``response.custom_tool_call_input`` events."""
    definition = PATCH_LARK if syntax == "lark" else PATCH_REGEX
    tool = {
        "type": "custom",
        "name": "apply_patch",
        "description": "Apply a patch.",
        "format": {"type": "grammar", "syntax": syntax, "definition": definition},
    }
    answer = responses(
        chat_daemon,
        {
            "model": model,
            "input": "Fix the typo.",
            "tools": [tool],
            "tool_choice": {"type": "custom", "name": "apply_patch"},
            "max_output_tokens": 64,
            "temperature": 0,
            "stream": stream,
        },
    )
    (call,) = answer["output"]
    assert call["type"] == "custom_tool_call" and call["name"] == "apply_patch", call
    assert re.fullmatch(PATCH_REGEX, call["input"]), call
    if stream:
        names = [name for name, _ in answer["events"]]
        assert "response.custom_tool_call_input.delta" in names
        (done,) = [data for name, data in answer["events"] if name.endswith("input.done")]
        assert done["input"] == call["input"]


def test_a_custom_tool_call_in_the_history_is_accepted(chat_daemon):
    body = {
        "model": "scripted-plain:gguf",
        "input": [
            {"role": "user", "content": "Fix it."},
            {"type": "custom_tool_call", "call_id": "p1", "name": "apply_patch", "input": "x"},
            {"type": "custom_tool_call_output", "call_id": "p1", "output": "Done!"},
        ],
        "tools": [{"type": "custom", "name": "apply_patch", "description": "Apply a patch."}],
        "max_output_tokens": 4,
    }
    assert responses(chat_daemon, body)["output"]  # answered (the scripted text, cut at 4)


def test_a_custom_tools_grammar_that_cannot_be_enforced_is_400(chat_daemon):
    tool = {
        "type": "custom",
        "name": "apply_patch",
        "format": {"type": "grammar", "syntax": "lark", "definition": "start: undefined_rule"},
    }
    answer = post(
        chat_daemon,
        "/v1/responses",
        {
            "model": "tiny:gguf",
            "input": "Fix it.",
            "tools": [tool],
            "tool_choice": "required",
            "max_output_tokens": 8,
        },
    )
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_format"


# --- Identity ---------------------------------------------------------------------------------

CODEX_OSS_MINIMUM = (0, 13, 4)
"""``codex --oss`` refuses an Ollama older than this."""


def test_version_is_an_ollama_api_version_clients_accept(chat_daemon) -> None:
    from mlxserve import __version__

    answer = httpx.get(f"{chat_daemon.url}/api/version", timeout=TIMEOUT_S)
    body = answer.json()
    assert tuple(int(part) for part in body["version"].split(".")) >= CODEX_OSS_MINIMUM
    assert body["mlxserve_version"] == __version__
    assert answer.headers["X-Mlxserve-Version"] == __version__
    tags = httpx.get(f"{chat_daemon.url}/api/tags", timeout=TIMEOUT_S)
    assert tags.headers["X-Mlxserve-Version"] == __version__


# --- What agents lean on: Anthropic ----------------------------------------------------------


def anthropic_client(daemon: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_sequence_is_reported_as_anthropic_reports_it(chat_daemon, stream) -> None:
    client = anthropic_client(chat_daemon)
    ask = {
        "model": "scripted-plain:gguf",
        "max_tokens": 16,
        "stop_sequences": [" is", "never said"],
        "messages": [{"role": "user", "content": "Weather?"}],
    }
    if stream:
        with client.messages.stream(**ask) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**ask)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", " is")
    assert message.content[0].text == "The weather in Paris"
    plain = client.messages.create(**{**ask, "stop_sequences": []})
    assert (plain.stop_reason, plain.stop_sequence) == ("end_turn", None)


def test_thinking_budget_tokens_cuts_the_reasoning_then_the_model_answers(chat_daemon) -> None:
    """``budget_tokens`` is a real budget: the scripted model's one-token thought plus its
    ``<think>`` is two tokens; with a budget of one the reasoning is closed after ``<think>``
    and the model answers."""
    from tests.fixtures.scripted_models import THINKING_ANSWER, THINKING_REASONING

    client = anthropic_client(chat_daemon)
    ask = {
        "model": "scripted-thinking:gguf",
        "max_tokens": 32,
        "messages": [{"role": "user", "content": "Weather?"}],
    }
    free = client.messages.create(**ask, thinking={"type": "enabled", "budget_tokens": 1024})
    assert [block.type for block in free.content] == ["thinking", "text"]
    assert free.content[0].thinking.strip() == THINKING_REASONING
    cut = client.messages.create(**ask, thinking={"type": "enabled", "budget_tokens": 1})
    assert [block.text.strip() for block in cut.content if block.type == "text"] == [
        THINKING_ANSWER
    ]
    assert not any(block.type == "thinking" and block.thinking.strip() for block in cut.content)
    assert cut.stop_reason == "end_turn"
    assert total_input(cut.usage) == total_input(free.usage)


def total_input(usage: Any) -> int:
    """Anthropic's prompt: ``input_tokens`` counts only what the cache did not give."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


def test_thinking_budget_restart_reports_the_first_passs_cache_hit(chat_daemon) -> None:
    """The restart after ``budget_tokens`` reads the first pass's prompt and reasoning from the
    cache; what is reported is the first pass's hit on the user's prompt (here the live slot
    the same request left a moment before), not zero and not the restart's own hit."""
    client = anthropic_client(chat_daemon)
    ask = {
        "model": "scripted-thinking:gguf",
        "max_tokens": 32,
        "messages": [{"role": "user", "content": "Weather, once more?"}],
        "thinking": {"type": "enabled", "budget_tokens": 1},
    }
    first = client.messages.create(**ask)
    again = client.messages.create(**ask)
    assert total_input(again.usage) == total_input(first.usage)
    assert 0 < again.usage.cache_read_input_tokens < total_input(again.usage)


class Answer(BaseModel):
    """Bounded by enums: the SDK moves numeric bounds out of the schema it sends."""

    city: Literal["Paris", "Rome"]
    size: Literal["small", "large"]


@pytest.mark.parametrize("model", ["tiny:gguf", "tiny:mlx"])
def test_anthropic_structured_output_is_enforced(chat_daemon, model) -> None:
    """``messages.parse`` sends ``output_config.format``: a random model's answer holds."""
    client = anthropic_client(chat_daemon)
    message = client.messages.parse(
        model=model,
        max_tokens=64,
        messages=[{"role": "user", "content": "A city and a number."}],
        output_format=Answer,
    )
    assert isinstance(message.parsed_output, Answer), message


def test_models_answer_in_anthropics_shape_to_the_anthropic_sdk(chat_daemon) -> None:
    client = anthropic_client(chat_daemon)
    ids = [model.id for model in client.models.list()]
    assert "tiny:gguf" in ids
    assert client.models.retrieve("tiny:gguf").type == "model"
    openai_shape = httpx.get(f"{chat_daemon.url}/v1/models", timeout=TIMEOUT_S).json()
    assert openai_shape["object"] == "list"


def test_anthropic_usage_has_the_cache_fields(chat_daemon) -> None:
    message = anthropic_client(chat_daemon).messages.create(
        model="scripted-plain:gguf",
        max_tokens=4,
        messages=[{"role": "user", "content": "Hi"}],
    )
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.cache_read_input_tokens == 0


# --- What agents lean on: Responses and OpenAI chat -------------------------------------------


def test_responses_reasoning_items_round_trip_with_codexs_flags(chat_daemon) -> None:
    """Codex sends the previous output (reasoning items included) back as input, with
    ``include``, ``store: false`` and ``parallel_tool_calls``."""
    flags = {
        "include": ["reasoning.encrypted_content"],
        "store": False,
        "parallel_tool_calls": False,
        "reasoning": {"effort": "high", "summary": "auto"},
        "max_output_tokens": 32,
    }
    first = responses(
        chat_daemon,
        {"model": "scripted-thinking:gguf", "input": "Weather?", **flags},
    )
    kinds = [item["type"] for item in first["output"]]
    assert kinds == ["reasoning", "message"], first["output"]
    assert first["parallel_tool_calls"] is False
    again = [
        {"role": "user", "content": "Weather?"},
        *({**item, "encrypted_content": None} for item in first["output"]),
        {"role": "user", "content": "And tomorrow?"},
    ]
    second = responses(chat_daemon, {"model": "scripted-thinking:gguf", "input": again, **flags})
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"] + 5


def test_openai_chat_developer_role_completion_limit_and_stream_usage(chat_daemon) -> None:
    client = openai.OpenAI(base_url=f"{chat_daemon.url}/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny:gguf",
            messages=[
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
            max_completion_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == 3
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]
