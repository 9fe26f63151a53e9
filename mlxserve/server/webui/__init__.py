"""The web page: chat with any model and see the store and the loaded models (``GET /``).

The page is the static files in ``static/`` (package data: a wheel carries them and nothing is
built at install). It speaks only the daemon's public API (``/api/chat``, ``/api/tags``,
``/api/show``, ``/api/ps``, ``/api/pull``, ``/api/delete``), so it can do nothing a script on
this machine could not. Browsers ask for ``text/html``; every other client keeps the heartbeat
text Ollama's clients expect (``app.RUNNING_TEXT``).

The page and its files carry no data, so they load without the API key (the page then asks for
the key and sends it with its API calls, as any client does). They are served with a strict
Content-Security-Policy: no inline script or style, no plugins, no frames, and ``connect-src
'self'``, so even a mistake in the page could not run model output as script or send it away.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from mlxserve.errors import NotFoundError

STATIC = Path(__file__).with_name("static")
PREFIX = "/ui/"
"""Where the page's scripts and styles are served from."""
INDEX = "index.html"
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
"""Images are the user's own attachments (``data:`` URLs); nothing else leaves ``'self'``."""
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
"""``no-cache``: the browser revalidates (a 304 by ``ETag``), so an upgraded daemon's page is
never mixed with an old script."""


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


ASSETS = web.AppKey("webui_assets", dict)


def load_assets(folder: Path = STATIC) -> dict[str, Asset]:
    """Every file of the page, read once at startup: the page is small (under 200 KB)."""
    assets = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in CONTENT_TYPES:
            body = path.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            assets[path.name] = Asset(body, CONTENT_TYPES[path.suffix], etag)
    return assets


def wants_page(request: web.Request) -> bool:
    """A browser navigating to the daemon: it asks for HTML. Ollama's clients, curl and the
    CLI's ``HEAD /`` heartbeat do not."""
    return "text/html" in request.headers.get("Accept", "")


def is_page_request(request: web.Request) -> bool:
    """The page or one of its files: open without the API key (they carry no data)."""
    if request.method not in ("GET", "HEAD"):
        return False
    return request.path.startswith(PREFIX) or (request.path == "/" and wants_page(request))


def serve(request: web.Request, name: str) -> web.Response:
    asset = request.app[ASSETS].get(name)
    if asset is None:
        raise NotFoundError(f"no file {name!r} in the web page")
    headers = {**SECURITY_HEADERS, "ETag": asset.etag}
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, content_type=asset.content_type, headers=headers)


def page(request: web.Request) -> web.Response:
    """``GET /`` for a browser."""
    response = serve(request, INDEX)
    response.headers["Vary"] = "Accept"
    return response


async def asset(request: web.Request) -> web.Response:
    return serve(request, request.match_info["name"])


def install(app: web.Application) -> None:
    """Serve the page's files; ``GET /`` itself is ``app.root``, which also answers clients."""
    app[ASSETS] = load_assets()
    app.router.add_get(PREFIX + "{name}", asset)
