"""The OpenAI-compatible routes under ``/v1`` other than chat (``routes_chat.py``): embeddings
and models. The ``model`` field only ever names a model in the store: nothing is downloaded."""

from __future__ import annotations

import base64
import struct
from typing import Any

from aiohttp import web

from mlxserve.errors import InvalidRequestError
from mlxserve.server.routes_native import embed_inputs, embed_texts
from mlxserve.server.state import STORE
from mlxserve.server.validate import json_body, model_name

routes = web.RouteTableDef()
OWNER = "mlxserve"


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    body = await json_body(request)
    name = model_name(body)
    texts = embed_inputs(body.get("input"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in {"float", "base64"}:
        raise InvalidRequestError(
            "encoding_format must be float or base64", param="encoding_format"
        )
    vectors, tokens, _ = await embed_texts(request, name, texts, None)

    def encode(vector: list[float]) -> list[float] | str:
        if encoding == "float":
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    return web.json_response(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": encode(v)}
                for i, v in enumerate(vectors)
            ],
            "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


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
