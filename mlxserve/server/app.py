"""The aiohttp application: state, middlewares, routes, and the model manager's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from mlxserve.server import webui
from mlxserve.server.config import Settings
from mlxserve.server.errors import hide_paths_under
from mlxserve.server.metrics import Metrics
from mlxserve.server.middleware import add_cors_headers, add_request_id, make_middlewares
from mlxserve.server.residency import ModelManager
from mlxserve.server.state import MANAGER, METRICS, SETTINGS, STORE
from modelstore.store import ModelStore

OPENAPI_PATH = Path(__file__).resolve().parents[2] / "schemas" / "openapi.yaml"


RUNNING_TEXT = "mlxserve is running"
"""``GET /`` and ``HEAD /``: Ollama's clients (and its CLI) heartbeat there."""


async def root(request: web.Request) -> web.Response:
    """The heartbeat text, or the web page for a browser (``webui``)."""
    if request.app[SETTINGS].webui and webui.wants_page(request):
        return webui.page(request)
    return web.Response(text=RUNNING_TEXT, headers={"Vary": "Accept"})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(text=OPENAPI_PATH.read_text(), content_type="application/yaml")


def build_app(settings: Settings) -> web.Application:
    from mlxserve.server import (
        routes_chat,
        routes_embed,
        routes_native,
        routes_openai,
        routes_rerank,
        routes_store,
        routes_tokens,
    )

    metrics = Metrics()
    app = web.Application(
        middlewares=make_middlewares(settings, metrics), client_max_size=settings.max_body_bytes
    )
    store = ModelStore(settings.home)
    hide_paths_under(settings.home)
    app[SETTINGS] = settings
    app[STORE] = store
    app[METRICS] = metrics
    app[MANAGER] = ModelManager(store, settings, metrics)
    app.router.add_routes(routes_chat.routes)
    app.router.add_routes(routes_native.routes)
    app.router.add_routes(routes_store.routes)
    app.router.add_routes(routes_openai.routes)
    app.router.add_routes(routes_embed.routes)
    app.router.add_routes(routes_rerank.routes)
    app.router.add_routes(routes_tokens.routes)
    app.router.add_get("/", root)
    app.router.add_get("/openapi.yaml", openapi)
    if settings.webui:
        webui.install(app)
    app.on_response_prepare.append(add_request_id)
    app.on_response_prepare.append(add_cors_headers)
    app.cleanup_ctx.append(manager_lifetime)
    return app


async def manager_lifetime(app: web.Application) -> AsyncIterator[None]:
    manager = app[MANAGER]
    await manager.start()
    yield
    await manager.close()
