"""Token tools (``/tokenize``, ``/detokenize``, ``/apply-template``, ``/api/tokenize``,
``/api/detokenize``) on a real daemon, on both runners, with the requests of llama.cpp server's
README: the counts must agree with what generation reports as ``prompt_eval_count``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

MODELS = ["tiny:mlx", "tiny:gguf"]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "The capital of France is"},
]


def post(daemon, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        daemon.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("model", MODELS)
def test_tokenize_with_pieces_spells_the_content(daemon, model):
    """llama.cpp's example: ``{"content": "Hello world", "with_pieces": true}``."""
    content = "Hello world"
    status, plain = post(daemon, "/tokenize", {"model": model, "content": content})
    assert status == 200 and plain["tokens"] and all(isinstance(t, int) for t in plain["tokens"])
    _, pieces = post(daemon, "/tokenize", {"model": model, "content": content, "with_pieces": True})
    assert [p["id"] for p in pieces["tokens"]] == plain["tokens"]
    assert "".join(p["piece"] for p in pieces["tokens"]) == content


@pytest.mark.parametrize("model", MODELS)
def test_detokenize_inverts_tokenize(daemon, model):
    content = "The quick brown fox jumps over the lazy dog."
    _, tokens = post(daemon, "/tokenize", {"model": model, "content": content})
    status, back = post(daemon, "/detokenize", {"model": model, "tokens": tokens["tokens"]})
    assert status == 200 and back == {"content": content}


@pytest.mark.parametrize("model", MODELS)
def test_ollama_routes_agree_with_llama_cpp_routes(daemon, model):
    content = "Hello world! How are you today?"
    _, tokens = post(daemon, "/tokenize", {"model": model, "content": content})
    status, native = post(daemon, "/api/tokenize", {"model": model, "content": content})
    assert status == 200 and native == {"model": model, "tokens": tokens["tokens"]}
    status, back = post(daemon, "/api/detokenize", {"model": model, "tokens": native["tokens"]})
    assert status == 200 and back == {"model": model, "content": content}


@pytest.mark.parametrize("model", MODELS)
def test_applied_template_counts_what_generation_reports(daemon, model):
    status, applied = post(daemon, "/apply-template", {"model": model, "messages": MESSAGES})
    assert status == 200
    assert applied["prompt"].endswith("<|im_start|>assistant\n")
    assert "The capital of France is" in applied["prompt"]
    _, tokens = post(daemon, "/tokenize", {"model": model, "content": applied["prompt"]})
    _, chat = post(
        daemon,
        "/api/chat",
        {"model": model, "messages": MESSAGES, "stream": False, "options": {"num_predict": 1}},
    )
    assert len(tokens["tokens"]) == chat["prompt_eval_count"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/detokenize", {"tokens": [1, 10**9]}),
        ("/detokenize", {"tokens": [-1]}),
        ("/detokenize", {"tokens": ["a"]}),
        ("/detokenize", {"tokens": [True]}),
        ("/api/detokenize", {"tokens": "1 2 3"}),
        ("/tokenize", {"content": 7}),
        ("/apply-template", {"messages": []}),
    ],
)
@pytest.mark.parametrize("model", MODELS)
def test_bad_input_is_a_400(daemon, model, path, body):
    status, answer = post(daemon, path, {"model": model, **body})
    assert status == 400, answer
    assert answer["code"] == "invalid_request"


def test_an_unknown_model_is_a_404(daemon):
    status, _ = post(daemon, "/tokenize", {"model": "nope:latest", "content": "hi"})
    assert status == 404
