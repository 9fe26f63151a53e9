"""The web page in a real headless Chromium (Debian's ``chromium``, driven by Playwright): the
fixture store it is shown with, and what a user does on it. Used by ``tests/test_webui.py``,
``scripts/webui_screenshots.py`` and ``bench/webui_paint.py``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium")
WAIT_MS = 30_000
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP evil.test 127.0.0.1"]
"""``evil.test`` is a foreign origin served from loopback."""


def build_store(tiny_models: Any, work: Path) -> Path:
    """``tiny:gguf``, ``tiny:vision`` (with a projector), and the scripted ``thinking:gguf``,
    ``hermes:gguf`` and ``hostile:gguf`` (GGUF: the fast runner here); returns the store's root."""
    from modelstore.importer import import_path
    from modelstore.spec import build_draft, load_spec
    from modelstore.store import ModelStore
    from tests.fixtures.gguf_mmproj import make_tiny_mmproj
    from tests.fixtures.scripted_models import HERMES, HOSTILE, THINKING, make_scripted_model

    store = ModelStore(work / "home")
    import_path(store, tiny_models.gguf_path, "tiny:gguf")
    for family in (THINKING, HERMES, HOSTILE):
        scripted = make_scripted_model(family, work / "scripted")
        import_path(store, scripted.gguf_path, f"{family.name}:gguf")
    spec = work / "vision.modelspec.json"
    mmproj = make_tiny_mmproj(work / "mmproj.gguf")
    spec.write_text(json.dumps({"from": str(tiny_models.gguf_path), "projector": str(mmproj)}))
    store.commit(build_draft(load_spec(spec), store), "tiny:vision")
    return store.root


def launch(driver: Any) -> Any:
    return driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_page(page: Any, path: str = "/", api_key: str | None = None) -> None:
    """Load the page and answer its API key prompt if it shows one, as a user does."""
    page.goto(path)
    page.wait_for_function(
        "() => document.body.classList.contains('ready') || document.querySelector('dialog').open"
    )
    if page.locator("#key-dialog").get_attribute("open") is not None:
        page.locator("#key-input").fill(api_key or "")
        page.locator("#key-form button").click()
    page.wait_for_selector("body.ready")


def choose(page: Any, model: str, **settings: str) -> None:
    """Pick ``model`` and fill per-conversation settings (input ids: ``num_predict=...``)."""
    page.locator("#model").select_option(model)
    if settings:
        page.locator("#settings summary").click()
        for name, value in settings.items():
            page.locator(f"#{name}").fill(value)
        page.locator("#settings summary").click()


def send(page: Any, text: str) -> None:
    page.locator("#prompt").fill(text)
    page.locator("#send").click()


def last_answer(page: Any) -> Any:
    return page.locator(".message.assistant").last


def finished(page: Any) -> None:
    """The answer is complete: Send is enabled again when the stream ends."""
    page.wait_for_function("() => !document.querySelector('#send').disabled")
