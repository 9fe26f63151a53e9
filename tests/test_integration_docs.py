"""docs/integrations/ stays true: the LangChain page's code runs as written against a real daemon
with the real packages (only the model name is the test store's), and every page's URLs name
the daemon's real port and paths."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import yaml

from mlxserve.server.app import OPENAPI_PATH
from mlxserve.server.config import DEFAULT_PORT

PAGES = Path(__file__).resolve().parents[1] / "docs" / "integrations"
DOC_MODEL = "qwen3:0.6b"
DOC_TOKENS = 256


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def test_the_langchain_page_runs_as_written(daemon):
    (code,) = python_blocks(PAGES / "langchain.md")
    code = (
        code.replace(DOC_MODEL, "tiny:gguf")
        .replace(f"127.0.0.1:{DEFAULT_PORT}", f"127.0.0.1:{daemon.port}")
        .replace(f"={DOC_TOKENS}", "=2")  # a random-weight model: keep its answers short
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "langchain.md", "exec"), {})
    assert printed.getvalue().strip()


def test_pages_name_the_daemons_port_and_routes():
    routes = set(yaml.safe_load(OPENAPI_PATH.read_text())["paths"]) | {"", "/v1"}
    for page in sorted(PAGES.glob("*.md")):
        urls = re.findall(
            r"http://(?:127\.0\.0\.1|host\.docker\.internal):(\d+)([\w/.-]*)", page.read_text()
        )
        assert urls, page.name
        for port, path in urls:
            assert port == str(DEFAULT_PORT), (page.name, port)
            assert path in routes, (page.name, path)
