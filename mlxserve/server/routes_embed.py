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

from mlxserve.errors import InvalidRequestError, UnsupportedFeatureError
from mlxserve.runners.base import EmbedRequest
from mlxserve.server.state import MANAGER, STORE
from mlxserve.server.validate import json_body, keep_alive, model_name, optional

routes = web.RouteTableDef()
OPENAI_TOKEN_ENCODING = "cl100k_base"
"""The tokenizer of OpenAI's embedding models, in which its API reads token-id ``input``."""
MAX_INPUTS = 2048
"""Inputs per request, as OpenAI allows: bounds the work one request can queue."""
ENCODING_FORMATS = ("float", "base64")


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
        if len(value) > MAX_INPUTS:
            raise InvalidRequestError(
                f"'input' has {len(value)} items; at most {MAX_INPUTS} per request", param="input"
            )
        return value
    raise InvalidRequestError("'input' must be a string or a list of strings", param="input")


def is_token_id(value: Any) -> bool:
    """An integer, as JSON Schema counts them (``3.0`` is one; ``true`` is not)."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(is_token_id(v) for v in value)


def openai_token_texts(value: Any) -> list[str] | None:
    """OpenAI's token-id ``input`` (a list of ids, or a list of such lists: what LangChain's
    ``OpenAIEmbeddings`` sends by default, cut with tiktoken) as texts, or ``None`` when
    ``input`` is not token ids. The ids are OpenAI's embedding tokenizer's (cl100k_base, as the
    API defines them), not the model's, so they are decoded with tiktoken and the text is
    embedded with the model's own tokenizer."""
    if value == [] or not isinstance(value, list):
        return None
    if is_token_ids(value):
        lists = [value]
    elif all(is_token_ids(item) and item for item in value):
        lists = value
    else:
        return None
    if len(lists) > MAX_INPUTS:
        raise InvalidRequestError(
            f"'input' has {len(lists)} items; at most {MAX_INPUTS} per request", param="input"
        )
    try:
        import tiktoken

        encoding = tiktoken.get_encoding(OPENAI_TOKEN_ENCODING)
    except Exception as exc:  # not installed, or its encoding file cannot be fetched
        raise UnsupportedFeatureError(
            "token-id 'input' is read as OpenAI's cl100k_base tokens, which needs tiktoken and "
            f"its encoding file (pip install tiktoken; TIKTOKEN_CACHE_DIR): {exc}",
            param="input",
        ) from None
    texts = []
    for index, given in enumerate(lists):
        ids = [int(token) for token in given]
        if any(not 0 <= token < encoding.n_vocab for token in ids):
            raise InvalidRequestError(
                f"input {index} has a token id outside cl100k_base (0 to {encoding.n_vocab - 1})",
                param="input",
                index=index,
            )
        try:
            texts.append(encoding.decode(ids))
        except KeyError as exc:
            raise InvalidRequestError(
                f"input {index} has an unused cl100k_base token id: {exc}",
                param="input",
                index=index,
            ) from None
    return texts


def shorten(vectors: list[list[float]], dimensions: int | None) -> list[list[float]]:
    """The first ``dimensions`` components, re-normalised (Matryoshka-style shortening, as
    Ollama does for any model; OpenAI's route only where the model card says Matryoshka);
    more dimensions than the model makes is a 400."""
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
        vectors, tokens = [], 0
        if texts:
            result = await resident.loaded.runner.embed(EmbedRequest(texts, truncate=truncate))
            vectors, tokens = result.vectors, result.prompt_tokens
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
    """Ollama's older route: one ``prompt``, one ``embedding``; an empty prompt just loads.
    ``prompt_eval_count`` (not in Ollama's answer) gives it usage as every embedding API has."""
    body = await json_body(request)
    name = model_name(body)
    prompt = optional(body, "prompt", str, "")
    embedded = await embed_texts(
        request,
        name,
        [prompt] if prompt else [],
        keep_alive_s=keep_alive(body.get("keep_alive")),
    )
    return web.json_response(
        {
            "embedding": embedded.vectors[0] if embedded.vectors else [],
            "prompt_eval_count": embedded.prompt_tokens,
        }
    )


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
    texts = openai_token_texts(body.get("input"))
    if texts is None:
        texts = embed_inputs(body.get("input"))
    if not texts:
        raise InvalidRequestError("'input' must not be empty", param="input")
    dimensions = optional(body, "dimensions", int)
    if dimensions is not None:
        store = request.app[STORE]
        record = store.config(store.resolve(name)).embedding or {}
        if not record.get("matryoshka"):
            raise UnsupportedFeatureError(
                f"{name} was not trained to be shortened: its model card does not say "
                "Matryoshka, so 'dimensions' would give vectors of lower quality (Ollama's "
                "/api/embed shortens any model's vectors if you want that)",
                param="dimensions",
            )
    embedded = await embed_texts(request, name, texts, dimensions=dimensions)
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
