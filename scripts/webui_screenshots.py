"""Regenerate the web page's screenshots in docs/ (``webui-chat.png``, ``webui-dashboard.png``):
the real daemon over the fixture models, the page in Debian's headless Chromium (Playwright).

    PYTHONPATH=. .venv/bin/python scripts/webui_screenshots.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from tests.browser import build_store, choose, finished, launch, open_page, send  # noqa: E402
from tests.daemon import Daemon  # noqa: E402
from tests.fixtures.scripted_models import WEATHER_TOOL  # noqa: E402
from tests.fixtures.tiny_models import build_fixture_models  # noqa: E402

VIEWPORT = {"width": 1100, "height": 620}
COLORS = 64
"""Screenshots are flat UI: a 64-colour palette keeps each PNG small."""


def save(page, path: Path) -> None:
    page.screenshot(path=str(path))
    Image.open(path).convert("RGB").quantize(COLORS).save(path, optimize=True)
    print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="mlxserve-screens-"))
    daemon = Daemon(build_store(build_fixture_models(work / "tiny"), work)).start()
    try:
        with sync_playwright() as driver:
            browser = launch(driver)
            page = browser.new_page(viewport=VIEWPORT, base_url=daemon.url)
            open_page(page)
            choose(page, "thinking:gguf")
            send(page, "What is the weather in Paris?")
            finished(page)
            page.locator("details.thinking summary").click()
            choose(page, "hermes:gguf", tools=json.dumps([WEATHER_TOOL]))
            send(page, "Look it up, please.")
            finished(page)
            save(page, ROOT / "docs" / "webui-chat.png")
            page.goto("/#dashboard")
            page.wait_for_selector("#loaded tbody tr")
            save(page, ROOT / "docs" / "webui-dashboard.png")
            browser.close()
    finally:
        daemon.stop()


if __name__ == "__main__":
    main()
