"""Streaming bodies: NDJSON for the native API, Server-Sent Events for the OpenAI API."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
SSE_KEEPALIVE = b": keep-alive\n\n"
"""An SSE comment: clients ignore it, proxies and timeouts see a live connection."""


async def open_stream(request: web.Request, content_type: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": content_type,
                                           "Cache-Control": "no-cache"})
    if content_type == SSE:
        response.headers["X-Accel-Buffering"] = "no"
    await response.prepare(request)
    return response


async def write_ndjson(response: web.StreamResponse, body: dict[str, Any]) -> None:
    await response.write(json.dumps(body, ensure_ascii=False).encode() + b"\n")


async def write_sse(response: web.StreamResponse, body: dict[str, Any] | str) -> None:
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    await response.write(f"data: {data}\n\n".encode())
