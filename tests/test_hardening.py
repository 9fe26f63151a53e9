"""Issue 9: no request, template or model file can crash, freeze or exhaust the daemon.

Each reproduction from the issue runs against one real daemon (module-scoped) and is followed
by ``/api/health``, which must answer within a second: the daemon survived and is not busy.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from modelstore import mediatypes
from modelstore.draft import TEMPLATE_TITLE
from modelstore.errors import ImportSourceError
from modelstore.gguf_header import check_gguf_header
from modelstore.sources import draft_from_path
from modelstore.store import ModelStore
from tests.cli import mlxctl
from tests.daemon import Daemon

HEALTH_TIMEOUT = aiohttp.ClientTimeout(total=1.0)
RECURSIVE_TEMPLATE = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
FREEZING_TEMPLATE = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
)
CENTER_TEMPLATE = "{{ ('x'|center(8000000000))|length }}"
HOSTILE_TEMPLATES = {
    "recursive": RECURSIVE_TEMPLATE,
    "freezing": FREEZING_TEMPLATE,
    "center": CENTER_TEMPLATE,
}
BAD_SCHEMAS = [
    {"enum": []},
    {"anyOf": []},
    {"type": "bogus"},
    {"$ref": "#/definitions/x"},
    {"type": "string", "pattern": "["},
]
MODELS = ["tiny:gguf", "tiny:mlx"]


def hostile_gguf(path: Path) -> Path:
    """169 bytes claiming a metadata array of 2**62 strings (gguf-py loops and allocates)."""
    key = b"tokenizer.ggml.tokens"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    header += struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 8, 1 << 62)
    path.write_bytes(header + b"\x01" * (169 - len(header)))
    return path


async def assert_healthy(session: aiohttp.ClientSession, daemon: Daemon) -> None:
    async with session.get(f"{daemon.url}/api/health", timeout=HEALTH_TIMEOUT) as response:
        assert response.status == 200
    assert daemon.process is not None and daemon.process.poll() is None


def store_with_template(store: ModelStore, gguf: Path, name: str, template: str) -> None:
    """A model whose stored template layer is hostile, as a store from before the template
    probe (or a registry that does not probe) could hold."""
    draft = draft_from_path(gguf)
    draft.replace_layer(mediatypes.CHAT_TEMPLATE, TEMPLATE_TITLE, template.encode())
    store.commit(draft, name)


@pytest.fixture(scope="module")
def hostile_store(daemon, tiny_models) -> ModelStore:
    store = ModelStore(daemon.home)
    for label, template in HOSTILE_TEMPLATES.items():
        store_with_template(store, tiny_models.gguf_path, f"hostile-{label}:1", template)
    return store


def error_code(path: str, body: dict) -> str:
    return body["error"]["code"] if path.startswith("/v1/") else body["code"]


def schema_requests(model: str, schema: dict) -> list[tuple[str, dict]]:
    messages = [{"role": "user", "content": "Hi"}]
    return [
        ("/api/chat", {"model": model, "messages": messages, "format": schema, "stream": False}),
        ("/api/generate", {"model": model, "prompt": "Hi", "format": schema, "stream": False}),
        ("/v1/chat/completions", {
            "model": model, "messages": messages,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "x", "schema": schema}}}),
    ]  # fmt: skip


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("schema", BAD_SCHEMAS, ids=json.dumps)
async def test_an_invalid_or_unsatisfiable_schema_is_a_400_on_every_runner(daemon, model, schema):
    async with aiohttp.ClientSession() as session:
        for path, body in schema_requests(model, schema):
            async with session.post(f"{daemon.url}{path}", json=body) as response:
                payload = await response.json()
                assert response.status == 400, payload
                assert error_code(path, payload) == "invalid_format"
            await assert_healthy(session, daemon)


@pytest.mark.parametrize("label", HOSTILE_TEMPLATES)
async def test_a_hostile_stored_template_is_a_template_error(daemon, hostile_store, label):
    async with aiohttp.ClientSession() as session:
        chat = asyncio.ensure_future(session.post(f"{daemon.url}/api/chat", json={
            "model": f"hostile-{label}:1", "messages": [{"role": "user", "content": "Hi"}],
            "stream": False}))  # fmt: skip
        await asyncio.sleep(0.2)
        await assert_healthy(session, daemon)
        response = await chat
        payload = await response.json()
        assert response.status == 400
        assert payload["code"] == "template_error"
        assert "Traceback" not in payload["error"]
        await assert_healthy(session, daemon)


def test_mlxctl_run_reports_a_recursive_template_in_one_line(tmp_path, tiny_models):
    store = ModelStore(tmp_path / "home")
    store_with_template(store, tiny_models.gguf_path, "recursive:1", RECURSIVE_TEMPLATE)
    result = mlxctl("run", "recursive:1", "Hi", home=store.root, check=False, timeout=120)
    assert result.returncode == 1
    assert "Error [template_error]" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) < 5


def test_a_gguf_claiming_a_huge_array_is_refused_by_the_header_check(tmp_path, tiny_models):
    with pytest.raises(ImportSourceError, match="over the limit"):
        check_gguf_header(hostile_gguf(tmp_path / "bomb.gguf"))
    check_gguf_header(tiny_models.gguf_path)


def test_the_default_models_header_passes_the_check(default_gguf):
    check_gguf_header(default_gguf)


def test_mlxctl_import_refuses_a_gguf_claiming_a_huge_array(tmp_path):
    bomb = hostile_gguf(tmp_path / "bomb.gguf")
    result = mlxctl(
        "import", str(bomb), "--name", "bomb:1", home=tmp_path / "home", check=False, timeout=60
    )
    assert result.returncode == 1
    assert "Error [invalid_import_source]" in result.stderr


async def test_blobs_and_create_refuse_a_gguf_claiming_a_huge_array(daemon, tmp_path):
    from modelstore.blobs import hash_file

    bomb = hostile_gguf(tmp_path / "bomb.gguf")
    digest, _ = hash_file(bomb)
    async with aiohttp.ClientSession() as session:
        uploaded = await session.post(f"{daemon.url}/api/blobs/{digest}", data=bomb.read_bytes())
        assert uploaded.status in (200, 201)
        created = await session.post(
            f"{daemon.url}/api/create",
            json={"model": "bomb:1", "files": {"model.gguf": digest}, "stream": False},
        )
        payload = await created.json()
        assert created.status == 400, payload
        assert payload["code"] == "invalid_import_source"
        assert str(daemon.home) not in payload["error"]
        assert "/tmp" not in payload["error"]
        await assert_healthy(session, daemon)


EMPTY_STRINGS = 2_000_000
DAEMON_PEAK_RSS_BYTES = 300 << 20
"""Issue 21: the daemon's peak RSS (``VmHWM``) after refusing the empty-strings GGUF."""


def string_array_gguf(path: Path, arrays: dict[str, list[bytes]]) -> Path:
    """A GGUF header holding only string-array metadata (its sizes all true)."""
    parts = [b"GGUF", struct.pack("<IQQ", 3, 0, len(arrays))]
    for key, items in arrays.items():
        parts.append(struct.pack("<Q", len(key)) + key.encode())
        parts.append(struct.pack("<IIQ", 9, 8, len(items)))
        parts.extend(struct.pack("<Q", len(item)) + item for item in items)
    path.write_bytes(b"".join(parts))
    return path


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_real_sized_vocabulary_passes_the_header_check(tmp_path):
    """~262k tokens (Gemma 3's vocabulary) and 500k BPE merges: a model, not an attack."""
    tokens = [f"tok{i}".encode() for i in range(262_144)]
    merges = [f"a{i} b{i}".encode() for i in range(500_000)]
    gguf = tmp_path / "vocab.gguf"
    check_gguf_header(
        string_array_gguf(gguf, {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges})
    )


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
async def test_a_gguf_of_two_million_empty_strings_is_refused_with_the_daemon_small(
    tiny_models, tmp_path
):
    from modelstore.blobs import hash_file

    bomb = string_array_gguf(
        tmp_path / "empty.gguf", {"tokenizer.ggml.tokens": [b""] * EMPTY_STRINGS}
    )
    assert bomb.stat().st_size >= 16_000_000
    digest, _ = hash_file(bomb)
    daemon = Daemon(tmp_path / "home").start()
    try:
        async with aiohttp.ClientSession() as session:
            uploaded = await session.post(
                f"{daemon.url}/api/blobs/{digest}", data=bomb.read_bytes()
            )
            assert uploaded.status == 201
            created = await session.post(
                f"{daemon.url}/api/create",
                json={"model": "empty:1", "files": {"model.gguf": digest}, "stream": False},
            )
            payload = await created.json()
            assert created.status == 400, payload
            assert payload["code"] == "invalid_import_source"
            assert "strings" in payload["error"]
            await assert_healthy(session, daemon)
        assert daemon.process is not None
        assert peak_rss(daemon.process.pid) < DAEMON_PEAK_RSS_BYTES
    finally:
        daemon.stop()


def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    import zipfile

    from modelstore.importer import ZIP_MAX_RATIO, extract_zip

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model/config.json", "{}")
        archive.writestr("model/model.safetensors", b"\0" * (64 << 20))
    sizes = zipfile.ZipFile(bomb).infolist()
    assert sum(i.file_size for i in sizes) > ZIP_MAX_RATIO * sum(i.compress_size for i in sizes)
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(ImportSourceError, match="compression"):
        extract_zip(bomb, target)
    assert not any(target.iterdir())


async def test_show_and_load_survive_a_stored_gguf_claiming_a_huge_array(daemon, tmp_path):
    """As after a registry pull: the blob is in the store, nothing parsed it yet. ``show``
    answers from the manifest; loading it fails without taking the daemon down."""
    from modelstore.draft import LayerSource, ModelConfig, ModelDraft

    bomb = hostile_gguf(tmp_path / "bomb.gguf")
    draft = ModelDraft(
        ModelConfig(format="gguf"), [LayerSource(mediatypes.WEIGHTS_GGUF, "bomb.gguf", path=bomb)]
    )
    ModelStore(daemon.home).commit(draft, "pulled-bomb:1")
    async with aiohttp.ClientSession() as session:
        shown = await session.post(f"{daemon.url}/api/show", json={"model": "pulled-bomb:1"})
        assert shown.status in (200, 400), await shown.text()
        await assert_healthy(session, daemon)
        loaded = await session.post(
            f"{daemon.url}/api/generate",
            json={"model": "pulled-bomb:1", "prompt": "Hi", "stream": False},
        )
        assert loaded.status >= 400, await loaded.text()
        await assert_healthy(session, daemon)


@pytest.mark.parametrize("label", HOSTILE_TEMPLATES)
async def test_create_refuses_a_hostile_template_before_storing(daemon, label):
    async with aiohttp.ClientSession() as session:
        created = await session.post(
            f"{daemon.url}/api/create",
            json={
                "model": f"made-{label}:1",
                "from": "tiny:gguf",
                "template": HOSTILE_TEMPLATES[label],
                "stream": False,
            },
        )
        assert created.status == 400, await created.text()
        listed = await (await session.get(f"{daemon.url}/api/tags")).json()
        assert f"made-{label}:1" not in {m["name"] for m in listed["models"]}
        await assert_healthy(session, daemon)


def test_import_refuses_a_folder_with_a_hostile_template(tmp_path, mini_hf_folder):
    (mini_hf_folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": RECURSIVE_TEMPLATE})
    )
    result = mlxctl(
        "import",
        str(mini_hf_folder),
        "--name",
        "mini:1",
        home=tmp_path / "home",
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Error [template_error]" in result.stderr


def raw_request(daemon: Daemon, headers: str) -> str:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(f"GET /api/tags HTTP/1.1\r\n{headers}Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.decode(errors="replace")


@pytest.mark.parametrize(
    "headers",
    [
        "Host: evil.example.com\\@127.0.0.1\r\n",
        "Host: evil.example.com@127.0.0.1\r\n",
        "Host: 127.0.0.1\r\nOrigin: http://evil.example.com@127.0.0.1\r\n",
        "Host: 127.0.0.1\r\nOrigin: http://127.0.0.1\\@evil.example.com\r\n",
        "Host: 127.0.0.1 evil\r\n",
    ],
)
def test_host_or_origin_with_userinfo_or_odd_characters_is_refused(daemon, headers):
    answer = raw_request(daemon, headers)
    assert answer.startswith("HTTP/1.1 403"), answer[:200]


def test_plain_local_host_and_origin_are_allowed(daemon):
    answer = raw_request(daemon, f"Host: 127.0.0.1:{daemon.port}\r\nOrigin: http://localhost\r\n")
    assert answer.startswith("HTTP/1.1 200")


async def test_a_wrong_method_is_405_with_an_allow_header(daemon):
    async with aiohttp.ClientSession() as session:
        response = await session.put(f"{daemon.url}/api/tags")
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD"
        assert (await response.json())["code"] == "method_not_allowed"


@pytest.mark.parametrize("key", ["", "   ", "\t"])
def test_a_blank_api_key_is_refused_at_start(tmp_path, key):
    import subprocess

    from tests.daemon import MLXSERVE

    for how in (["--api-key", key], []):
        env = {**__import__("os").environ, "MLXSERVE_HOME": str(tmp_path)}
        if not how:
            env["MLXSERVE_API_KEY"] = key
        result = subprocess.run(
            [MLXSERVE, "--port", "0", *how],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0
        assert "API key is blank" in result.stderr


@pytest.fixture(scope="module")
def slow_model(daemon, default_gguf) -> str:
    """The real default model: slow enough here that a stream holds its one slot for seconds."""
    from modelstore.importer import import_path

    import_path(ModelStore(daemon.home), default_gguf, "slow:gguf")
    return "slow:gguf"


def gauges(text: str, model: str) -> tuple[float, float]:
    values = {}
    for line in text.splitlines():
        for name in ("mlxserve_active_requests", "mlxserve_queue_depth"):
            if line.startswith(name + "{") and model in line:
                values[name] = float(line.rsplit(" ", 1)[1])
    return values.get("mlxserve_active_requests", 0.0), values.get("mlxserve_queue_depth", 0.0)


async def wait_for_gauges(session, daemon, model: str, expected: tuple[float, float]) -> None:
    seen = None
    for _ in range(100):
        seen = gauges(await (await session.get(f"{daemon.url}/metrics")).text(), model)
        if seen == expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"gauges (active, queued) stayed {seen}, expected {expected}")


async def test_gauges_count_waiting_requests_and_fall_back_after_aborts(daemon, slow_model):
    stream = {
        "model": slow_model,
        "prompt": "Tell a story",
        "stream": True,
        "options": {"num_predict": 100000},
    }
    async with aiohttp.ClientSession() as session:
        running = [await session.post(f"{daemon.url}/api/generate", json=stream)]
        await running[0].content.readline()
        async with session.get(f"{daemon.url}/api/ps") as listed:
            (entry,) = [m for m in (await listed.json())["models"] if m["name"] == slow_model]
        slots = entry["slots"]
        for _ in range(slots - 1):
            running.append(await session.post(f"{daemon.url}/api/generate", json=stream))
            await running[-1].content.readline()
        waiting = asyncio.ensure_future(session.post(f"{daemon.url}/api/generate", json=stream))
        await wait_for_gauges(session, daemon, slow_model, (float(slots), 1.0))
        waiting.cancel()
        await wait_for_gauges(session, daemon, slow_model, (float(slots), 0.0))
        for response in running:
            response.close()
        await wait_for_gauges(session, daemon, slow_model, (0.0, 0.0))
        await assert_healthy(session, daemon)


async def test_errors_never_name_server_paths(daemon):
    import hashlib
    import tempfile

    data = b"not a model"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with aiohttp.ClientSession() as session:
        await session.post(f"{daemon.url}/api/blobs/{digest}", data=data)
        created = await session.post(
            f"{daemon.url}/api/create",
            json={"model": "pathless:1", "files": {"notes.txt": digest}, "stream": False},
        )
        text = await created.text()
        assert created.status == 400, text
        for private in (tempfile.gettempdir(), str(daemon.home)):
            assert private not in text


def middleware_app(handler) -> Any:
    """A real aiohttp app with the daemon's middlewares around one route."""
    from aiohttp import web

    from mlxserve.server.config import Settings
    from mlxserve.server.metrics import Metrics
    from mlxserve.server.middleware import add_request_id, make_middlewares

    app = web.Application(middlewares=make_middlewares(Settings(), Metrics()))
    app.router.add_get("/x", handler)
    app.on_response_prepare.append(add_request_id)
    return app


async def test_an_unexpected_error_is_a_500_with_the_request_id_and_no_text(caplog):
    from aiohttp.test_utils import TestClient, TestServer

    async def broken(request):
        raise ValueError("secret detail from /srv/private/store")

    async with TestClient(TestServer(middleware_app(broken), host="127.0.0.1")) as client:
        response = await client.get("/x", headers={"Host": "127.0.0.1"})
        body = await response.json()
    assert response.status == 500
    assert body["code"] == "internal_error"
    assert response.headers["X-Request-Id"] in body["error"]
    assert "secret" not in json.dumps(body) and "/srv" not in json.dumps(body)


async def test_a_client_reset_during_write_eof_is_a_499_line_not_a_traceback(caplog):
    """Without handler cancellation the reset reaches the handler as ``write_eof`` raising
    (the daemon cancels handlers, but a reset can still land inside the write itself)."""
    import logging

    from aiohttp import web

    reset = asyncio.Event()

    async def stream(request):
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first\n")
        await reset.wait()
        await asyncio.sleep(0.2)
        await response.write_eof(b"last\n")
        return response

    caplog.set_level(logging.INFO)
    runner = web.AppRunner(middleware_app(stream), handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        await reader.readuntil(b"first\n")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        reset.set()
        await asyncio.sleep(0.5)
    finally:
        await runner.cleanup()
    access = [r.getMessage() for r in caplog.records if r.name == "mlxserve.access"]
    assert any('"status": 499' in line for line in access), access
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


@pytest.mark.parametrize(
    "extra",
    [
        {"logit_bias": {"999999999": 5}},
        {"seed": -1},
        {"seed": 1 << 70},
        {"temperature": -1},
        {"stream_options": [1]},
    ],
    ids=json.dumps,
)
async def test_values_the_samplers_cannot_take_are_400s(daemon, extra):
    """Found by the fuzz run: an out-of-range logit_bias id killed the daemon inside MLX."""
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{daemon.url}/v1/completions",
            json={"model": "tiny:mlx", "prompt": "Hi", "max_tokens": 2, **extra},
        )
        assert response.status in (200, 400), await response.text()
        if "stream_options" not in extra:
            assert response.status == 400
        await assert_healthy(session, daemon)
