"""The OpenAI-compatible routes under ``/v1`` other than chat (``routes_chat.py``) and embeddings
(``routes_embed.py``): models. The ``model`` field only ever names a model in the store."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mlxserve.server.state import STORE

routes = web.RouteTableDef()
OWNER = "mlxserve"


def model_entry(model: Any) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": int(model.modified), "owned_by": OWNER}


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    models = request.app[STORE].list()
    return web.json_response({"object": "list", "data": [model_entry(m) for m in models]})


@routes.get("/v1/models/{model:.+}")
async def get_model(request: web.Request) -> web.Response:
    model = request.app[STORE].resolve(request.match_info["model"])
    return web.json_response(model_entry(model))
