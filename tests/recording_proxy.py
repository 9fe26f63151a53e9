"""A loopback HTTP proxy in front of the daemon that records what a client really sends.

The agent tests point each agent at this proxy instead of the daemon itself: every request is
forwarded unchanged (streamed responses stay streamed), and its method, path, JSON body and the
status and body of the answer are kept, so a test can check what went over the wire (the tool
result in the second request, the tools the agent declared) and save a trimmed capture for the
faster in-process replay tests (``tests/data/agents/``).
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

from tests.daemon import free_port

HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}
)
"""Headers that describe one connection, not the message: aiohttp sets its own."""
RECORDED_HEADERS = ("content-type", "anthropic-version", "anthropic-beta", "user-agent")
"""The request headers a capture keeps (never an authorization header)."""


@dataclass
class Exchange:
    """One request through the proxy and the answer it got."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    status: int = 0
    response: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body": self.body,
            "status": self.status,
            "response": self.response,
        }


@dataclass
class RecordingProxy:
    upstream: str
    port: int = 0
    exchanges: list[Exchange] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _stopped: asyncio.Event | None = None
    _session: ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RecordingProxy:
        self.port = free_port()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the recording proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._stopped:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread:
            self._thread.join(10)

    def posts(self, path_prefix: str) -> list[Exchange]:
        """The POSTs whose path starts with ``path_prefix``, oldest first."""
        return [e for e in self.exchanges if e.method == "POST" and e.path.startswith(path_prefix)]

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        async with ClientSession(timeout=ClientTimeout(total=None), auto_decompress=False) as ses:
            self._session = ses
            self._ready.set()
            await self._stopped.wait()
        await runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        exchange = Exchange(
            request.method,
            request.path,
            request.query_string,
            {k: v for k, v in request.headers.items() if k.lower() in RECORDED_HEADERS},
            body,
        )
        self.exchanges.append(exchange)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        assert self._session is not None
        async with self._session.request(
            request.method, self.upstream + request.rel_url.path_qs, data=raw, headers=headers
        ) as upstream:
            exchange.status = upstream.status
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS},
            )
            await response.prepare(request)
            received = bytearray()
            async for chunk in upstream.content.iter_any():
                received += chunk
                await response.write(chunk)
            exchange.response = received.decode(errors="replace")
            await response.write_eof()
            return response
