"""Fields of Ollama's native chat and generate that only it has, on the real daemon: logprobs,
``context`` continuation, ``suffix`` (FIM), ``load_duration``, and the key header Anthropic's
clients send."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import ollama
import pytest

GGUF = "tiny:gguf"
QUIET = {"temperature": 0, "num_predict": 4}


def post(daemon, path: str, body: dict[str, Any], headers: dict[str, str] | None = None):
    request = urllib.request.Request(
        daemon.url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, [
                json.loads(line) for line in response.read().splitlines() if line.strip()
            ]
    except urllib.error.HTTPError as error:
        return error.code, [json.loads(error.read())]


@pytest.fixture(scope="module")
def client(daemon):
    return ollama.Client(host=daemon.url)


def test_logprobs_come_with_each_token_in_ollamas_shape(daemon):
    status, lines = post(
        daemon,
        "/api/generate",
        {
            "model": GGUF,
            "prompt": "Hello",
            "stream": False,
            "options": QUIET,
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    assert status == 200
    logprobs = lines[0]["logprobs"]
    assert len(logprobs) == 4
    first = logprobs[0]
    assert set(first) == {"token", "logprob", "bytes", "top_logprobs"}
    assert first["logprob"] <= 0 and len(first["top_logprobs"]) == 2
    assert first["bytes"] == list(first["token"].encode())


def test_context_continues_a_conversation(client):
    first = client.generate(model=GGUF, prompt="Hello", options=QUIET)
    assert first.context and all(isinstance(t, int) for t in first.context)
    follow = client.generate(model=GGUF, prompt="And?", context=first.context, options=QUIET)
    assert follow.prompt_eval_count > len(first.context)
    assert follow.context[: len(first.context)] == first.context


def test_suffix_on_a_model_without_fim_tokens_is_a_400(daemon):
    status, lines = post(
        daemon,
        "/api/generate",
        {
            "model": GGUF,
            "prompt": "def f(",
            "suffix": "    return x",
            "options": QUIET,
        },
    )
    assert status == 400
    assert lines[0]["code"] == "unsupported_feature"
    assert "insert" in lines[0]["error"]


def test_every_final_chunk_reports_a_load_duration(client):
    for _ in range(2):
        response = client.chat(
            model=GGUF, messages=[{"role": "user", "content": "Hi"}], options=QUIET
        )
        assert response.load_duration > 0
        assert response.total_duration >= response.load_duration
        assert isinstance(response.eval_count, int)


def test_think_true_on_a_model_without_thinking_is_a_400_and_false_is_ignored(client):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(
            model=GGUF, messages=[{"role": "user", "content": "Hi"}], think=True, options=QUIET
        )
    assert caught.value.status_code == 400
    answer = client.chat(
        model=GGUF, messages=[{"role": "user", "content": "Hi"}], think=False, options=QUIET
    )
    assert answer.message.content and not answer.message.thinking


def test_string_tool_arguments_in_history_are_accepted_natively_as_on_v1(daemon):
    status, _ = post(
        daemon,
        "/api/chat",
        {
            "model": GGUF,
            "stream": False,
            "options": QUIET,
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
                    ],
                },
                {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
            ],
        },
    )
    assert status == 200
