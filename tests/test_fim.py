"""Fill-in-the-middle (``suffix``) on a model with FIM tokens, on both runners and both APIs.

The fixture is a scripted model (``tests/fixtures/scripted_models.py``) whose vocabulary has
Qwen-coder's ``<|fim_prefix|>``/``<|fim_suffix|>``/``<|fim_middle|>`` and whose greedy output
after ``<|fim_middle|>`` is the middle: so the answer proves the prompt was laid out
prefix-suffix-middle, and a prompt laid out any other way would not end in that token.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.fixtures.scripted_models import PLAIN_TEMPLATE, Family, make_scripted_model

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
MIDDLE = "return a + b"
FIM = Family(
    name="fim",
    chat_template=PLAIN_TEMPLATE,
    start="<|fim_middle|>",
    script=(MIDDLE,),
    special_tokens=FIM_TOKENS,
)
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def fim_daemon(tmp_path_factory):
    from modelstore.importer import import_path
    from modelstore.store import ModelStore
    from tests.daemon import Daemon

    root = tmp_path_factory.mktemp("fim")
    model = make_scripted_model(FIM, root / "models")
    store = ModelStore(root / "home")
    import_path(store, model.hf_folder, "fim:mlx")
    import_path(store, model.gguf_path, "fim:gguf")
    running = Daemon(store.root).start()
    yield running
    running.stop()


def post(daemon, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        daemon.url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("model", ["fim:mlx", "fim:gguf"])
def test_generate_with_a_suffix_returns_the_middle(fim_daemon, model):
    answer = post(
        fim_daemon,
        "/api/generate",
        {
            "model": model,
            "prompt": PREFIX,
            "suffix": SUFFIX,
            "stream": False,
            "options": {"temperature": 0, "num_predict": 8},
        },
    )
    assert answer["response"] == MIDDLE
    assert answer["done_reason"] == "stop"


def test_v1_completions_take_a_suffix_too(fim_daemon):
    answer = post(
        fim_daemon,
        "/v1/completions",
        {
            "model": "fim:gguf",
            "prompt": PREFIX,
            "suffix": SUFFIX,
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert answer["choices"][0]["text"] == MIDDLE


def test_a_fim_model_reports_the_insert_capability(fim_daemon):
    shown = post(fim_daemon, "/api/show", {"model": "fim:gguf"})
    assert "insert" in shown["capabilities"]
