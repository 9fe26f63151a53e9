"""Embeddings for every API: Ollama's ``/api/embed`` and ``/api/embeddings``, OpenAI's
``/v1/embeddings``.

One request shape (texts, ``truncate``, ``dimensions``) and one call into the runner
(``embed_texts``); the routes differ only in how they read the request and shape the answer.
A list of inputs is embedded by the runner in padded batches.
"""

from __future__ import annotations

import base64
import math
import struct
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mlxserve.errors import InvalidRequestError
from mlxserve.runners.base import EmbedRequest
from mlxserve.server import limits
from mlxserve.server.state import MANAGER
from mlxserve.server.validate import json_body, keep_alive, model_name, optional

routes = web.RouteTableDef()
ENCODING_FORMATS = ("float", "base64")
EMBED_CHUNK_INPUTS = 16
"""Inputs handed to the runner at a time: a request its client abandons stops after the chunk
in hand (issue 21: 2,048 inputs kept a model busy for minutes after the client left), and a
chunk still fills a batch."""


@dataclass
class Embedded:
    vectors: list[list[float]]
    prompt_tokens: int
    total_duration: int
    load_duration: int
    """How long the request waited for its model to be ready, as the chat core reports it."""


def embed_inputs(value: Any) -> list[str]:
    """``input`` as a list of texts: a string, or a list of strings (empty: just load)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        limits.check_count(value, "inputs", "input")
        return value
    raise InvalidRequestError("'input' must be a string or a list of strings", param="input")


def shorten(vectors: list[list[float]], dimensions: int | None) -> list[list[float]]:
    """The first ``dimensions`` components, re-normalised (Matryoshka-style shortening, as
    Ollama does); more dimensions than the model makes is a 400."""
    if dimensions is None or not vectors:
        return vectors
    size = len(vectors[0])
    if not 1 <= dimensions <= size:
        raise InvalidRequestError(
            f"'dimensions' must be between 1 and {size} for this model", param="dimensions"
        )
    shortened = []
    for vector in vectors:
        head = vector[:dimensions]
        norm = math.sqrt(sum(x * x for x in head)) or 1.0
        shortened.append([x / norm for x in head])
    return shortened


async def embed_texts(
    request: web.Request,
    name: str,
    texts: list[str],
    *,
    truncate: bool = True,
    dimensions: int | None = None,
    keep_alive_s: float | None = None,
) -> Embedded:
    started = time.perf_counter_ns()
    request["log"]["model"] = name
    async with request.app[MANAGER].use(name, keep_alive=keep_alive_s) as resident:
        load_duration = max(1, time.perf_counter_ns() - started)
        vectors: list[list[float]] = []
        tokens = 0
        for start in range(0, len(texts), EMBED_CHUNK_INPUTS):
            chunk = EmbedRequest(texts[start : start + EMBED_CHUNK_INPUTS], truncate=truncate)
            result = await resident.loaded.runner.embed(chunk)
            vectors.extend(result.vectors)
            tokens += result.prompt_tokens
    return Embedded(
        shorten(vectors, dimensions),
        tokens,
        time.perf_counter_ns() - started,
        load_duration,
    )


@routes.post("/api/embed")
async def embed(request: web.Request) -> web.Response:
    body = await json_body(request)
    name = model_name(body)
    embedded = await embed_texts(
        request,
        name,
        embed_inputs(body.get("input", [])),
        truncate=optional(body, "truncate", bool, True),
        dimensions=optional(body, "dimensions", int),
        keep_alive_s=keep_alive(body.get("keep_alive")),
    )
    return web.json_response(
        {
            "model": name,
            "embeddings": embedded.vectors,
            "total_duration": embedded.total_duration,
            "load_duration": embedded.load_duration,
            "prompt_eval_count": embedded.prompt_tokens,
        }
    )


@routes.post("/api/embeddings")
async def embeddings_legacy(request: web.Request) -> web.Response:
    """Ollama's older route: one ``prompt``, one ``embedding``; an empty prompt just loads."""
    body = await json_body(request)
    name = model_name(body)
    prompt = optional(body, "prompt", str, "")
    embedded = await embed_texts(
        request,
        name,
        [prompt] if prompt else [],
        keep_alive_s=keep_alive(body.get("keep_alive")),
    )
    return web.json_response({"embedding": embedded.vectors[0] if embedded.vectors else []})


def encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    """OpenAI's ``base64``: the little-endian float32 bytes of the vector."""
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


@routes.post("/v1/embeddings")
async def openai_embeddings(request: web.Request) -> web.Response:
    body = await json_body(request)
    name = model_name(body)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODING_FORMATS:
        raise InvalidRequestError(
            f"'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}",
            param="encoding_format",
        )
    texts = embed_inputs(body.get("input"))
    if not texts:
        raise InvalidRequestError("'input' must not be empty", param="input")
    embedded = await embed_texts(request, name, texts, dimensions=optional(body, "dimensions", int))
    return web.json_response(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": encode_vector(v, encoding)}
                for index, v in enumerate(embedded.vectors)
            ],
            "model": name,
            "usage": {
                "prompt_tokens": embedded.prompt_tokens,
                "total_tokens": embedded.prompt_tokens,
            },
        }
    )
