"""Token tools: llama.cpp server's ``POST /tokenize``, ``/detokenize`` and ``/apply-template``,
and Ollama-side ``POST /api/tokenize`` / ``/api/detokenize`` of the same meaning, for any
loaded or loadable model (``model`` names it; the model is loaded as for any request).

``/apply-template`` renders through the chat core's own ``prepare`` (template, tools, think), so
its ``prompt`` is exactly what generation would see, and ``/tokenize`` of that prompt (with
``add_special`` false, as the core tokenizes a templated prompt) counts what generation
reports as ``prompt_eval_count``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from mlxserve.chat.core import prepare
from mlxserve.errors import InvalidRequestError
from mlxserve.server import api_openai
from mlxserve.server.routes_embed import is_token_ids
from mlxserve.server.state import MANAGER
from mlxserve.server.validate import json_body, keep_alive, model_name, optional, think_value
from modelstore.model import LocalModel

routes = web.RouteTableDef()


def token_ids(value: Any, vocab_size: int | None) -> list[int]:
    """``tokens`` as ids the model has: a native tokenizer given an id outside its vocabulary
    may abort the process (llama.cpp), so every id is checked first."""
    if not is_token_ids(value):
        raise InvalidRequestError("'tokens' must be a list of integers", param="tokens")
    value = [int(token) for token in value]
    upper = vocab_size if vocab_size else None
    for index, token in enumerate(value):
        if token < 0 or (upper is not None and token >= upper):
            raise InvalidRequestError(
                f"tokens[{index}] = {token} is not in this model's vocabulary"
                + (f" (0 to {upper - 1})" if upper else ""),
                param="tokens",
                index=index,
            )
    return value


def vocab_size(model: LocalModel) -> int | None:
    """The vocabulary size the store kept at import (``<arch>.vocab_size``)."""
    size = model.model_info.get(f"{model.architecture or 'unknown'}.vocab_size")
    return size if isinstance(size, int) and size > 0 else None


async def _tokenize(request: web.Request, body: dict[str, Any], field: str) -> tuple[str, Any]:
    name = model_name(body)
    content = optional(body, field, str, "")
    add_special = optional(body, "add_special", bool, False)
    with_pieces = optional(body, "with_pieces", bool, False)
    request["log"]["model"] = name
    manager = request.app[MANAGER]
    async with manager.use(name, keep_alive=keep_alive(body.get("keep_alive"))) as resident:
        runner = resident.loaded.runner
        ids = await asyncio.to_thread(runner.tokenize, content, add_special)
        if not with_pieces:
            return name, ids
        pieces = await asyncio.to_thread(lambda: [runner.detokenize([i]) for i in ids])
    return name, [{"id": i, "piece": piece} for i, piece in zip(ids, pieces, strict=True)]


async def _detokenize(request: web.Request, body: dict[str, Any]) -> tuple[str, str]:
    name = model_name(body)
    request["log"]["model"] = name
    manager = request.app[MANAGER]
    async with manager.use(name, keep_alive=keep_alive(body.get("keep_alive"))) as resident:
        ids = token_ids(body.get("tokens"), vocab_size(resident.loaded.model))
        content = await asyncio.to_thread(resident.loaded.runner.detokenize, ids)
    return name, content


@routes.post("/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    _, tokens = await _tokenize(request, await json_body(request), "content")
    return web.json_response({"tokens": tokens})


@routes.post("/detokenize")
async def detokenize(request: web.Request) -> web.Response:
    _, content = await _detokenize(request, await json_body(request))
    return web.json_response({"content": content})


@routes.post("/apply-template")
async def apply_template(request: web.Request) -> web.Response:
    """OpenAI-shaped ``messages`` and ``tools`` (as llama.cpp's server takes them) plus Ollama's
    ``think`` -> ``{"prompt": ...}``, the text the model would be given."""
    body = await json_body(request)
    chat = api_openai.parse_chat(body)
    think = think_value(body.get("think"))
    if think is not None:
        chat.think = think
    request["log"]["model"] = chat.model
    manager = request.app[MANAGER]
    async with manager.use(chat.model, keep_alive=keep_alive(body.get("keep_alive"))) as resident:
        prepared = await asyncio.to_thread(prepare, resident.loaded, chat)
    return web.json_response({"prompt": prepared.prompt})


@routes.post("/api/tokenize")
async def ollama_tokenize(request: web.Request) -> web.Response:
    name, tokens = await _tokenize(request, await json_body(request), "content")
    return web.json_response({"model": name, "tokens": tokens})


@routes.post("/api/detokenize")
async def ollama_detokenize(request: web.Request) -> web.Response:
    name, content = await _detokenize(request, await json_body(request))
    return web.json_response({"model": name, "content": content})
