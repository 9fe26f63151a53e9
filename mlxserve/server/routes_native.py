"""The native API, Ollama-compatible: same paths, field names and semantics as Ollama's
``docs/api.md``; streams are NDJSON and the last line has ``done: true`` and the stats."""

from __future__ import annotations

import asyncio
import json
import queue
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from mlxserve import __version__
from mlxserve.api.types import (
    ChatMessage,
    ChatResponse,
    GenerateResponse,
    ToolCall,
    ToolCallFunction,
    WireStats,
    utc_timestamp,
)
from mlxserve.errors import InvalidRequestError
from mlxserve.runners.base import GenerateChunk
from mlxserve.server.describe import show_body, tag_entry
from mlxserve.server.encoders import NDJSON, open_stream, write_ndjson
from mlxserve.server.errors import error_body
from mlxserve.server.generation import Generation, generation, messages_from_body
from mlxserve.server.options import (
    keep_alive_seconds,
    ollama_format,
    ollama_overrides,
    require_bool,
    require_str,
)
from mlxserve.server.state import MANAGER, METRICS, STORE
from mlxserve.server.tools import parse_tool_calls
from modelstore import mediatypes
from modelstore.errors import MlxserveError
from modelstore.reference import validate_digest

routes = web.RouteTableDef()
UPLOAD_CHUNK_BYTES = 1 << 20
UPLOAD_QUEUE_CHUNKS = 8
"""Blob uploads stream to disk through a short queue: memory stays bounded for any size."""


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return body


def model_name(body: dict[str, Any]) -> str:
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("'model' is required", param="model")
    return name


async def load_or_unload(request: web.Request, name: str, keep_alive: float | None,
                         chat: bool) -> web.Response:
    """An empty prompt loads the model; with ``keep_alive: 0`` it unloads it (Ollama)."""
    manager = request.app[MANAGER]
    if keep_alive == 0:
        await manager.unload(name)
        reason = "unload"
    else:
        await manager.ensure_loaded(name, keep_alive=keep_alive)
        reason = "load"
    body: dict[str, Any] = {"model": name, "created_at": utc_timestamp(), "done": True,
                            "done_reason": reason}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return web.json_response(body)


async def stream_or_collect(
    request: web.Request,
    running: Generation,
    stream: bool,
    shape: Any,
    finish: Any,
) -> web.StreamResponse:
    """Send chunks as NDJSON lines (``stream``) or as one object; errors mid-stream become a
    final ``{"error": ...}`` line, since the status line has already gone out."""
    first = await running.first()
    if not stream:
        chunks = [first] + [chunk async for chunk in running.rest()]
        return web.json_response(finish(chunks))
    response = await open_stream(request, NDJSON)
    try:
        await write_ndjson(response, shape(first))
        if not first.done:
            async for chunk in running.rest():
                await write_ndjson(response, shape(chunk))
    except MlxserveError as error:
        await write_ndjson(response, error_body(error, openai=False))
    await response.write_eof()
    return response


@routes.post("/api/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    name = model_name(body)
    prompt = require_str(body, "prompt", required=False) or ""
    system = require_str(body, "system", required=False)
    raw = require_bool(body, "raw", False)
    stream = require_bool(body, "stream", True)
    keep_alive = keep_alive_seconds(body.get("keep_alive"))
    if body.get("images"):
        raise InvalidRequestError("images are not supported by the text models this server runs")
    if body.get("template") or body.get("suffix"):
        raise InvalidRequestError("'template' and 'suffix' are not supported; use a ModelSpec")
    overrides = ollama_overrides(body.get("options"))
    overrides["response_format"] = ollama_format(body.get("format"))
    if not prompt:
        return await load_or_unload(request, name, keep_alive, chat=False)

    def build(loaded: Any) -> Any:
        if raw:
            return loaded.raw_request(prompt, overrides)
        messages = [{"role": "user", "content": prompt}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return loaded.chat_request(messages, overrides)

    def shape(chunk: GenerateChunk) -> dict[str, Any]:
        return GenerateResponse.from_chunk(name, chunk).to_dict()

    def finish(chunks: list[GenerateChunk]) -> dict[str, Any]:
        final = shape(chunks[-1])
        final["response"] = "".join(c.text for c in chunks)
        return final

    async with generation(request.app[MANAGER], request, name, build, keep_alive=keep_alive,
                          metrics=request.app[METRICS]) as running:
        return await stream_or_collect(request, running, stream, shape, finish)


@routes.post("/api/chat")
async def chat(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    name = model_name(body)
    messages = messages_from_body(body.get("messages") or [])
    tools = body.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequestError("'tools' must be a list", param="tools")
    stream = require_bool(body, "stream", True)
    keep_alive = keep_alive_seconds(body.get("keep_alive"))
    overrides = ollama_overrides(body.get("options"))
    overrides["response_format"] = ollama_format(body.get("format"))
    if not messages:
        return await load_or_unload(request, name, keep_alive, chat=True)
    for message in messages:
        for call in message.get("tool_calls") or []:
            arguments = (call.get("function") or {}).get("arguments")
            if isinstance(arguments, str):
                raise InvalidRequestError("tool call arguments must be a JSON object, not a string")

    def build(loaded: Any) -> Any:
        return loaded.chat_request(messages, overrides, tools)

    buffer: list[str] = []

    def shape(chunk: GenerateChunk) -> dict[str, Any]:
        """With tools offered, text is held back until the end: it may be a tool call."""
        message = ChatMessage(role="assistant", content=chunk.text)
        if tools:
            buffer.append(chunk.text)
            message.content = ""
            if chunk.done:
                message.content, calls = parse_tool_calls("".join(buffer), tools)
                message.tool_calls = [
                    ToolCall(ToolCallFunction(call.name, call.arguments, index))
                    for index, call in enumerate(calls)
                ] or None
        return ChatResponse(
            model=name,
            message=message,
            done=chunk.done,
            done_reason=chunk.done_reason if chunk.done else None,
            stats=WireStats.from_stats(chunk.stats) if chunk.done and chunk.stats else None,
        ).to_dict()

    def finish(chunks: list[GenerateChunk]) -> dict[str, Any]:
        if tools:
            for chunk in chunks[:-1]:
                shape(chunk)
            return shape(chunks[-1])
        final = shape(chunks[-1])
        final["message"]["content"] = "".join(c.text for c in chunks)
        return final

    async with generation(request.app[MANAGER], request, name, build, keep_alive=keep_alive,
                          metrics=request.app[METRICS]) as running:
        return await stream_or_collect(request, running, stream, shape, finish)


def embed_inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise InvalidRequestError("'input' must be a string or a non-empty list of strings",
                              param="input")


async def embed_texts(request: web.Request, name: str, texts: list[str],
                      keep_alive: float | None) -> tuple[list[list[float]], int, int]:
    started = time.perf_counter_ns()
    request["log"]["model"] = name
    async with request.app[MANAGER].use(name, keep_alive=keep_alive) as resident:
        runner = resident.loaded.runner
        vectors = await runner.embed(texts)
        tokens = sum(len(runner.tokenize(text)) for text in texts)
    return vectors, tokens, time.perf_counter_ns() - started


@routes.post("/api/embed")
async def embed(request: web.Request) -> web.Response:
    body = await json_body(request)
    name = model_name(body)
    texts = embed_inputs(body.get("input"))
    vectors, tokens, duration = await embed_texts(
        request, name, texts, keep_alive_seconds(body.get("keep_alive"))
    )
    return web.json_response({"model": name, "embeddings": vectors, "total_duration": duration,
                              "load_duration": 0, "prompt_eval_count": tokens})


@routes.post("/api/embeddings")
async def embeddings_legacy(request: web.Request) -> web.Response:
    body = await json_body(request)
    name = model_name(body)
    prompt = require_str(body, "prompt") or ""
    vectors, _, _ = await embed_texts(request, name, [prompt],
                                      keep_alive_seconds(body.get("keep_alive")))
    return web.json_response({"embedding": vectors[0]})


@routes.get("/api/tags")
async def tags(request: web.Request) -> web.Response:
    store = request.app[STORE]
    return web.json_response({"models": [tag_entry(store, m) for m in store.list()]})


def own_template(store: Any, model: Any) -> str | None:
    """The template a chat would use: the spec's override, else the tokenizer's own."""
    override = store.text_layer(model, mediatypes.CHAT_TEMPLATE)
    if override:
        return override
    for layer in model.manifest.layers:
        if layer.title == "tokenizer_config.json":
            config = json.loads(store.blobs.read_bytes(layer.digest))
            template = config.get("chat_template")
            return template if isinstance(template, str) else None
        if layer.media_type == mediatypes.WEIGHTS_GGUF:
            from modelstore.sources import read_gguf_metadata

            return read_gguf_metadata(store.blobs.path(layer.digest)).get("chat_template")
    return None


@routes.post("/api/show")
async def show(request: web.Request) -> web.Response:
    body = await json_body(request)
    store = request.app[STORE]
    model = store.resolve(model_name(body))
    # Off the event loop: for a GGUF this parses the file's metadata (thousands of tensors).
    template = await asyncio.to_thread(own_template, store, model)
    return web.json_response(show_body(store, model, template))


@routes.post("/api/copy")
async def copy(request: web.Request) -> web.Response:
    body = await json_body(request)
    source = require_str(body, "source")
    destination = require_str(body, "destination")
    request.app[STORE].copy(source, destination)
    return web.Response(status=200)


@routes.delete("/api/delete")
async def delete(request: web.Request) -> web.Response:
    body = await json_body(request)
    name = model_name(body)
    if request.app[STORE].exists(name):
        await request.app[MANAGER].unload(name)
    request.app[STORE].remove(name)
    return web.Response(status=200)


@routes.get("/api/ps")
async def ps(request: web.Request) -> web.Response:
    store = request.app[STORE]
    models = []
    now = time.monotonic()
    for resident in request.app[MANAGER].residents.values():
        stored = store.resolve(resident.name)
        entry = tag_entry(store, stored)
        info = resident.loaded.info
        expires = resident.expires_at
        entry.update(
            expires_at=(
                "0001-01-01T00:00:00Z"
                if expires is None
                else utc_timestamp(time.time() + max(0.0, expires - now))
            ),
            size_vram=info.memory_bytes if info.details.get("metal") else 0,
            runner=info.runner,
            context_length=info.context_length,
            slots=resident.queue.parallel,
            active=resident.queue.active,
            queued=resident.queue.waiting,
        )
        models.append(entry)
    return web.json_response({"models": models})


@routes.route("HEAD", "/api/blobs/{digest}")
async def blob_exists(request: web.Request) -> web.Response:
    digest = validate_digest(request.match_info["digest"])
    return web.Response(status=200 if request.app[STORE].blobs.exists(digest) else 404)


@routes.post("/api/blobs/{digest}")
async def blob_upload(request: web.Request) -> web.Response:
    """Stream a blob into the store, verified against the digest in the path."""
    digest = validate_digest(request.match_info["digest"])
    store = request.app[STORE]
    if store.blobs.exists(digest):
        return web.Response(status=200)
    pending: queue.Queue[bytes | None] = queue.Queue(maxsize=UPLOAD_QUEUE_CHUNKS)

    def chunks() -> Iterator[bytes]:
        while (chunk := pending.get()) is not None:
            yield chunk

    def write() -> None:
        with store.writing():
            store.blobs.write_chunks(chunks(), expected_digest=digest)

    writer = asyncio.get_running_loop().run_in_executor(None, write)
    try:
        async for chunk in request.content.iter_chunked(UPLOAD_CHUNK_BYTES):
            await asyncio.to_thread(pending.put, chunk)
    finally:
        await asyncio.to_thread(pending.put, None)
        await writer
    return web.Response(status=201)


@routes.get("/api/version")
async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


@routes.get("/api/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        content_type="text/plain", charset="utf-8")
