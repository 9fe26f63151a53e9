"""LangChain's ``ChatOllama`` and ``ChatOpenAI`` against the real daemon: tools and structured
output, the way people build agents on a local server.

``ChatOllama`` sends no ``tool_choice`` (Ollama has none), so its calls come from a model that
calls on its own: the scripted hermes model (``tests/fixtures/scripted_models.py``).
``ChatOpenAI.with_structured_output(method="function_calling")`` names the tool in
``tool_choice``, which the daemon enforces by constrained decoding, so even a random-weight
model returns arguments that the schema accepts.
"""

from __future__ import annotations

from typing import Literal

import pytest
from langchain_core.tools import tool
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field

from tests.fixtures.scripted_models import (
    HERMES,
    SCRIPTED_CALL,
    THINKING,
    THINKING_ANSWER,
    THINKING_REASONING,
    model_name,
)

QUESTION = "What is the weather in Paris?"
FORMATS = ("mlx", "gguf")


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"Sunny in {city}"


class Forecast(BaseModel):
    """The weather forecast for the next days in a city."""

    # additionalProperties: false. Without it the schema lets a random model add keys forever.
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=7)
    unit: Literal["celsius", "fahrenheit"]


WEATHER_SCHEMA = {
    "title": "get_weather",
    "description": "The current weather in a city.",
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
"""A JSON Schema whose title is the scripted model's tool, for structured output by a call."""


def chat_ollama(daemon, model: str, **kwargs) -> ChatOllama:
    return ChatOllama(model=model, base_url=daemon.url, temperature=0, **kwargs)


def chat_openai(daemon, model: str) -> ChatOpenAI:
    return ChatOpenAI(
        model=model,
        base_url=f"{daemon.url}/v1",
        api_key="unused",
        temperature=0,
        max_tokens=96,
        max_retries=0,
    )


def scripted_tool_calls(message) -> list[dict]:
    return [{"name": call["name"], "arguments": call["args"]} for call in message.tool_calls]


@pytest.mark.parametrize("f", FORMATS)
def test_chat_ollama_bind_tools_returns_the_call(chat_daemon, f):
    llm = chat_ollama(chat_daemon, model_name(HERMES, f)).bind_tools([get_weather])
    message = llm.invoke(QUESTION)
    assert scripted_tool_calls(message) == [SCRIPTED_CALL]
    assert message.content == ""


def test_chat_ollama_streams_the_call(chat_daemon):
    llm = chat_ollama(chat_daemon, model_name(HERMES, "gguf")).bind_tools([get_weather])
    merged = None
    for chunk in llm.stream(QUESTION):
        merged = chunk if merged is None else merged + chunk
    assert scripted_tool_calls(merged) == [SCRIPTED_CALL]


def test_chat_ollama_structured_output_by_function_calling(chat_daemon):
    llm = chat_ollama(chat_daemon, model_name(HERMES, "gguf"))
    structured = llm.with_structured_output(WEATHER_SCHEMA, method="function_calling")
    assert structured.invoke(QUESTION) == SCRIPTED_CALL["arguments"]


def test_chat_ollama_reasoning_is_separated(chat_daemon):
    message = chat_ollama(chat_daemon, model_name(THINKING, "gguf"), reasoning=True).invoke(
        QUESTION
    )
    assert message.content.strip() == THINKING_ANSWER
    assert message.additional_kwargs["reasoning_content"].strip() == THINKING_REASONING
    assert "<think>" not in message.content


@pytest.mark.parametrize("f", FORMATS)
def test_chat_openai_bind_tools_returns_the_call(chat_daemon, f):
    llm = chat_openai(chat_daemon, model_name(HERMES, f)).bind_tools([get_weather])
    message = llm.invoke(QUESTION)
    assert scripted_tool_calls(message) == [SCRIPTED_CALL]


@pytest.mark.parametrize(
    "model", ["tiny:mlx", "tiny:gguf", pytest.param("smollm2:135m", marks=pytest.mark.slow)]
)
def test_chat_openai_structured_output_by_function_calling_fits_the_schema(chat_daemon, model):
    structured = chat_openai(chat_daemon, model).with_structured_output(
        Forecast, method="function_calling"
    )
    forecast = structured.invoke("Forecast for Paris for three days, in celsius.")
    assert isinstance(forecast, Forecast)


def test_chat_openai_tool_round_trip_renders(chat_daemon):
    llm = chat_openai(chat_daemon, model_name(HERMES, "gguf")).bind_tools([get_weather])
    first = llm.invoke(QUESTION)
    call = first.tool_calls[0]
    result = get_weather.invoke(call)
    second = llm.invoke([("user", QUESTION), first, result])
    assert second.response_metadata["finish_reason"] in ("stop", "tool_calls")
    assert second.usage_metadata["input_tokens"] > first.usage_metadata["input_tokens"]
