"""First paint of the web page from a warm daemon, in Debian's headless Chromium (Playwright):
each round a fresh browser context (no cache) loads ``/``, then reloads it (the browser's cache
as a returning user has it); the browser's own paint timings. The baseline is a one-line HTML
page handed to the same browser without the network: what painting anything costs on this
machine, so a loaded machine can be read apart from the page (``paint_to_baseline``).

``--trace N`` adds N loads under Chromium's tracing and reports the renderer's main-thread work
between navigation and the first contentful paint (parse, style and layout, script): less
swayed by a busy machine than the paint time, which mostly waits for a core.

    PYTHONPATH=. .venv/bin/python -m bench.webui_paint --rounds 10 --trace 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

from bench.common import emit, median
from mlxserve.server.webui import STATIC
from tests.browser import launch
from tests.daemon import Daemon

PAINT = "performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? null"
BASELINE = "<!doctype html><title>baseline</title><p>mlxserve</p>"
NAVIGATION = "performance.getEntriesByType('navigation')[0].responseEnd"
FETCHED = (
    "performance.getEntriesByType('resource')"
    ".filter(e => e.initiatorType !== 'fetch' && e.transferSize > 0).length"
)
"""The page's files that came over the network (a 304 counts; the browser's cache does not)."""
TRACE_CATEGORIES = ["devtools.timeline", "v8"]
WORK = {
    "parse_ms": ("ParseHTML",),
    "style_layout_ms": ("UpdateLayoutTree", "Layout"),
    "script_ms": ("EvaluateScript", "v8.compileModule", "v8.evaluateModule"),
}
"""Chromium's trace events by what they are, summed before the first contentful paint."""


def paint_timings(page, url: str, reload: bool = False) -> tuple[float, float, int]:
    """(first contentful paint, HTML response end) in ms, and the files fetched."""
    if reload:
        page.reload()
    else:
        page.goto(url)
    page.wait_for_function(f"() => {PAINT} !== null")
    page.wait_for_load_state("load")
    return page.evaluate(PAINT), page.evaluate(NAVIGATION), page.evaluate(FETCHED)


def first_paint(browser, url: str, fulfil: str | None = None) -> tuple[float, ...]:
    """A fresh context's first load, then its reload: (paint, response end, files fetched,
    reload paint, reload files fetched)."""
    context = browser.new_context()
    page = context.new_page()
    if fulfil is not None:
        page.route(url, lambda route: route.fulfill(body=fulfil, content_type="text/html"))
    cold = paint_timings(page, url)
    warm = paint_timings(page, url, reload=True)
    context.close()
    return (*cold, warm[0], warm[2])


def work_before_paint(browser, url: str) -> dict[str, float]:
    """The renderer's main-thread work, in ms, from navigation to the first contentful paint."""
    context = browser.new_context()
    page = context.new_page()
    browser.start_tracing(page=page, categories=TRACE_CATEGORIES)
    page.goto(url)
    page.wait_for_function(f"() => {PAINT} !== null")
    events = json.loads(browser.stop_tracing())["traceEvents"]
    context.close()
    (paint,) = [e for e in events if e.get("name") == "firstContentfulPaint"][:1]
    starts = [
        e["ts"]
        for e in events
        if e.get("name") == "navigationStart"
        and e["pid"] == paint["pid"]
        and e["ts"] <= paint["ts"]
    ]
    start = max(starts, default=0)
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("ph") != "X" or event["pid"] != paint["pid"]:
            continue
        if start <= event["ts"] <= paint["ts"]:
            for measure, names in WORK.items():
                if event["name"] in names:
                    totals[measure] += event.get("dur", 0) / 1000
    return {measure: totals[measure] for measure in WORK}


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--trace", type=int, default=0, help="loads traced (0: none)")
    arguments = parser.parse_args()
    rounds = arguments.rounds
    daemon = Daemon(Path(tempfile.mkdtemp(prefix="mlxserve-bench-")) / "home").start()
    paints, responses, fetched, reloads, refetched, baseline = [], [], [], [], [], []
    traced: dict[str, list[float]] = defaultdict(list)
    try:
        with sync_playwright() as driver:
            browser = launch(driver)
            for round_ in range(rounds + 1):
                paint, response, files, reload, refiles = first_paint(browser, f"{daemon.url}/")
                bare, *_ = first_paint(browser, f"{daemon.url}/baseline", BASELINE)
                if round_:  # the first round warms the daemon and the browser
                    paints.append(paint)
                    responses.append(response)
                    fetched.append(files)
                    reloads.append(reload)
                    refetched.append(refiles)
                    baseline.append(bare)
            for _ in range(arguments.trace):
                for measure, ms in work_before_paint(browser, f"{daemon.url}/").items():
                    traced[measure].append(ms)
            browser.close()
    finally:
        daemon.stop()
    emit(
        {
            "rounds": rounds,
            "page_bytes": sum(path.stat().st_size for path in STATIC.iterdir()),
            "html_response_end_ms": round(median(responses), 1),
            "files_fetched": max(fetched),
            "first_contentful_paint_ms": round(median(paints), 1),
            "first_contentful_paint_max_ms": round(max(paints), 1),
            "baseline_first_contentful_paint_ms": round(median(baseline), 1),
            "paint_to_baseline": round(median(paints) / median(baseline), 2),
            "reload_first_contentful_paint_ms": round(median(reloads), 1),
            "reload_files_fetched": max(refetched),
            **{f"before_paint_{k}": round(median(v), 1) for k, v in traced.items()},
        }
    )


if __name__ == "__main__":
    main()
