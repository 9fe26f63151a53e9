"""One table of chat behaviours, each run through all four chat APIs with their real clients.

A case is a request written once (``Ask``) and the behaviour expected of the answer. Each API
has a small encoder (the ``Ask`` in that API's wire format, sent with the API's real client
package: ``ollama``, ``openai`` chat completions and responses, ``anthropic``) and a decoder
(its answer, streamed or whole, as a ``Reply``), so a behaviour cannot exist in one API and not
in another. The daemon is real, over a store of the tiny fixture models, the scripted models of
``tests/fixtures/scripted_models.py`` and the embedded default model.

Models (store names):
- ``scripted-<family>:mlx`` (HF folder, MLX runner) and ``scripted-<family>:gguf`` (llama.cpp)
  for the families ``hermes`` (Qwen2.5 template, ``<tool_call>{json}</tool_call>``),
  ``mistral`` (``[TOOL_CALLS] [{json}]``), ``pythonic`` (LFM2, ``<|tool_call_start|>[f(a=..)]``),
  ``qwen3coder`` (``<tool_call><function=..><parameter=..>``), ``parallel`` (Mistral, two
  calls in one turn), ``thinking`` (``enable_thinking``, ``<think>``/``</think>``) and ``plain``
  (ChatML, text). mlx-lm has no parser for Llama 3's bare-JSON calls, so there is no such
  family.
  Greedy decoding follows their script exactly (``test_scripted_models.py``).
- ``tiny:mlx`` / ``tiny:gguf``: random weights, no tools in the template.
- ``smollm2:135m``: the default model; its template shows no tools.

What these tests assume of the daemon where the issue leaves a choice:
- Native ``/api/chat`` takes ``tool_choice`` (an mlxserve extension: Ollama has none) spelled
  as OpenAI's (``"none"``, ``"auto"``, ``"required"``, ``{"type": "function", "function":
  {"name": ...}}``). The ``ollama`` client has no such parameter, so those requests go through
  ``httpx`` and their lines are read with the client's own ``ollama.ChatResponse``.
- Thinking is asked for with ``think`` (native), ``reasoning_effort`` ``"high"``/``"none"``
  (OpenAI chat), ``reasoning.effort`` ``"high"``/``"none"`` (Responses) and ``thinking``
  enabled/disabled (Anthropic). It comes back as ``message.thinking``, ``reasoning_content``
  (message and stream delta), a ``reasoning`` output item (text in ``reasoning_text`` content
  or ``summary_text`` summary parts; streamed as ``response.reasoning_text.delta`` or
  ``response.reasoning_summary_text.delta``) and ``thinking`` blocks.
- ``tool_choice: none`` forbids a call: the scripted models then say their second choice,
  ``DETOUR_TEXT``, never the tool-call markup.
- A streamed tool call arrives before the stream's end: in a native chunk with ``done:
  false``, in an OpenAI chunk before the one with ``finish_reason``, as a Responses
  ``response.output_item.done`` before ``response.completed``, as an Anthropic ``tool_use``
  block before ``message_delta``.
- The Mistral and LFM2 tool-call markers are special (control) tokens, as in the published
  vocabularies; llama.cpp's ``detokenize`` drops such tokens unless asked for them.
- Errors: native ``{"error": "..."}``, OpenAI chat and Responses ``{"error": {"message": ...,
  "type": ...}}``, Anthropic ``{"type": "error", "error": {"type": ..., "message": ...}}``.
  An unknown model is 404; a named ``tool_choice`` that names no given tool, and Responses'
  ``previous_response_id`` are 400. Thinking asked of a model without it is the leniency
  table's (``tests/test_leniency.py``): native 400, elsewhere ignored.
- ``parallel_tool_calls: false`` (Anthropic: ``disable_parallel_tool_use``) keeps the first
  call. Ollama's API has no such field; natively it is an mlxserve extension, like
  ``tool_choice``.
- The Responses API has no stop sequences, and the Messages API is not asked for JSON Schema
  output, so those cases do not run there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pytest
from langchain_core.tools import tool as langchain_tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

from tests.fixtures.scripted_models import (
    DETOUR_TEXT,
    HERMES,
    PARALLEL,
    PARALLEL_CALLS,
    PLAIN,
    SCRIPTED_CALL,
    THINKING,
    THINKING_ANSWER,
    THINKING_REASONING,
    TOOL_FAMILIES,
    WEATHER_TOOL,
    model_name,
)

FORMATS = ("mlx", "gguf")
DEFAULT_MODEL = "smollm2:135m"
TINY_MODELS = ("tiny:mlx", "tiny:gguf")
TIMEOUT_S = 120.0
ANTHROPIC_THINKING_BUDGET = 1024
"""Anthropic's smallest ``budget_tokens``; it must be below ``max_tokens``."""

FORECAST_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_forecast",
        "description": "The weather forecast for the next days in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days", "unit"],
            "additionalProperties": False,
        },
    },
}
"""A schema a random model cannot satisfy by chance: bounds, an enum, no extra keys."""


@langchain_tool
def find_files(
    pattern: Annotated[str, Field(max_length=12)],
    max_results: Annotated[int, Field(ge=1, le=50)] = 10,
    recursive: bool = True,
) -> str:
    """Find files whose names match a glob pattern."""
    return ""


LANGCHAIN_TOOL: dict[str, Any] = convert_to_openai_tool(find_files)
"""As LangChain's ``@tool`` writes a tool: no ``additionalProperties``. Its values are bounded
so that a random model completes the call within the limit (an unbounded string it may write
until ``max_tokens``, which is ``forced-call-cut-short``)."""
TOOL_SCHEMAS = {
    tool["function"]["name"]: tool["function"]["parameters"]
    for tool in (WEATHER_TOOL, FORECAST_TOOL, LANGCHAIN_TOOL)
}
ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["city", "n"],
    "additionalProperties": False,
}
CONSTRAINED_MAX_TOKENS = 96
"""Room for a complete call to ``get_forecast`` even when each character is its own token."""


# --- The request, written once ---------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict[str, Any]
    id: str = "call_weather_1"


@dataclass(frozen=True)
class Turn:
    """One message of the conversation: a user's text, an assistant's calls, a tool's result."""

    role: str
    content: str = ""
    tool_calls: tuple[Call, ...] = ()
    tool_call_id: str = ""
    tool_name: str = ""


WEATHER_QUESTION = Turn("user", "What is the weather in Paris?")


@dataclass(frozen=True)
class Ask:
    model: str
    turns: tuple[Turn, ...] = (WEATHER_QUESTION,)
    system: str | None = "Be brief."
    tools: tuple[dict[str, Any], ...] = ()
    """Tools as OpenAI and Ollama spell them (``{"type": "function", "function": {...}}``)."""
    tool_choice: str | None = None
    """``"auto"``, ``"none"``, ``"required"``, or the name of the one tool to call."""
    think: bool | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    format: dict[str, Any] | None = None
    """A JSON Schema the answer's text must follow."""
    parallel_tool_calls: bool | None = None


@dataclass
class Reply:
    """An answer in any API, decoded to what the cases check."""

    text: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """``{"name": ..., "arguments": {...}}`` in order."""
    finish: str = ""
    """``stop``, ``length`` or ``tool_calls``, whatever the API calls them."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    call_streamed_before_end: bool = False
    text_pieces: int = 0
    """How many non-empty pieces the text came in."""

    def add_text(self, piece: str | None) -> None:
        if piece:
            self.text += piece
            self.text_pieces += 1


class ApiError(Exception):
    """An HTTP error answer: its status and its JSON body."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


class Unsupported(Exception):
    """The API has no way to say this request."""


def function(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"]


# --- Native /api/chat ------------------------------------------------------------------------


class NativeChat:
    name = "native"

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = ollama.Client(host=url, timeout=TIMEOUT_S)

    def encode(self, ask: Ask) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if ask.system is not None:
            messages.append({"role": "system", "content": ask.system})
        for turn in ask.turns:
            message: dict[str, Any] = {"role": turn.role, "content": turn.content}
            if turn.tool_calls:
                message["tool_calls"] = [
                    {"function": {"name": c.name, "arguments": c.arguments}}
                    for c in turn.tool_calls
                ]
            if turn.tool_name:
                message["tool_name"] = turn.tool_name
            messages.append(message)
        options: dict[str, Any] = {"temperature": 0, "num_predict": ask.max_tokens}
        if ask.stop:
            options["stop"] = list(ask.stop)
        body: dict[str, Any] = {"model": ask.model, "messages": messages, "options": options}
        if ask.format is not None:
            body["format"] = ask.format
        if ask.tools:
            body["tools"] = list(ask.tools)
        if ask.think is not None:
            body["think"] = ask.think
        if ask.tool_choice is not None:
            body["tool_choice"] = openai_tool_choice(ask.tool_choice)
        if ask.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = ask.parallel_tool_calls
        return body

    def send(self, ask: Ask, stream: bool) -> Reply:
        body = self.encode(ask)
        try:
            if "tool_choice" in body or "parallel_tool_calls" in body:
                chunks = self.post_raw(body, stream)
            else:
                answer = self.client.chat(**body, stream=stream)
                chunks = answer if stream else [answer]
            return self.decode(chunks)
        except ollama.ResponseError as exc:
            raise ApiError(exc.status_code, {"error": exc.error}) from None

    def post_raw(self, body: dict[str, Any], stream: bool) -> list[ollama.ChatResponse]:
        with httpx.stream(
            "POST", f"{self.url}/api/chat", json={**body, "stream": stream}, timeout=TIMEOUT_S
        ) as response:
            if response.status_code != 200:
                raise ApiError(response.status_code, json.loads(response.read()))
            lines = [json.loads(line) for line in response.iter_lines() if line.strip()]
        for line in lines:
            if "error" in line:
                raise ApiError(response.status_code, line)
        return [ollama.ChatResponse.model_validate(line) for line in lines]

    @staticmethod
    def decode(chunks: Iterable[ollama.ChatResponse]) -> Reply:
        reply = Reply()
        for chunk in chunks:
            message = chunk.message
            reply.add_text(message.content)
            reply.thinking += message.thinking or ""
            for call in message.tool_calls or []:
                reply.tool_calls.append(
                    {"name": call.function.name, "arguments": dict(call.function.arguments)}
                )
                reply.call_streamed_before_end |= not chunk.done
            if chunk.done:
                reply.finish = "tool_calls" if reply.tool_calls else chunk.done_reason or ""
                reply.prompt_tokens = chunk.prompt_eval_count or 0
                reply.completion_tokens = chunk.eval_count or 0
        return reply

    @staticmethod
    def error_message(body: Any) -> str:
        assert isinstance(body, dict) and isinstance(body.get("error"), str), body
        return body["error"]


# --- OpenAI chat completions -----------------------------------------------------------------


def openai_tool_choice(choice: str) -> str | dict[str, Any]:
    if choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def openai_error_message(body: Any) -> str:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert isinstance(body["error"].get("type"), str), body
    assert isinstance(body["error"].get("message"), str), body
    return body["error"]["message"]


def effort(think: bool) -> str:
    return "high" if think else "none"


class OpenAIChat:
    name = "openai"

    def __init__(self, url: str) -> None:
        self.client = openai.OpenAI(
            base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0
        )

    @staticmethod
    def encode(ask: Ask) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if ask.system is not None:
            messages.append({"role": "system", "content": ask.system})
        for turn in ask.turns:
            if turn.role == "tool":
                messages.append(
                    {"role": "tool", "tool_call_id": turn.tool_call_id, "content": turn.content}
                )
            elif turn.tool_calls:
                messages.append(
                    {
                        "role": "assistant",
                        "content": turn.content or None,
                        "tool_calls": [
                            {
                                "id": c.id,
                                "type": "function",
                                "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                            }
                            for c in turn.tool_calls
                        ],
                    }
                )
            else:
                messages.append({"role": turn.role, "content": turn.content})
        body: dict[str, Any] = {
            "model": ask.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": ask.max_tokens,
        }
        if ask.stop:
            body["stop"] = list(ask.stop)
        if ask.format is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": ask.format},
            }
        if ask.tools:
            body["tools"] = list(ask.tools)
        if ask.tool_choice is not None:
            body["tool_choice"] = openai_tool_choice(ask.tool_choice)
        if ask.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = ask.parallel_tool_calls
        if ask.think is not None:
            body["reasoning_effort"] = effort(ask.think)
        return body

    def send(self, ask: Ask, stream: bool) -> Reply:
        body = self.encode(ask)
        try:
            if not stream:
                return self.decode(self.client.chat.completions.create(**body))
            chunks = self.client.chat.completions.create(
                **body, stream=True, stream_options={"include_usage": True}
            )
            return self.decode_stream(chunks)
        except openai.APIStatusError as exc:
            raise ApiError(exc.status_code, exc.response.json()) from None

    @staticmethod
    def decode(completion: Any) -> Reply:
        choice = completion.choices[0]
        message = choice.message
        calls = []
        for call in message.tool_calls or []:
            assert call.id and call.type == "function"
            calls.append(
                {"name": call.function.name, "arguments": json.loads(call.function.arguments)}
            )
        return Reply(
            text=message.content or "",
            thinking=(message.model_extra or {}).get("reasoning_content") or "",
            tool_calls=calls,
            finish=choice.finish_reason,
            prompt_tokens=completion.usage.prompt_tokens,
            completion_tokens=completion.usage.completion_tokens,
        )

    @staticmethod
    def decode_stream(chunks: Iterable[Any]) -> Reply:
        reply = Reply()
        calls: dict[int, dict[str, Any]] = {}
        for chunk in chunks:
            if chunk.usage is not None:
                reply.prompt_tokens = chunk.usage.prompt_tokens
                reply.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                delta = choice.delta
                reply.add_text(delta.content)
                reply.thinking += (delta.model_extra or {}).get("reasoning_content") or ""
                for part in delta.tool_calls or []:
                    call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                    call["id"] += part.id or ""
                    if part.function is not None:
                        call["name"] += part.function.name or ""
                        call["arguments"] += part.function.arguments or ""
                    reply.call_streamed_before_end |= choice.finish_reason is None
                if choice.finish_reason is not None:
                    reply.finish = choice.finish_reason
        for _, call in sorted(calls.items()):
            assert call["id"], call
            reply.tool_calls.append(
                {"name": call["name"], "arguments": json.loads(call["arguments"])}
            )
        return reply

    error_message = staticmethod(openai_error_message)


# --- OpenAI responses ------------------------------------------------------------------------


class OpenAIResponses:
    name = "responses"

    def __init__(self, url: str) -> None:
        self.client = openai.OpenAI(
            base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0
        )

    @staticmethod
    def encode(ask: Ask) -> dict[str, Any]:
        if ask.stop:
            raise Unsupported("the Responses API has no stop sequences")
        items: list[dict[str, Any]] = []
        for turn in ask.turns:
            if turn.role == "tool":
                items.append(
                    {
                        "type": "function_call_output",
                        "call_id": turn.tool_call_id,
                        "output": turn.content,
                    }
                )
                continue
            if turn.content:
                items.append({"role": turn.role, "content": turn.content})
            items.extend(
                {
                    "type": "function_call",
                    "call_id": c.id,
                    "name": c.name,
                    "arguments": json.dumps(c.arguments),
                }
                for c in turn.tool_calls
            )
        body: dict[str, Any] = {
            "model": ask.model,
            "input": items,
            "temperature": 0,
            "max_output_tokens": ask.max_tokens,
        }
        if ask.system is not None:
            body["instructions"] = ask.system
        if ask.format is not None:
            body["text"] = {
                "format": {"type": "json_schema", "name": "answer", "schema": ask.format}
            }
        if ask.tools:
            body["tools"] = [
                {"type": "function", "strict": False, **function(tool)} for tool in ask.tools
            ]
        if ask.tool_choice in ("auto", "none", "required"):
            body["tool_choice"] = ask.tool_choice
        elif ask.tool_choice is not None:
            body["tool_choice"] = {"type": "function", "name": ask.tool_choice}
        if ask.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = ask.parallel_tool_calls
        if ask.think is not None:
            body["reasoning"] = {"effort": effort(ask.think)}
        return body

    def send(self, ask: Ask, stream: bool) -> Reply:
        body = self.encode(ask)
        try:
            if not stream:
                return self.decode(self.client.responses.create(**body).model_dump())
            return self.decode_stream(self.client.responses.create(**body, stream=True))
        except openai.APIStatusError as exc:
            raise ApiError(exc.status_code, exc.response.json()) from None

    @staticmethod
    def decode(response: dict[str, Any]) -> Reply:
        reply = Reply()
        for item in response["output"]:
            if item["type"] == "message":
                reply.add_text(
                    "".join(
                        part["text"] for part in item["content"] if part["type"] == "output_text"
                    )
                )
            elif item["type"] == "reasoning":
                parts = [*(item.get("content") or []), *(item.get("summary") or [])]
                reply.thinking += "".join(part["text"] for part in parts)
            elif item["type"] == "function_call":
                assert item["call_id"], item
                reply.tool_calls.append(
                    {"name": item["name"], "arguments": json.loads(item["arguments"])}
                )
        incomplete = (response.get("incomplete_details") or {}).get("reason")
        if reply.tool_calls:
            reply.finish = "tool_calls"
        elif response["status"] == "incomplete" and incomplete == "max_output_tokens":
            reply.finish = "length"
        else:
            assert response["status"] == "completed", response
            reply.finish = "stop"
        reply.prompt_tokens = response["usage"]["input_tokens"]
        reply.completion_tokens = response["usage"]["output_tokens"]
        return reply

    @classmethod
    def decode_stream(cls, events: Iterable[Any]) -> Reply:
        streamed = Reply()
        streamed_calls: list[dict[str, Any]] = []
        final: Reply | None = None
        for event in events:
            assert final is None, f"{event.type} after the end of the response"
            if event.type == "response.output_text.delta":
                streamed.add_text(event.delta)
            elif event.type in (
                "response.reasoning_text.delta",
                "response.reasoning_summary_text.delta",
            ):
                streamed.thinking += event.delta
            elif event.type == "response.output_item.done" and event.item.type == "function_call":
                streamed_calls.append(
                    {"name": event.item.name, "arguments": json.loads(event.item.arguments)}
                )
            elif event.type in ("response.completed", "response.incomplete"):
                final = cls.decode(event.response.model_dump())
            elif event.type in ("response.failed", "error"):
                raise ApiError(500, event.model_dump())
        assert final is not None, "the stream ended without response.completed"
        assert (streamed.text, streamed.thinking, streamed_calls) == (
            final.text,
            final.thinking,
            final.tool_calls,
        )
        final.call_streamed_before_end = bool(streamed_calls)
        final.text_pieces = streamed.text_pieces
        return final

    error_message = staticmethod(openai_error_message)


# --- Anthropic messages ----------------------------------------------------------------------

ANTHROPIC_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


class AnthropicMessages:
    name = "anthropic"

    def __init__(self, url: str) -> None:
        self.client = anthropic.Anthropic(
            base_url=url, api_key="unused", timeout=TIMEOUT_S, max_retries=0
        )

    @staticmethod
    def encode(ask: Ask) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        for turn in ask.turns:
            if turn.role == "tool":
                messages.append(
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": turn.tool_call_id,
                                "content": turn.content,
                            }
                        ],
                    }
                )
            elif turn.tool_calls:
                blocks: list[dict[str, Any]] = []
                if turn.content:
                    blocks.append({"type": "text", "text": turn.content})
                blocks.extend(
                    {"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}
                    for c in turn.tool_calls
                )
                messages.append({"role": "assistant", "content": blocks})
            else:
                messages.append({"role": turn.role, "content": turn.content})
        body: dict[str, Any] = {
            "model": ask.model,
            "messages": messages,
            "max_tokens": ask.max_tokens,
            # The anthropic client no longer names ``temperature``; the API still takes it.
            "extra_body": {"temperature": 0},
        }
        if ask.system is not None:
            body["system"] = ask.system
        if ask.stop:
            body["stop_sequences"] = list(ask.stop)
        if ask.format is not None:
            raise Unsupported("the issue asks for no JSON Schema output on the Messages API")
        if ask.tools:
            body["tools"] = [
                {
                    "name": function(t)["name"],
                    "description": function(t)["description"],
                    "input_schema": function(t)["parameters"],
                }
                for t in ask.tools
            ]
        if ask.tool_choice is not None or ask.parallel_tool_calls is not None:
            kinds = {"auto": "auto", "none": "none", "required": "any"}
            choice = ask.tool_choice or "auto"
            body["tool_choice"] = (
                {"type": kinds[choice]} if choice in kinds else {"type": "tool", "name": choice}
            )
            if ask.parallel_tool_calls is not None:
                body["tool_choice"]["disable_parallel_tool_use"] = not ask.parallel_tool_calls
        if ask.think:
            body["thinking"] = {"type": "enabled", "budget_tokens": ANTHROPIC_THINKING_BUDGET}
            body["max_tokens"] = max(ask.max_tokens, ANTHROPIC_THINKING_BUDGET + 1)
        elif ask.think is False:
            body["thinking"] = {"type": "disabled"}
        return body

    def send(self, ask: Ask, stream: bool) -> Reply:
        body = self.encode(ask)
        try:
            if not stream:
                return self.decode(self.client.messages.create(**body))
            return self.decode_stream(self.client.messages.create(**body, stream=True))
        except anthropic.APIStatusError as exc:
            raise ApiError(exc.status_code, exc.response.json()) from None

    @staticmethod
    def decode(message: Any) -> Reply:
        assert (message.type, message.role) == ("message", "assistant")
        reply = Reply(
            finish=ANTHROPIC_FINISH[message.stop_reason],
            prompt_tokens=message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0),
            completion_tokens=message.usage.output_tokens,
        )
        for block in message.content:
            if block.type == "text":
                reply.add_text(block.text)
            elif block.type == "thinking":
                reply.thinking += block.thinking
            elif block.type == "tool_use":
                assert block.id, block
                reply.tool_calls.append({"name": block.name, "arguments": dict(block.input)})
        return reply

    @staticmethod
    def decode_stream(events: Iterable[Any]) -> Reply:
        reply = Reply()
        kinds = []
        blocks: dict[int, dict[str, Any]] = {}
        for event in events:
            kinds.append(event.type)
            if event.type == "message_start":
                reply.prompt_tokens = event.message.usage.input_tokens
            elif event.type == "content_block_start":
                block = event.content_block
                blocks[event.index] = {
                    "type": block.type,
                    "name": getattr(block, "name", ""),
                    "json": "",
                }
            elif event.type == "content_block_delta":
                delta = event.delta
                if delta.type == "text_delta":
                    reply.add_text(delta.text)
                elif delta.type == "thinking_delta":
                    reply.thinking += delta.thinking
                elif delta.type == "input_json_delta":
                    blocks[event.index]["json"] += delta.partial_json
            elif event.type == "content_block_stop" and blocks[event.index]["type"] == "tool_use":
                block = blocks[event.index]
                reply.tool_calls.append(
                    {"name": block["name"], "arguments": json.loads(block["json"] or "{}")}
                )
                reply.call_streamed_before_end |= "message_delta" not in kinds
            elif event.type == "message_delta":
                reply.finish = ANTHROPIC_FINISH[event.delta.stop_reason]
                reply.completion_tokens = event.usage.output_tokens
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
        return reply

    @staticmethod
    def error_message(body: Any) -> str:
        assert isinstance(body, dict) and body.get("type") == "error", body
        error = body["error"]
        assert isinstance(error, dict) and isinstance(error.get("type"), str), body
        assert isinstance(error.get("message"), str), body
        return error["message"]


API_CLASSES = (NativeChat, OpenAIChat, OpenAIResponses, AnthropicMessages)
API_NAMES = tuple(api.name for api in API_CLASSES)


# --- The behaviours --------------------------------------------------------------------------

Resend = Callable[..., Reply]
"""The case's request again, through the same API, with some fields changed."""
Expect = Callable[[Reply, Resend], None]


def says(text: str) -> Expect:
    def expect(reply: Reply, _resend: Resend) -> None:
        assert (reply.text, reply.thinking, reply.tool_calls) == (text, "", [])
        assert reply.finish == "stop"

    return expect


def says_in_pieces(text: str) -> Expect:
    """``says``, in several pieces (for a stream: not all at once at the end)."""

    def expect(reply: Reply, resend: Resend) -> None:
        says(text)(reply, resend)
        assert reply.text_pieces > 1

    return expect


def calls_the_scripted(*calls: dict[str, Any]) -> Expect:
    def expect(reply: Reply, _resend: Resend) -> None:
        assert reply.tool_calls == list(calls)
        assert reply.text.strip() == ""
        assert reply.finish == "tool_calls"

    return expect


calls_the_scripted_tool = calls_the_scripted(SCRIPTED_CALL)


def calls_validly(name: str | None) -> Expect:
    """One call (to ``name``, or to any given tool) whose arguments fit the tool's schema."""

    def expect(reply: Reply, _resend: Resend) -> None:
        assert len(reply.tool_calls) == 1, reply
        call = reply.tool_calls[0]
        assert call["name"] == name if name else call["name"] in TOOL_SCHEMAS
        jsonschema.validate(call["arguments"], TOOL_SCHEMAS[call["name"]])
        assert reply.finish == "tool_calls"

    return expect


def calls_with_declared_keys_only(reply: Reply, resend: Resend) -> None:
    """A forced call to a tool whose schema leaves ``additionalProperties`` unsaid: still one
    structured call, whose arguments hold only the declared keys."""
    calls_validly(None)(reply, resend)
    (call,) = reply.tool_calls
    strict = {**TOOL_SCHEMAS[call["name"]], "additionalProperties": False}
    jsonschema.validate(call["arguments"], strict)


def a_forced_call_cut_short_is_neither_call_nor_text(reply: Reply, _resend: Resend) -> None:
    """Out of tokens mid-call: no call, no half-written JSON as text, and the finish reason
    (``length``, ``max_tokens``, ``incomplete``) says why."""
    assert (reply.tool_calls, reply.text.strip(), reply.finish) == ([], "", "length")


def thinks_then_answers(reply: Reply, _resend: Resend) -> None:
    assert reply.thinking.strip() == THINKING_REASONING
    assert reply.text.strip() == THINKING_ANSWER
    assert "<think>" not in reply.text and "</think>" not in reply.text
    assert reply.finish == "stop"


def answers_after_the_tool_result(reply: Reply, resend: Resend) -> None:
    """The history (the call and its result) reached the prompt; the model answered. What it
    answers is the scripted model's business: it calls the tool again."""
    assert reply.finish in ("stop", "tool_calls")
    bare = resend(turns=ROUND_TRIP[:1])
    assert reply.prompt_tokens > bare.prompt_tokens + 5


def follows_the_schema(reply: Reply, _resend: Resend) -> None:
    jsonschema.validate(json.loads(reply.text), ANSWER_SCHEMA)
    assert (reply.thinking, reply.tool_calls, reply.finish) == ("", [], "stop")


def stops_at_the_limit(reply: Reply, _resend: Resend) -> None:
    assert reply.text == "The weather in Paris"
    assert reply.finish == "length"
    assert reply.completion_tokens == 2


ROUND_TRIP = (
    WEATHER_QUESTION,
    Turn("assistant", tool_calls=(Call("get_weather", {"city": "Paris"}),)),
    Turn("tool", "18 degrees and sunny", tool_call_id="call_weather_1", tool_name="get_weather"),
)
ROUND_TRIP_ASK = Ask(model_name(HERMES, "gguf"), turns=ROUND_TRIP, tools=(WEATHER_TOOL,))


@dataclass(frozen=True)
class Case:
    id: str
    ask: Ask
    expect: Expect | None = None
    status: int | None = None
    """The error status expected instead of an answer."""
    slow: bool = False
    streams: tuple[bool, ...] = (False, True)


def cases() -> list[Case]:
    table = [
        *(Case(f"plain-text-{f}", Ask(model_name(PLAIN, f)), says(PLAIN.text)) for f in FORMATS),
        Case(
            "text-streams-in-pieces",
            Ask(model_name(PLAIN, "gguf")),
            says_in_pieces(PLAIN.text),
            streams=(True,),
        ),
        *(
            Case(
                f"auto-tool-call-{family.name}-{f}",
                Ask(model_name(family, f), tools=(WEATHER_TOOL,), tool_choice="auto"),
                calls_the_scripted_tool,
            )
            for family in TOOL_FAMILIES
            for f in FORMATS
        ),
        *(
            Case(
                f"parallel-tool-calls-{f}",
                Ask(model_name(PARALLEL, f), tools=PARALLEL.tools),
                calls_the_scripted(*PARALLEL_CALLS),
            )
            for f in FORMATS
        ),
        *(
            Case(
                f"parallel-tool-calls-off-gives-one-call-{f}",
                Ask(model_name(PARALLEL, f), tools=PARALLEL.tools, parallel_tool_calls=False),
                calls_the_scripted_tool,
            )
            for f in FORMATS
        ),
        Case(
            "tool-choice-defaults-to-auto",
            Ask(model_name(HERMES, "gguf"), tools=(WEATHER_TOOL,)),
            calls_the_scripted_tool,
        ),
        *(
            Case(
                f"tool-choice-none-gives-text-{f}",
                Ask(model_name(HERMES, f), tools=(WEATHER_TOOL,), tool_choice="none"),
                says(DETOUR_TEXT),
            )
            for f in FORMATS
        ),
        *(
            Case(
                f"named-tool-choice-{model}",
                Ask(
                    model,
                    tools=(WEATHER_TOOL, FORECAST_TOOL),
                    tool_choice="get_forecast",
                    max_tokens=CONSTRAINED_MAX_TOKENS,
                ),
                calls_validly("get_forecast"),
                slow=model == DEFAULT_MODEL,
            )
            for model in (*TINY_MODELS, DEFAULT_MODEL)
        ),
        *(
            Case(
                f"required-tool-choice-{model}",
                Ask(
                    model,
                    tools=(WEATHER_TOOL, FORECAST_TOOL),
                    tool_choice="required",
                    max_tokens=CONSTRAINED_MAX_TOKENS,
                ),
                calls_validly(None),
            )
            for model in TINY_MODELS
        ),
        *(
            Case(
                f"forced-call-with-a-langchain-schema-{model}",
                Ask(
                    model,
                    tools=(LANGCHAIN_TOOL,),
                    tool_choice="required",
                    max_tokens=CONSTRAINED_MAX_TOKENS,
                ),
                calls_with_declared_keys_only,
                slow=model == DEFAULT_MODEL,
            )
            for model in (*TINY_MODELS, DEFAULT_MODEL)
        ),
        *(
            Case(
                f"forced-call-cut-short-{model}",
                Ask(model, tools=(FORECAST_TOOL,), tool_choice="get_forecast", max_tokens=4),
                a_forced_call_cut_short_is_neither_call_nor_text,
            )
            for model in TINY_MODELS
        ),
        *(
            Case(
                f"thinking-is-separated-{f}",
                Ask(model_name(THINKING, f), think=True),
                thinks_then_answers,
            )
            for f in FORMATS
        ),
        Case(
            "thinking-off-answers-without-a-thought",
            Ask(model_name(THINKING, "gguf"), think=False),
            says(THINKING_ANSWER),
        ),
        Case(
            "think-off-on-a-model-without-thinking-is-ignored",
            Ask(model_name(PLAIN, "gguf"), think=False),
            says(PLAIN.text),
        ),
        *(
            Case(
                f"tool-result-round-trip-{f}",
                replace(ROUND_TRIP_ASK, model=model_name(HERMES, f)),
                answers_after_the_tool_result,
            )
            for f in FORMATS
        ),
        Case(
            "stop-sequence",
            Ask(model_name(PLAIN, "gguf"), stop=(" is",)),
            says("The weather in Paris"),
        ),
        Case("max-tokens", Ask(model_name(PLAIN, "mlx"), max_tokens=2), stops_at_the_limit),
        *(
            Case(
                f"json-schema-format-{model}",
                Ask(model, format=ANSWER_SCHEMA, max_tokens=CONSTRAINED_MAX_TOKENS),
                follows_the_schema,
            )
            for model in TINY_MODELS
        ),
        Case("unknown-model-is-404", Ask("no-such-model:latest"), status=404, streams=(False,)),
        Case(
            "named-tool-choice-of-no-given-tool-is-400",
            Ask(model_name(HERMES, "gguf"), tools=(WEATHER_TOOL,), tool_choice="get_forecast"),
            status=400,
            streams=(False,),
        ),
    ]
    assert len({case.id for case in table}) == len(table)
    return table


def params() -> list[Any]:
    return [
        pytest.param(
            case,
            api,
            stream,
            id=f"{case.id}-{api}-{'stream' if stream else 'whole'}",
            marks=[pytest.mark.slow] if case.slow else [],
        )
        for case in cases()
        for api in API_NAMES
        for stream in case.streams
    ]


@pytest.fixture(scope="module")
def apis(chat_daemon) -> dict[str, Any]:
    return {api.name: api(chat_daemon.url) for api in API_CLASSES}


@pytest.mark.parametrize(("case", "api_name", "stream"), params())
def test_behaviour(case: Case, api_name: str, stream: bool, apis, chat_daemon) -> None:
    api = apis[api_name]

    def resend(**changes: Any) -> Reply:
        return api.send(replace(case.ask, **changes), stream)

    try:
        reply = api.send(case.ask, stream)
    except Unsupported as exc:
        pytest.skip(str(exc))
    except ApiError as exc:
        if case.status is None:
            raise AssertionError(f"{exc}\n{chat_daemon.log()[-3000:]}") from None
        assert exc.status == case.status, exc
        assert api.error_message(exc.body)
        return
    assert case.status is None, f"expected {case.status}, got {reply}"
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0, reply
    if stream and reply.tool_calls:
        assert reply.call_streamed_before_end, "tool calls must stream before the end"
    assert case.expect is not None
    case.expect(reply, resend)


# --- What one API has and the others do not ---------------------------------------------------


def test_responses_previous_response_id_is_400(apis) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        apis["responses"].client.responses.create(
            model=model_name(PLAIN, "gguf"), input="Hi", previous_response_id="resp_123"
        )
    assert "previous_response_id" in openai_error_message(info.value.response.json())


def test_anthropic_count_tokens_matches_the_prompt(apis) -> None:
    api = apis["anthropic"]
    body = api.encode(Ask(model_name(HERMES, "gguf"), tools=(WEATHER_TOOL,)))
    counted = api.client.messages.count_tokens(
        model=body["model"],
        messages=body["messages"],
        system=body["system"],
        tools=body["tools"],
    )
    answered = api.client.messages.create(**body)
    prompt = answered.usage.input_tokens + (answered.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens == prompt > 0  # as Anthropic counts: cache reads apart


def test_anthropic_errors_for_an_unknown_model_are_not_found_errors(apis) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        apis["anthropic"].client.messages.create(
            model="no-such-model:latest", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
        )
    assert info.value.response.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("f", FORMATS)
def test_generate_separates_thinking(apis, f) -> None:
    answer = apis["native"].client.generate(
        model=model_name(THINKING, f),
        prompt="What is the weather in Paris?",
        think=True,
        options={"temperature": 0, "num_predict": 16},
    )
    assert answer.thinking.strip() == THINKING_REASONING
    assert answer.response.strip() == THINKING_ANSWER


def test_generate_think_on_a_model_without_thinking_is_400(apis) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        apis["native"].client.generate(model=model_name(PLAIN, "gguf"), prompt="Hi", think=True)
    assert info.value.status_code == 400


def test_native_think_levels_turn_thinking_on(apis) -> None:
    answer = apis["native"].client.chat(
        model=model_name(THINKING, "gguf"),
        think="low",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        options={"temperature": 0, "num_predict": 16},
    )
    assert answer.message.thinking.strip() == THINKING_REASONING
    assert answer.message.content.strip() == THINKING_ANSWER


@pytest.mark.parametrize(
    ("model", "present", "absent", "native"),
    [
        (model_name(HERMES, "mlx"), {"completion", "tools"}, {"thinking", "embedding"}, True),
        *(
            (model_name(family, "gguf"), {"completion", "tools"}, {"thinking"}, True)
            for family in TOOL_FAMILIES
        ),
        (model_name(THINKING, "mlx"), {"completion", "thinking", "tools"}, set(), False),
        (model_name(THINKING, "gguf"), {"completion", "thinking", "tools"}, set(), False),
        (model_name(PLAIN, "gguf"), {"completion", "tools"}, {"thinking", "vision"}, False),
        (DEFAULT_MODEL, {"completion", "tools"}, {"thinking", "vision"}, False),
    ],
)
def test_show_reports_capabilities_from_template_and_vocabulary(
    apis, model, present, absent, native
):
    """Every model that completes accepts tools (llm's Ollama plugin refuses to send tools
    unless ``tools`` is listed); ``native_tools`` says whether its template shows them."""
    shown = apis["native"].client.show(model)
    capabilities = set(shown.capabilities or [])
    assert present <= capabilities
    assert not absent & capabilities
    raw = httpx.post(f"{apis['native'].url}/api/show", json={"model": model}, timeout=TIMEOUT_S)
    assert raw.json()["native_tools"] is native


def test_anthropic_client_authenticates_with_x_api_key(tiny_models, tmp_path) -> None:
    """The ``anthropic`` client sends its key as ``x-api-key``, not as a bearer token."""
    from tests.conftest import populated_store
    from tests.daemon import Daemon

    key = "s3cret"
    daemon = Daemon(populated_store(tmp_path / "home", tiny_models).root, ["--api-key", key])
    daemon.start()
    try:
        request = {
            "model": "tiny:gguf",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "Hi"}],
        }
        good = anthropic.Anthropic(base_url=daemon.url, api_key=key, max_retries=0)
        assert good.messages.create(**request).usage.output_tokens == 2
        bad = anthropic.Anthropic(base_url=daemon.url, api_key="nope", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as info:
            bad.messages.create(**request)
        body = info.value.response.json()
        assert AnthropicMessages.error_message(body)
        assert body["error"]["type"] == "authentication_error"
    finally:
        daemon.stop()
