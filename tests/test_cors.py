"""Browsers, extensions and editor webviews: CORS as Ollama answers it, checked with raw HTTP
for every kind of default origin and a foreign one, and from a real headless Chromium page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import populated_store
from tests.daemon import Daemon, free_port

ALLOWED = [
    "http://localhost",
    "http://localhost:5173",
    "https://127.0.0.1:8443",
    "http://0.0.0.0:3000",
    "http://[::1]:8080",
    "app://obsidian.md",
    "file://",
    "tauri://localhost",
    "vscode-webview://1a2b3c4d",
    "vscode-file://vscode-app",
    "https://team.example.com",
]
"""One of each default kind, plus one allowed through MLXSERVE_ORIGINS' wildcard."""
REFUSED = [
    "https://evil.example",
    "http://localhost.evil.example",
    "http://evil.example@127.0.0.1",
    "chrome-extension://abcdef",
    "null",
]


@pytest.fixture(scope="module")
def cors_daemon(tiny_models, tmp_path_factory: pytest.TempPathFactory):
    store = populated_store(tmp_path_factory.mktemp("cors") / "home", tiny_models)
    running = Daemon(store.root, env={"MLXSERVE_ORIGINS": "https://*.example.com"}).start()
    yield running
    running.stop()


@pytest.mark.parametrize("origin", ALLOWED)
async def test_an_allowed_origin_gets_preflight_and_headers(cors_daemon, origin):
    async with aiohttp.ClientSession() as session:
        async with session.options(
            f"{cors_daemon.url}/api/chat",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        ) as preflight:
            assert preflight.status == 204
            assert preflight.headers["Access-Control-Allow-Origin"] == origin
            assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
            assert "content-type" in preflight.headers["Access-Control-Allow-Headers"]
        async with session.get(
            f"{cors_daemon.url}/api/tags", headers={"Origin": origin}
        ) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == origin


@pytest.mark.parametrize("origin", REFUSED)
async def test_a_foreign_origin_is_refused(cors_daemon, origin):
    async with aiohttp.ClientSession() as session:
        async with session.options(
            f"{cors_daemon.url}/api/chat",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        ) as preflight:
            assert preflight.status == 403
            assert "Access-Control-Allow-Origin" not in preflight.headers
        async with session.get(
            f"{cors_daemon.url}/api/tags", headers={"Origin": origin}
        ) as response:
            assert response.status == 403
            assert "Access-Control-Allow-Origin" not in response.headers


async def test_root_and_head_answer_like_ollama(cors_daemon):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cors_daemon.url}/") as root:
            assert root.status == 200 and await root.text() == "mlxserve is running"
        for path in ("/", "/api/version", "/api/tags"):
            async with session.head(f"{cors_daemon.url}{path}") as head:
                assert head.status == 200, path
        missing = "sha256:" + "0" * 64
        async with session.head(f"{cors_daemon.url}/api/blobs/{missing}") as head:
            assert head.status == 404


PAGE = """<!doctype html><script>
async function probe() {
  const out = {};
  try {
    const r = await fetch("%(daemon)s/api/chat", {method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model: "tiny:gguf", stream: false,
        messages: [{role: "user", content: "Hi"}], options: {num_predict: 2}})});
    out.status = r.status; out.body = await r.json();
  } catch (e) { out.error = String(e); }
  await fetch("/report", {method: "POST", body: JSON.stringify(out)});
}
probe();
</script>"""


async def browser_result(daemon_url: str, page_host: str) -> dict:
    """Serve PAGE on ``page_host``, open it in headless Chromium, return what it reported."""
    reported: asyncio.Future[dict] = asyncio.get_running_loop().create_future()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE % {"daemon": daemon_url}, content_type="text/html")

    async def report(request: web.Request) -> web.Response:
        if not reported.done():
            reported.set_result(json.loads(await request.text()))
        return web.Response()

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/report", report)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    browser = subprocess.Popen(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}",
            f"--host-resolver-rules=MAP {page_host} 127.0.0.1",
            f"http://{page_host}:{port}/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/tmp",
    )
    try:
        return await asyncio.wait_for(reported, timeout=60)
    finally:
        browser.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            browser.wait(timeout=10)
        if browser.poll() is None:
            browser.kill()
        await runner.cleanup()


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (scripts/install-system-deps.sh)",
)
async def test_a_localhost_page_in_chromium_can_chat_and_a_foreign_one_cannot(cors_daemon):
    local = await browser_result(cors_daemon.url, "localhost")
    assert local.get("status") == 200, local
    assert local["body"]["message"]["role"] == "assistant"
    foreign = await browser_result(cors_daemon.url, "evil.test")
    assert "status" not in foreign and "Failed to fetch" in foreign["error"], foreign
