"""The web page: chat with any model and see the store and the loaded models (``GET /``).

The page is the static files in ``static/`` (package data: a wheel carries them and nothing is
built at install). It speaks only the daemon's public API (``/api/chat``, ``/api/tags``,
``/api/show``, ``/api/ps``, ``/api/pull``, ``/api/delete``), so it can do nothing a script on
this machine could not. Browsers ask for ``text/html``; every other client keeps the heartbeat
text Ollama's clients expect (``app.RUNNING_TEXT``).

The page and its files carry no data, so they load without the API key (the page then asks for
the key and sends it with its API calls, as any client does). They are served with a strict
Content-Security-Policy: no inline script, no plugins, no frames, and ``connect-src 'self'``,
so even a mistake in the page could not run model output as script or send it away. The one
inline thing is the page's own stylesheet, allowed by its hash alone.

First paint (``bench/webui_paint.py``): the stylesheet is put inline into ``index.html`` at
startup (``static/style.css`` stays the file to edit), so painting waits for no second request;
the only script tag, ``app.js``, loads the app after that paint; and every file is served under
the page's version with an immutable cache lifetime, so a reload fetches nothing but the page.
"""

from __future__ import annotations

import base64
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
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
STYLESHEET = "style.css"
STYLESHEET_LINK = f'<link rel="stylesheet" href="{PREFIX}{STYLESHEET}">'
"""What ``index.html`` says, and what startup replaces with the stylesheet itself."""


def content_security_policy(style_hash: str) -> str:
    """Images are the user's own attachments (``data:`` URLs); nothing else leaves ``'self'``,
    and the only inline style allowed is the page's stylesheet (``'sha256-...'``)."""
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            f"style-src 'self' 'sha256-{style_hash}'",
            "img-src 'self' data: blob:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
ISOLATE = {"Cross-Origin-Opener-Policy": "same-origin"}
"""Sent with the page when another site (or a browser too old to say) navigated to it: that
site's window then keeps no handle on the page's (it cannot navigate it to a look-alike asking
for the API key, nor count its frames). A page the user opened themselves (typed, bookmarked, a
menubar app's link: ``Sec-Fetch-Site: none``) or reloaded has no such opener, and there the
header would only cost Chromium a browsing-context-group swap, ~35 ms of a first visit's paint
(docs/PERFORMANCE.md, "The web page's first paint")."""
_OWN_NAVIGATION = frozenset({"none", "same-origin"})
REVALIDATE = "no-cache"
"""The page itself (and a file asked for by its plain name): the browser revalidates it (a 304
by ``ETag``), so an upgraded daemon's page is never mixed with an old script."""
IMMUTABLE = "public, max-age=31536000, immutable"
"""A file under its version (``/ui/<version>/app.js``): its content never changes at that URL,
so a reload takes it from the browser's cache without a request; a new daemon's page names a
new version."""
VERSION_LENGTH = 16
"""Hex digits of the version (a hash of every file of the page)."""


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


@dataclass(frozen=True)
class Assets:
    version: str
    """What the page's URLs carry: ``index.html`` names its files under ``PREFIX + version``,
    and the modules' relative imports (``./api.js``) stay under it."""
    files: dict[str, Asset]
    policy: str
    """The Content-Security-Policy, with the inline stylesheet's hash."""


ASSETS = web.AppKey("webui_assets", Assets)


def _asset(body: bytes, suffix: str) -> Asset:
    return Asset(body, CONTENT_TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def load_assets(folder: Path = STATIC) -> Assets:
    """Every file of the page, read once at startup: the page is small (under 200 KB).

    The version hashes every file, so any change to any file gives every URL a new version;
    ``index.html`` is rewritten here to hold the stylesheet inline and to name its files under
    the version (a plain ``"/ui/`` in the source becomes ``"/ui/<version>/``), so the files in
    the package stay plain static files that work as they are."""
    bodies = {
        path.name: path.read_bytes()
        for path in sorted(folder.iterdir())
        if path.suffix in CONTENT_TYPES
    }
    digest = hashlib.sha256()
    for name, body in bodies.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(body).digest())
    version = digest.hexdigest()[:VERSION_LENGTH]
    style = bodies[STYLESHEET]
    if b"</" in style or STYLESHEET_LINK.encode() not in bodies[INDEX]:
        raise ValueError(f"{STYLESHEET} cannot be put inline into {INDEX}")
    index = bodies[INDEX].replace(STYLESHEET_LINK.encode(), b"<style>" + style + b"</style>")
    bodies[INDEX] = index.replace(f'"{PREFIX}'.encode(), f'"{PREFIX}{version}/'.encode())
    files = {name: _asset(body, Path(name).suffix) for name, body in bodies.items()}
    style_hash = base64.b64encode(hashlib.sha256(style).digest()).decode()
    return Assets(version, files, content_security_policy(style_hash))


def wants_page(request: web.Request) -> bool:
    """A browser navigating to the daemon: it asks for HTML. Ollama's clients, curl and the
    CLI's ``HEAD /`` heartbeat do not."""
    return "text/html" in request.headers.get("Accept", "")


def is_page_request(request: web.Request) -> bool:
    """The page or one of its files: open without the API key (they carry no data)."""
    if request.method not in ("GET", "HEAD"):
        return False
    return request.path.startswith(PREFIX) or (request.path == "/" and wants_page(request))


def serve(request: web.Request, name: str, cache_control: str) -> web.Response:
    asset = request.app[ASSETS].files.get(name)
    if asset is None:
        raise NotFoundError(f"no file {name!r} in the web page")
    headers = {
        **SECURITY_HEADERS,
        "Content-Security-Policy": request.app[ASSETS].policy,
        "ETag": asset.etag,
        "Cache-Control": cache_control,
    }
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})


def page(request: web.Request) -> web.Response:
    """``GET /`` for a browser."""
    response = serve(request, INDEX, REVALIDATE)
    response.headers["Vary"] = "Accept, Sec-Fetch-Site"
    if request.headers.get("Sec-Fetch-Site") not in _OWN_NAVIGATION:
        response.headers.update(ISOLATE)
    return response


async def asset(request: web.Request) -> web.Response:
    """A file by its plain name (``/ui/app.js``): always revalidated."""
    return serve(request, request.match_info["name"], REVALIDATE)


async def versioned_asset(request: web.Request) -> web.Response:
    """A file under the page's version: cached for good. Another version (a tab opened before
    the daemon was upgraded) is a 404 rather than today's file, which could not match the rest
    of that tab's page."""
    version = request.match_info["version"]
    if version != request.app[ASSETS].version:
        raise NotFoundError(f"no version {version!r} of the web page (reload the page)")
    return serve(request, request.match_info["name"], IMMUTABLE)


def install(app: web.Application) -> None:
    """Serve the page's files; ``GET /`` itself is ``app.root``, which also answers clients."""
    app[ASSETS] = load_assets()
    app.router.add_get(PREFIX + "{name}", asset)
    app.router.add_get(PREFIX + "{version}/{name}", versioned_asset)
