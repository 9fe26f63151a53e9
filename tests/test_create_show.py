"""``/api/create`` and ``/api/show`` as Ollama's clients expect them, against the real daemon."""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.conftest import populated_store
from tests.daemon import Daemon
from tests.fixtures.family_ggufs import CASES, make_family_gguf


@pytest.fixture(scope="module")
def store_daemon(tiny_models, tmp_path_factory: pytest.TempPathFactory):
    """Tiny models plus a template-less Gemma-like GGUF (``gemma:test``)."""
    from modelstore.importer import import_path

    root = tmp_path_factory.mktemp("create-show")
    store = populated_store(root / "home", tiny_models)
    import_path(store, make_family_gguf(root / "gemma.gguf", CASES["gemma"]), "gemma:test")
    running = Daemon(store.root).start()
    yield running
    running.stop()


async def post(daemon: Daemon, path: str, body: dict) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{daemon.url}{path}", json=body) as response,
    ):
        return response.status, await response.text()


async def show(daemon: Daemon, name: str) -> dict:
    status, text = await post(daemon, "/api/show", {"model": name})
    assert status == 200, text
    return json.loads(text)


async def test_create_from_keeps_the_parents_settings_and_takes_ollama_names(store_daemon):
    status, text = await post(
        store_daemon,
        "/api/create",
        {
            "model": "parent:1",
            "from": "tiny:gguf",
            "system": "Be terse.",
            "license": "MIT",
            "parameters": {"temperature": 0.2, "num_predict": 7, "stop": ["END"]},
            "stream": False,
        },
    )
    assert status == 200, text
    status, text = await post(
        store_daemon,
        "/api/create",
        {
            "model": "child:1",
            "from": "parent:1",
            "stream": False,
            "parameters": {"num_ctx": 512, "repeat_penalty": 1.1, "repeat_last_n": 32},
        },
    )
    assert status == 200, text
    child = await show(store_daemon, "child:1")
    assert child["system"] == "Be terse."
    assert child["license"] == "MIT"
    assert child["details"]["parent_model"] == "parent:1"
    lines = dict(line.split(None, 1) for line in child["parameters"].splitlines())
    assert lines == {
        "temperature": "0.2",
        "num_predict": "7",
        "stop": '"END"',
        "num_ctx": "512",
        "repeat_penalty": "1.1",
        "repeat_last_n": "32",
    }
    assert "<|im_start|>" in child["template"]
    assert child["modelfile"].startswith("# Modelfile")
    assert "FROM child:1" in child["modelfile"] and "PARAMETER num_ctx" in child["modelfile"]
    assert 'SYSTEM """Be terse."""' in child["modelfile"]


async def test_show_has_the_fields_ollama_clients_read(store_daemon):
    shown = await show(store_daemon, "tiny:gguf")
    assert shown["details"]["format"] == "gguf"
    assert shown["details"]["family"] == "llama"
    info = shown["model_info"]
    assert info["general.architecture"] == "llama"
    assert info["general.parameter_count"] > 0
    for key in (
        "context_length",
        "embedding_length",
        "block_count",
        "attention.head_count",
        "attention.head_count_kv",
        "vocab_size",
    ):
        assert f"llama.{key}" in info, key
    assert shown["capabilities"] == ["completion", "tools"]
    assert shown["native_tools"] is False
    assert "warnings" not in shown


async def test_show_warns_about_an_inferred_template_and_shows_it(store_daemon):
    shown = await show(store_daemon, "gemma:test")
    assert shown["template"].startswith("{{ bos_token }}")
    assert "<start_of_turn>" in shown["template"]
    assert shown["template_source"] == "inferred:gemma"
    assert "inferred" in shown["warnings"][0]


async def test_a_go_template_is_refused_with_where_the_model_template_is(store_daemon):
    status, text = await post(
        store_daemon,
        "/api/create",
        {
            "model": "go:1",
            "from": "tiny:gguf",
            "template": "{{ .System }} {{ .Prompt }}",
            "stream": False,
        },
    )
    assert status == 400
    message = json.loads(text)["error"]
    assert "Go template" in message and "Jinja" in message and "/api/show" in message
    assert "mlxserve-create" not in message and "spec.yaml" not in message


async def test_create_errors_never_name_a_temporary_file(store_daemon):
    status, text = await post(
        store_daemon,
        "/api/create",
        {
            "model": "bad:1",
            "from": "tiny:gguf",
            "parameters": {"temperature": "hot"},
            "stream": False,
        },
    )
    assert status == 400
    assert "/tmp" not in text and "mlxserve-create" not in text and "spec.yaml" not in text


async def test_a_failed_streamed_create_ends_with_its_error(store_daemon):
    status, text = await post(
        store_daemon,
        "/api/create",
        {"model": "broken:1", "from": "tiny:gguf", "template": "{% if %}"},
    )
    assert status == 200  # the stream began, so the error comes as its last line
    lines = [json.loads(line) for line in text.splitlines()]
    assert "error" in lines[-1], lines
    assert {"status": "success"} not in lines


async def test_an_invalid_name_is_refused_before_any_work(store_daemon):
    status, text = await post(
        store_daemon, "/api/create", {"model": "Bad Name!", "from": "tiny:gguf"}
    )
    assert status == 400
    assert json.loads(text)["code"] == "invalid_reference"
    assert "status" not in text


async def test_a_failed_streamed_pull_ends_with_its_error(store_daemon):
    from tests.daemon import free_port

    status, text = await post(
        store_daemon,
        "/api/pull",
        {"model": f"127.0.0.1:{free_port()}/team/absent:1", "insecure": True},
    )
    assert status == 200  # the pull reported progress before it failed: a stream
    lines = [json.loads(line) for line in text.splitlines()]
    assert "status" in lines[0] and "error" in lines[-1], lines
    assert {"status": "success"} not in lines
