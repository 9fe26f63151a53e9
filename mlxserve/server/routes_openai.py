"""The OpenAI-compatible routes under ``/v1`` other than chat (``routes_chat.py``) and embeddings
(``routes_embed.py``): models, in Anthropic's shape when the request carries ``anthropic-version``
(the Anthropic SDK's ``models.list``). The ``model`` field only ever names a model in the store."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mlxserve.api.types import utc_timestamp
from mlxserve.server.state import STORE

routes = web.RouteTableDef()
OWNER = "mlxserve"


ANTHROPIC_VERSION_HEADER = "anthropic-version"
"""Sent by every Anthropic SDK request: ``/v1/models`` then answers in Anthropic's shape."""


def model_entry(model: Any) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": int(model.modified), "owned_by": OWNER}


def anthropic_model_entry(model: Any) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model.name,
        "display_name": model.name,
        "created_at": utc_timestamp(model.modified),
    }


def _anthropic(request: web.Request) -> bool:
    return ANTHROPIC_VERSION_HEADER in request.headers


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    models = request.app[STORE].list()
    if _anthropic(request):
        data = [anthropic_model_entry(m) for m in models]
        return web.json_response(
            {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )
    return web.json_response({"object": "list", "data": [model_entry(m) for m in models]})


@routes.get("/v1/models/{model:.+}")
async def get_model(request: web.Request) -> web.Response:
    model = request.app[STORE].resolve(request.match_info["model"])
    entry = anthropic_model_entry(model) if _anthropic(request) else model_entry(model)
    return web.json_response(entry)
