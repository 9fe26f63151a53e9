"""The web page (``mlxserve/server/webui``): served to browsers only, and driven in a real
headless Chromium (Debian's, through Playwright) against the real daemon with fixture models:
streaming, Stop, thinking, tool calls, images, reload, the dashboard, pull and delete, hostile
model output, and a foreign origin."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mlxserve.server.config import ConfigError, load_settings
from mlxserve.server.webui import IMMUTABLE, PREFIX, STATIC, load_assets
from tests.browser import (
    CHROMIUM,
    WAIT_MS,
    build_store,
    choose,
    finished,
    last_answer,
    launch,
    send,
)
from tests.browser import open_page as browser_open_page
from tests.daemon import Daemon
from tests.registry import Registry, registry_binary

API_KEY = "webui-test-key"
KEEP_ALIVE_S = 4
PAGE_BUDGET_BYTES = 200_000
MARKUP_TOKENS = 3
"""The hostile model's markup, its script's first tokens; then comes its line."""
HOSTILE_TOKENS = MARKUP_TOKENS + 1
"""Through the daemon: the markup, a link, and then one 64 KiB token of the line."""
LINE_TOKENS = 16
"""The hostile model's 64 KiB line token this many times: a line of 1 MiB."""
RESPONSIVE_S = 10.0
PULL_BYTES = 24 << 20
"""Big enough that a pull over loopback reports progress before it completes."""
ANSWER_LENGTH = (
    "document.querySelector('.message.assistant:last-child .content').textContent.length"
)

try:
    import playwright.sync_api as playwright
except ImportError:  # pragma: no cover - dev extra
    playwright = None

needs_browser = pytest.mark.skipif(
    CHROMIUM is None or playwright is None,
    reason="needs Debian's chromium (scripts/install-system-deps.sh) and playwright (dev extra)",
)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def api(daemon: Daemon, path: str, body: dict | None = None, method: str | None = None) -> dict:
    request = urllib.request.Request(
        f"{daemon.url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read()
    return json.loads(text) if text.strip() else {}


def busy_slots(daemon: Daemon, model: str) -> int:
    loaded = api(daemon, "/api/ps")["models"]
    return next(entry["active"] for entry in loaded if entry["name"] == model)


def png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def webui_store(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(tiny_models, tmp_path_factory.mktemp("webui"))


@pytest.fixture(scope="module")
def webui_daemon(webui_store):
    """With an API key (the page must ask for it) and a short ``keep_alive``."""
    running = Daemon(
        webui_store,
        env={"MLXSERVE_API_KEY": API_KEY, "MLXSERVE_KEEP_ALIVE": f"{KEEP_ALIVE_S}s"},
    ).start()
    yield running
    running.stop()


# Serving -----------------------------------------------------------------------------------


def test_a_browser_gets_the_page_and_every_other_client_the_heartbeat(webui_daemon):
    status, headers, body = get(f"{webui_daemon.url}/", {"Accept": "text/html,*/*;q=0.8"})
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    version = load_assets().version
    assert f'<script type="module" src="{PREFIX}{version}/app.js">'.encode() in body
    policy = headers["Content-Security-Policy"]
    assert policy == load_assets().policy
    assert "connect-src 'self'" in policy and "script-src 'self';" in policy
    assert "unsafe" not in policy
    assert headers["X-Frame-Options"] == "DENY"
    for accept in ("*/*", "application/json", None):
        status, _, body = get(
            f"{webui_daemon.url}/",
            {"Accept": accept, "Authorization": f"Bearer {API_KEY}"} if accept else {},
        )
        assert (status, body) == ((200, b"mlxserve is running") if accept else (401, body))


def test_a_page_opened_by_another_site_is_isolated_from_its_opener(webui_daemon):
    """COOP where an opener could hold the page's window (another site navigated to it, or a
    browser that does not say), not where the user opened it (docs/PERFORMANCE.md)."""
    page = {"Accept": "text/html"}
    for site, isolated in (
        ("cross-site", True),
        ("same-site", True),
        (None, True),
        ("none", False),
        ("same-origin", False),
    ):
        status, headers, _ = get(
            f"{webui_daemon.url}/", {**page, "Sec-Fetch-Site": site} if site else page
        )
        assert status == 200 and "Sec-Fetch-Site" in headers["Vary"], site
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        coop = headers.get("Cross-Origin-Opener-Policy")
        assert coop == ("same-origin" if isolated else None), site


def test_the_page_loads_without_the_key_and_the_api_still_needs_it(webui_daemon):
    status, headers, _ = get(f"{webui_daemon.url}/ui/app.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    status, _, revalidated = get(
        f"{webui_daemon.url}/ui/app.js", {"If-None-Match": headers["ETag"]}
    )
    assert status == 304 and not revalidated
    assert get(f"{webui_daemon.url}/api/tags")[0] == 401
    status, _, body = get(f"{webui_daemon.url}/ui/nothing.js")
    assert status == 404 and json.loads(body)["error"]


def test_the_stylesheet_is_inline_by_its_hash_and_the_files_are_cached_for_good(webui_daemon):
    """First paint waits for no second request, and a reload fetches nothing but the page."""
    _, headers, body = get(f"{webui_daemon.url}/", {"Accept": "text/html"})
    style = (STATIC / "style.css").read_bytes()
    assert b"<style>" + style + b"</style>" in body and b'rel="stylesheet"' not in body
    digest = base64.b64encode(hashlib.sha256(style).digest()).decode()
    assert f"style-src 'self' 'sha256-{digest}';" in headers["Content-Security-Policy"]
    assert headers["Cache-Control"] == "no-cache" and headers["ETag"]
    version = load_assets().version
    # The page names its one script; the app's modules come after the first paint, by
    # imports relative to it, so under the same version.
    assert set(re.findall(rf'"{PREFIX}{version}/([\w.]+)"', body.decode())) == {"app.js"}
    for name in sorted(path.name for path in STATIC.glob("*.js")):
        status, headers, _ = get(f"{webui_daemon.url}{PREFIX}{version}/{name}")
        assert status == 200 and headers["Cache-Control"] == IMMUTABLE, name
    status, _, body = get(f"{webui_daemon.url}{PREFIX}0123456789abcdef/app.js")
    assert status == 404 and "reload the page" in json.loads(body)["error"]


def test_the_whole_page_is_under_its_budget():
    assert sum(path.stat().st_size for path in STATIC.iterdir()) < PAGE_BUDGET_BYTES


def test_no_webui_serves_the_heartbeat_to_browsers_too(webui_store):
    off = Daemon(webui_store, flags=["--no-webui"]).start()
    try:
        status, _, body = get(f"{off.url}/", {"Accept": "text/html"})
        assert (status, body) == (200, b"mlxserve is running")
        assert get(f"{off.url}/ui/app.js")[0] == 404
    finally:
        off.stop()


def test_the_setting_reads_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXSERVE_HOME", str(tmp_path))
    monkeypatch.setenv("MLXSERVE_WEBUI", "off")
    assert load_settings().webui is False
    monkeypatch.setenv("MLXSERVE_WEBUI", "maybe")
    with pytest.raises(ConfigError, match="invalid value for webui"):
        load_settings()


# In the browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as driver:
        launched = launch(driver)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, webui_daemon):
    context = browser.new_context(base_url=webui_daemon.url)
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    opened.add_init_script(
        "window.violations = []; document.addEventListener('securitypolicyviolation',"
        " e => violations.push(e.violatedDirective));"
    )
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield opened
    context.close()
    assert not [e for e in errors if "401" not in e], errors


def open_page(page, path: str = "/") -> None:
    browser_open_page(page, path, API_KEY)


@needs_browser
def test_a_follow_up_answer_shows_its_cached_prompt_tokens(page, webui_daemon):
    open_page(page)
    choose(page, "thinking:gguf")
    send(page, "What is the weather?")
    finished(page)
    send(page, "And tomorrow?")
    finished(page)
    assert re.search(r"\b[1-9]\d* cached\b", last_answer(page).locator(".stats").inner_text())


@needs_browser
def test_thinking_is_apart_and_the_conversation_survives_a_reload(page, webui_daemon):
    from tests.fixtures.scripted_models import THINKING_ANSWER, THINKING_REASONING

    open_page(page)
    assert "thinking" in page.locator("#model option[value='thinking:gguf']").inner_text()
    choose(page, "thinking:gguf")
    send(page, "What is the weather?")
    finished(page)
    answer = last_answer(page)
    assert answer.locator(".content").inner_text().strip() == THINKING_ANSWER
    thinking = answer.locator("details.thinking")
    assert thinking.is_visible() and thinking.get_attribute("open") is None
    thinking.locator("summary").click()
    assert answer.locator(".thinking-text").inner_text() == THINKING_REASONING
    assert "tokens/s" in answer.locator(".stats").inner_text()
    assert "first token" in answer.locator(".stats").inner_text()
    assert page.evaluate("sessionStorage.getItem('mlxserve.apiKey')") == API_KEY
    assert API_KEY not in page.evaluate("JSON.stringify(localStorage)")

    page.reload()
    open_page(page)
    assert page.locator("#key-dialog").get_attribute("open") is None
    assert page.locator("#conversations li.current").inner_text().startswith("What is the weather")
    assert page.locator(".message.user .text").inner_text() == "What is the weather?"
    assert last_answer(page).locator(".content").inner_text().strip() == THINKING_ANSWER


@needs_browser
def test_settings_edit_regenerate_and_export(page):
    from tests.fixtures.scripted_models import THINKING_ANSWER

    open_page(page)
    choose(page, "thinking:gguf", system="Be brief.", temperature="0", seed="7", num_predict="16")
    send(page, "First question")
    finished(page)
    page.locator(".message.user .edit").click()
    page.locator("#prompt").fill("Edited question")
    with page.expect_request("**/api/chat") as edited:
        page.locator("#send").click()
    finished(page)
    sent = json.loads(edited.value.post_data)
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Edited question"},
    ]
    assert sent["options"] == {"temperature": 0, "seed": 7, "num_predict": 16}
    assert sent["think"] is True
    with page.expect_request("**/api/chat") as regenerated:
        page.locator(".regenerate").click()
    finished(page)
    assert json.loads(regenerated.value.post_data)["messages"] == sent["messages"]
    assert page.locator(".message").count() == 2
    assert last_answer(page).locator(".content").inner_text().strip() == THINKING_ANSWER
    with page.expect_download() as download:
        page.locator("#export").click()
    exported = json.loads(Path(download.value.path()).read_text())
    assert [m["content"] for m in exported[0]["messages"]] == ["Edited question", THINKING_ANSWER]
    assert exported[0]["settings"]["system"] == "Be brief."


@needs_browser
def test_markdown_renders_code_and_only_web_links(page):
    answer = (
        "# Title\n\nSome **bold** and `code`, [a site](https://example.com/x) and "
        "[bad](javascript:alert(1)) and [data](data:text/html,hi).\n\n"
        "```python\nprint('<b>hi</b>')\n```\n- one\n- two"
    )
    lines = [
        {"message": {"role": "assistant", "content": answer[:40]}, "done": False},
        {"message": {"role": "assistant", "content": answer[40:]}, "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True, "eval_count": 2},
    ]
    open_page(page)
    choose(page, "tiny:gguf")
    page.route(
        "**/api/chat",
        lambda route: route.fulfill(
            body="".join(json.dumps(line) + "\n" for line in lines),
            content_type="application/x-ndjson",
        ),
    )
    send(page, "Markdown, please")
    finished(page)
    content = last_answer(page).locator(".content")
    assert content.locator("h3").inner_text() == "Title"
    assert content.locator("strong").inner_text() == "bold"
    code = content.locator("pre code")
    assert (
        code.inner_text() == "print('<b>hi</b>')"
        and code.get_attribute("data-language") == "python"
    )
    assert content.locator("b").count() == 0
    links = content.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.com/x"
    assert links.get_attribute("rel") == "noopener noreferrer"
    assert "[bad](javascript:alert(1))" in content.inner_text()
    assert content.locator("li").all_inner_texts() == ["one", "two"]


@needs_browser
def test_a_tool_call_is_shown_as_a_call(page):
    from tests.fixtures.scripted_models import WEATHER_TOOL

    open_page(page)
    choose(page, "hermes:gguf", tools=json.dumps([WEATHER_TOOL]))
    send(page, "Weather in Paris?")
    finished(page)
    call = last_answer(page).locator(".tool-call")
    assert call.locator(".tool-name").inner_text() == "get_weather"
    assert json.loads(call.locator(".tool-arguments").inner_text()) == {"city": "Paris"}


@needs_browser
def test_an_image_goes_to_the_vision_model(page, tmp_path):
    open_page(page)
    choose(page, "tiny:gguf", num_predict="4")
    assert page.locator("#attach-label").is_hidden()
    choose(page, "tiny:vision", num_predict="4")
    image = tmp_path / "red.png"
    image.write_bytes(png((255, 0, 0)))
    page.locator("#attach").set_input_files(str(image))
    with page.expect_request("**/api/chat") as request:
        send(page, "What is in the image?")
    sent = json.loads(request.value.post_data)
    assert sent["messages"][-1]["images"] == [base64.b64encode(image.read_bytes()).decode()]
    finished(page)
    assert page.locator(".message.user img").count() == 1
    page.wait_for_function("() => document.querySelector('.message.user img').naturalWidth == 56")
    assert not last_answer(page).locator(".note").inner_text()


@needs_browser
def test_stop_cancels_the_generation_on_the_daemon(page, webui_daemon):
    open_page(page)
    choose(page, "hostile:gguf", num_predict="1000000")
    send(page, "Go on forever")
    page.wait_for_function(f"() => {ANSWER_LENGTH} > 2000")
    seen = page.evaluate(ANSWER_LENGTH)
    page.wait_for_function(f"() => {ANSWER_LENGTH} > {seen}")
    assert busy_slots(webui_daemon, "hostile:gguf") == 1
    page.locator("#stop").click()
    stopped = time.monotonic()
    while busy_slots(webui_daemon, "hostile:gguf") != 0:
        assert time.monotonic() - stopped < 1.0, "the slot is still busy a second after Stop"
        time.sleep(0.05)
    finished(page)
    assert "stopped" in last_answer(page).locator(".note").inner_text()


@needs_browser
def test_hostile_output_stays_text(page, webui_daemon):
    from tests.fixtures.scripted_models import HOSTILE

    before = api(webui_daemon, "/api/tags")
    open_page(page)
    choose(page, "hostile:gguf", num_predict=str(HOSTILE_TOKENS))
    send(page, "Say something nasty")
    finished(page)
    answer = last_answer(page)
    text = answer.locator(".content").text_content()
    assert text.startswith("".join(HOSTILE.script[:3]) + "x" * 32 * 10)
    assert answer.locator(".content img, .content script, .content a").count() == 0
    assert page.evaluate("window.p") is None
    assert page.evaluate("violations") == []
    assert api(webui_daemon, "/api/tags") == before


@needs_browser
def test_a_one_megabyte_line_keeps_the_page_responsive(page, webui_daemon):
    """The hostile model's answer through the real daemon: its markup, then 16 greedy tokens of
    64 KiB each, one line of 1 MiB (``tests/fixtures/scripted_models.py``)."""
    from tests.fixtures.scripted_models import HOSTILE, LONG_TOKEN_BYTES

    markup = "".join(HOSTILE.script[:MARKUP_TOKENS])
    open_page(page)
    choose(page, "hostile:gguf", num_predict=str(MARKUP_TOKENS + LINE_TOKENS))
    started = time.monotonic()
    send(page, "A long line")
    finished(page)
    text = last_answer(page).locator(".content").text_content()
    assert text == markup + "x" * (LINE_TOKENS * LONG_TOKEN_BYTES)
    assert LINE_TOKENS * LONG_TOKEN_BYTES == 1 << 20
    page.locator("#tab-dashboard").click()
    page.wait_for_selector("#store tbody tr")
    assert time.monotonic() - started < RESPONSIVE_S
    assert page.evaluate("window.p") is None
    assert page.evaluate("violations") == []


@needs_browser
def test_a_foreign_origin_cannot_frame_the_page_or_call_the_daemon(browser, webui_daemon):
    """A page on ``evil.test`` frames the daemon's page and posts to ``/api/delete``."""
    port = webui_daemon.port
    context = browser.new_context()
    evil = context.new_page()
    evil.route(
        "http://evil.test/",
        lambda route: route.fulfill(
            content_type="text/html",
            body=f'<iframe src="http://127.0.0.1:{port}/"></iframe>',
        ),
    )
    evil.goto("http://evil.test/")
    evil.wait_for_timeout(1000)
    framed = [f for f in evil.frames if f is not evil.main_frame]
    assert len(framed) == 1
    assert all("127.0.0.1" not in f.url or f.locator("#messages").count() == 0 for f in framed)
    outcome = evil.evaluate(
        """async ([url, key]) => { try {
             const r = await fetch(url, {method: 'DELETE', body: '{"model": "tiny:gguf"}',
               headers: {'Authorization': `Bearer ${key}`, 'Content-Type': 'application/json'}});
             return r.status; } catch (e) { return String(e); } }""",
        [f"http://127.0.0.1:{port}/api/delete", API_KEY],
    )
    assert "Failed to fetch" in str(outcome)
    assert "tiny:gguf" in [m["name"] for m in api(webui_daemon, "/api/tags")["models"]]
    context.close()


@needs_browser
def test_the_dashboard_shows_a_loaded_model_until_keep_alive_ends(page, webui_daemon):
    open_page(page)
    choose(page, "tiny:gguf", num_predict="4")
    send(page, "Hello")
    finished(page)
    page.locator("#tab-dashboard").click()
    loaded = page.locator("#loaded tbody tr", has_text="tiny:gguf")
    loaded.wait_for()
    assert "llamacpp" in loaded.inner_text()
    loaded.wait_for(state="detached", timeout=(KEEP_ALIVE_S + 10) * 1000)


@needs_browser
@pytest.mark.registry
@pytest.mark.skipif(registry_binary() is None, reason="docker-registry is not installed")
def test_pull_shows_progress_and_delete_asks_first(page, webui_daemon, tmp_path):
    from modelstore.store import ModelStore
    from tests.test_registry import push_json, weights_model

    registry = Registry(tmp_path / "registry").start()
    try:
        publisher = ModelStore(tmp_path / "publisher")
        weights_model(publisher, "big:1", tmp_path / "weights", PULL_BYTES, seed=25)
        target = f"{registry.host}/team/big:1"
        push_json(publisher.root, "big:1", target)
        open_page(page, "/#dashboard")
        page.evaluate(
            "window.progress = []; new MutationObserver(() => progress.push("
            "document.querySelector('#pull-progress').value)).observe("
            "document.querySelector('#pull-progress'), {attributes: true})"
        )
        page.locator("#pull-name").fill(target)
        page.locator("#pull-insecure").check()
        page.locator("#pull").click()
        page.wait_for_function(
            "() => document.querySelector('#pull-status').textContent === 'success'"
        )
        progress = page.evaluate("progress")
        assert any(0 < value < 1 for value in progress) and progress[-1] == 1, progress
        row = page.locator("#store tbody tr", has_text=target)
        row.wait_for()
        row.locator(".delete").click()
        row.locator(".delete.confirm").wait_for()
        assert row.locator(".delete").inner_text() == "Really delete?"
        assert target in [m["name"] for m in api(webui_daemon, "/api/tags")["models"]]
        row.locator(".delete").click()
        row.wait_for(state="detached")
        assert target not in [m["name"] for m in api(webui_daemon, "/api/tags")["models"]]
    finally:
        registry.stop()
