"""Sending a chat's events: NDJSON lines (native API) or Server-Sent Events (the others).

Each API supplies a ``WireEncoder`` (its events -> its messages); this module owns the
transport: the response opens on the first event (so errors before it keep their HTTP status),
SSE keep-alives go out during a long prefill (after the envelope's opening messages, never
before them), and a failure after the response started is sent
as the API's own error message, last, carrying the request's id (``errors.with_request_id``).

Each event's messages go out in one write. A client slower than the model (its socket still
holds bytes not yet taken) gets the messages of the events meanwhile in one write with the next
event's, instead of one write per token: the first event is never held, and a client that keeps
up (an empty socket buffer) gets every event at once.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from aiohttp import web

from mlxserve.chat.core import ChatRun
from mlxserve.chat.events import ErrorEvent, Event
from mlxserve.server.errors import with_request_id

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
SSE_KEEPALIVE = b": keep-alive\n\n"
"""An SSE comment: clients ignore it, proxies and timeouts see a live connection."""
SSE_DONE = "[DONE]"

Frame = dict[str, Any] | str | tuple[str, dict[str, Any]]
"""A message: a JSON object, a bare SSE data string (``[DONE]``), or (SSE event name, object)."""


class WireEncoder(Protocol):
    def opening(self, prompt_tokens: int) -> list[Frame]:
        """Messages before the first event (a stream's envelope); ``prompt_tokens`` is how long
        the prompt is, which some envelopes report up front."""
        ...

    def encode(self, event: Event) -> list[Frame]: ...

    def closing(self) -> list[Frame]:
        """Messages after the last event."""
        ...


async def open_stream(request: web.Request, content_type: str) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
    )
    if content_type == SSE:
        response.headers["X-Accel-Buffering"] = "no"
    await response.prepare(request)
    return response


def frame_bytes(frame: Frame, content_type: str) -> bytes:
    if content_type == NDJSON:
        return json.dumps(frame, ensure_ascii=False).encode() + b"\n"
    if isinstance(frame, str):
        return f"data: {frame}\n\n".encode()
    if isinstance(frame, tuple):
        name, body = frame
        return f"event: {name}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n".encode()
    return f"data: {json.dumps(frame, ensure_ascii=False)}\n\n".encode()


class _Writer:
    def __init__(
        self,
        request: web.Request,
        content_type: str,
        keepalive: bytes | None,
        opening: list[Frame],
    ) -> None:
        self.request = request
        self.content_type = content_type
        self.keepalive = keepalive
        self.opening = opening
        """The envelope's first messages: sent before any keep-alive (Anthropic's clients
        expect ``message_start`` before any ``ping``), or with the first event."""
        self.response: web.StreamResponse | None = None
        self.held: list[bytes] = []
        """Messages not yet written: the client had not taken the ones before (``send``)."""

    async def ensure(self) -> web.StreamResponse:
        if self.response is None:
            self.response = await open_stream(self.request, self.content_type)
            opening, self.opening = self.opening, []
            self.held += [frame_bytes(frame, self.content_type) for frame in opening]
        return self.response

    async def heartbeat(self) -> None:
        if self.keepalive is not None:
            response = await self.ensure()
            held, self.held = self.held, []
            await response.write(b"".join([*held, self.keepalive]))

    async def send(self, frames: list[Frame], *, hold: bool = False) -> None:
        """Write ``frames`` (and any held before) in one write; with ``hold``, keep them for
        the next send while the client has not taken what it was sent."""
        response = await self.ensure()
        self.held += [frame_bytes(frame, self.content_type) for frame in frames]
        if hold and self.backed_up():
            return
        held, self.held = self.held, []
        if held:
            await response.write(b"".join(held))

    def backed_up(self) -> bool:
        transport = self.request.transport
        return transport is not None and transport.get_write_buffer_size() > 0


async def stream_events(
    request: web.Request,
    run: ChatRun,
    encoder: WireEncoder,
    *,
    content_type: str,
    keepalive: bytes | None = None,
    keepalive_s: float = 5.0,
) -> web.StreamResponse:
    writer = _Writer(request, content_type, keepalive, encoder.opening(run.prompt_tokens))
    heartbeat = writer.heartbeat if keepalive is not None else None

    def encode(event: Event) -> list[Frame]:
        if isinstance(event, ErrorEvent):
            event = ErrorEvent(with_request_id(event.error, request["request_id"]))
        return encoder.encode(event)

    await writer.send(encode(await run.first(heartbeat, keepalive_s)))
    async for event in run.rest():
        await writer.send(encode(event), hold=True)
    await writer.send(encoder.closing())
    response = await writer.ensure()
    await response.write_eof()
    return response


async def write_ndjson(response: web.StreamResponse, body: dict[str, Any]) -> None:
    """One NDJSON line on a stream a route opened itself (pull, push, create progress)."""
    await response.write(frame_bytes(body, NDJSON))
