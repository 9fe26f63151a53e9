"""The real daemon driven by the real ``ollama`` and ``openai`` client packages.

Clients written for Ollama or OpenAI must work by changing only the base URL.
"""

from __future__ import annotations

import json

import ollama
import openai
import pytest

GGUF = "tiny:gguf"
MLX = "tiny:mlx"
QUIET = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def ollama_client(daemon):
    return ollama.Client(host=daemon.url)


@pytest.fixture(scope="module")
def openai_client(daemon):
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused")


def test_ollama_generate(ollama_client):
    response = ollama_client.generate(model=GGUF, prompt="The capital of France is", options=QUIET)
    assert response.done and response.done_reason == "length"
    assert response.eval_count == 8
    assert response.response
    assert response.prompt_eval_count > 0 and response.total_duration > 0


def test_ollama_generate_streams(ollama_client):
    parts = list(ollama_client.generate(model=GGUF, prompt="Hello", options=QUIET, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert 2 <= len(parts) <= 9, "one line per token that released text, then the last"
    assert parts[-1].eval_count == 8


@pytest.mark.parametrize("model", [GGUF, MLX])
def test_ollama_chat_on_each_runner(ollama_client, model):
    response = ollama_client.chat(
        model=model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        options=QUIET,
    )
    assert response.message.role == "assistant"
    assert response.message.content
    assert response.eval_count == 8


def test_ollama_chat_streams(ollama_client):
    parts = list(
        ollama_client.chat(
            model=GGUF, messages=[{"role": "user", "content": "Hi"}], options=QUIET, stream=True
        )
    )
    assert parts[-1].done and parts[-1].done_reason == "length"
    assert "".join(p.message.content for p in parts)


def test_ollama_chat_accepts_tools_and_tool_history(ollama_client):
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18C and sunny", "tool_name": "get_weather"},
    ]
    response = ollama_client.chat(model=GGUF, messages=messages, tools=[tool], options=QUIET)
    assert response.done


def test_ollama_embed_on_mlx(ollama_client):
    response = ollama_client.embed(model=MLX, input=["hello world", "goodbye"])
    assert len(response.embeddings) == 2
    assert len(response.embeddings[0]) == len(response.embeddings[1]) > 0


def test_ollama_list_show_ps(ollama_client):
    names = {m.model for m in ollama_client.list().models}
    assert {GGUF, MLX} <= names
    shown = ollama_client.show(GGUF)
    assert shown.details.format == "gguf"
    assert "im_start" in shown.template
    ollama_client.generate(model=GGUF, prompt="Hi", options=QUIET)
    running = {m.model for m in ollama_client.ps().models}
    assert GGUF in running


def test_ollama_copy_and_delete(ollama_client):
    ollama_client.copy(GGUF, "scratch:copy")
    assert "scratch:copy" in {m.model for m in ollama_client.list().models}
    ollama_client.delete("scratch:copy")
    assert "scratch:copy" not in {m.model for m in ollama_client.list().models}
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.delete("scratch:copy")
    assert info.value.status_code == 404


def test_ollama_unknown_model_is_404(ollama_client):
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.generate(model="nope:1", prompt="hi")
    assert info.value.status_code == 404


@pytest.mark.parametrize("model", [GGUF, MLX])
def test_ollama_json_schema_format_on_each_runner(ollama_client, model):
    schema = {
        "type": "object",
        "properties": {
            "city": {"enum": ["Paris", "Rome"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["city", "n"],
        "additionalProperties": False,
    }
    response = ollama_client.generate(
        model=model,
        prompt="Give a city as JSON",
        format=schema,
        options={"temperature": 0, "num_predict": 60},
    )
    value = json.loads(response.response)
    assert value["city"] in {"Paris", "Rome"}
    assert isinstance(value["n"], int)


def test_an_invalid_schema_is_400(ollama_client):
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.generate(model=MLX, prompt="Hi", format={"type": "nonsense"}, options=QUIET)
    assert info.value.status_code == 400


def test_openai_chat_completion(openai_client):
    response = openai_client.chat.completions.create(
        model=GGUF, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 8


def test_openai_chat_stream_with_usage(openai_client):
    stream = openai_client.chat.completions.create(
        model=GGUF,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text


def test_openai_cached_tokens_are_reported(openai_client):
    messages = [{"role": "user", "content": "Tell me about the quick brown fox and the dog."}]
    openai_client.chat.completions.create(model=MLX, messages=messages, max_tokens=2)
    again = openai_client.chat.completions.create(model=MLX, messages=messages, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_openai_logprobs(openai_client):
    response = openai_client.chat.completions.create(
        model=GGUF,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(entry.top_logprobs) == 2 for entry in content)


def test_openai_json_schema_response_format(openai_client):
    response = openai_client.chat.completions.create(
        model=GGUF,
        messages=[{"role": "user", "content": "A number please"}],
        max_tokens=40,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "n",
                "schema": {
                    "type": "object",
                    # Bounded, and closed: a random-weight model never ends an unbounded number
                    # or stops adding keys by itself.
                    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
                    "required": ["n"],
                    "additionalProperties": False,
                },
            },
        },
    )
    assert isinstance(json.loads(response.choices[0].message.content)["n"], int)


def test_openai_completions(openai_client):
    response = openai_client.completions.create(
        model=GGUF, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert response.choices[0].text
    assert response.usage.completion_tokens == 5


def test_openai_embeddings(openai_client):
    response = openai_client.embeddings.create(model=MLX, input=["a", "b c"])
    assert len(response.data) == 2 and len(response.data[0].embedding) > 0


def test_openai_models(openai_client):
    ids = {m.id for m in openai_client.models.list().data}
    assert {GGUF, MLX} <= ids
    assert openai_client.models.retrieve(GGUF).id == GGUF


def test_openai_errors_have_openai_shape(openai_client):
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.chat.completions.create(
            model="nope:1", messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model=GGUF, messages=[], max_tokens=1)
