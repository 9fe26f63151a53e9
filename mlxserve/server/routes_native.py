"""The native API's routes other than chat (``routes_chat.py``) and embeddings
(``routes_embed.py``): the store, the process list, blobs and health, with Ollama's paths, field
names and semantics."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from mlxserve import __version__
from mlxserve.api.types import utc_timestamp
from mlxserve.server.describe import tag_entry
from mlxserve.server.state import MANAGER, METRICS, STORE
from mlxserve.server.validate import json_body, model_name, required_str
from modelstore.reference import validate_digest

routes = web.RouteTableDef()
UPLOAD_CHUNK_BYTES = 1 << 20
"""Blob uploads stream to disk a piece at a time: memory stays bounded for any size."""
UPLOAD_THREADS = 2
UPLOAD_POOL = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="mlxserve-upload")
"""The uploads' own threads (disk writes only); the default pool stays free for the rest."""


@routes.get("/api/tags")
async def tags(request: web.Request) -> web.Response:
    store = request.app[STORE]
    return web.json_response({"models": [tag_entry(store, m) for m in store.list()]})


@routes.post("/api/copy")
async def copy(request: web.Request) -> web.Response:
    body = await json_body(request)
    source = required_str(body, "source")
    destination = required_str(body, "destination")
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
        details = resident.loaded.runner.describe().details
        cache = details.get("prompt_cache")
        entry.update(
            expires_at=(
                "0001-01-01T00:00:00Z"
                if expires is None
                else utc_timestamp(time.time() + max(0.0, expires - now))
            ),
            size_vram=info.memory_bytes if info.details.get("metal") else 0,
            memory_bytes=info.memory_bytes + int(details.get("prompt_cache_ram_bytes") or 0),
            runner=info.runner,
            context_length=info.context_length,
            slots=resident.queue.parallel,
            kv_cache_type=info.details.get("kv_cache_type"),
            kv_cache_bytes=info.details.get("kv_cache_bytes"),
            active=resident.queue.active,
            queued=resident.queue.waiting,
        )
        if "cpu_blas" in info.details:
            entry["cpu_blas"] = info.details["cpu_blas"]
        if "distributed" in info.details:
            entry["distributed"] = info.details["distributed"]
        if cache is not None:
            entry["prompt_cache"] = cache
        models.append(entry)
    return web.json_response({"models": models})


@routes.route("HEAD", "/api/blobs/{digest}")
async def blob_exists(request: web.Request) -> web.Response:
    digest = validate_digest(request.match_info["digest"])
    return web.Response(status=200 if request.app[STORE].blobs.exists(digest) else 404)


@routes.post("/api/blobs/{digest}")
async def blob_upload(request: web.Request) -> web.Response:
    """Stream a blob into the store, verified against the digest in the path.

    The coroutine reads from the network and hands each piece to ``UPLOAD_POOL`` for one
    short write: no thread ever waits on a client, so slow uploads queue behind each other
    there and never starve the default pool other routes need (issue 21: six slow uploads
    holding both a feeder and a writer thread each deadlocked the daemon). A full disk is a
    507 and the partial file is removed."""
    digest = validate_digest(request.match_info["digest"])
    store = request.app[STORE]
    if store.blobs.exists(digest):
        return web.Response(status=200)
    loop = asyncio.get_running_loop()
    async with store.writing_async():
        with store.blobs.open_writer() as writer:
            async for chunk in request.content.iter_chunked(UPLOAD_CHUNK_BYTES):
                await loop.run_in_executor(UPLOAD_POOL, writer.write, chunk)
            await loop.run_in_executor(UPLOAD_POOL, writer.finish, digest)
    return web.Response(status=201)


OLLAMA_API_VERSION = "0.14.0"
"""The Ollama release whose API this daemon serves, which is what clients gate on (``codex
--oss`` requires 0.13.4 or newer): Ollama 0.14.0 has the routes served here, including
``/v1/responses`` and Anthropic's ``/v1/messages``, and ``think`` levels. mlxserve's own version
is ``mlxserve_version`` (and the ``X-Mlxserve-Version`` header of every response)."""


@routes.get("/api/version")
async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_API_VERSION, "mlxserve_version": __version__})


@routes.get("/api/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    for name, resident in request.app[MANAGER].residents.items():
        details = resident.loaded.runner.describe().details
        cache = details.get("prompt_cache")
        if cache is not None:
            request.app[METRICS].prompt_cache(name, cache)
    return web.Response(
        body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8"
    )
