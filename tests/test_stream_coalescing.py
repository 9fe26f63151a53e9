"""Streamed answers and slow clients (``server/encoders.py``): a client that keeps up gets every
token in a write of its own, the first at once; a client that does not read gets every token
too, the ones that piled up meanwhile written together instead of one write per token.

The daemon's app runs in this process (on a thread of its own, the runner in-process) so that
its side of each connection can get a small kernel send buffer: on loopback the kernel would
otherwise take megabytes before the daemon sees a slow client. Read over raw sockets, so the
HTTP chunks (one per write of the daemon) can be counted.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

TOKENS = 400
SLOW_RECEIVE_BUFFER = 1024
"""The slow client's socket buffer: small, so the daemon's socket backs up within the answer."""
SERVER_SEND_BUFFER = 4096
SMALL_BUFFER_HEADER = "X-Test-Small-Send-Buffer"
SLOW_CLIENT_WAIT_S = 60.0
SLOW_CLIENT_SLEEP_S = 3.0


@dataclass
class Served:
    url: str


@pytest.fixture(scope="module")
def daemon(tiny_store) -> Iterator[Served]:
    """The daemon's app over the tiny store; a request with ``SMALL_BUFFER_HEADER`` gets a
    small send buffer on its socket."""
    from aiohttp import web

    from mlxserve.server.app import build_app
    from mlxserve.server.config import Settings

    async def small_send_buffer(request: web.Request, response: web.StreamResponse) -> None:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None and SMALL_BUFFER_HEADER in request.headers:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SERVER_SEND_BUFFER)

    loop = asyncio.new_event_loop()
    app = build_app(Settings(home=tiny_store.root, isolate_runners=False))
    app.on_response_prepare.append(small_send_buffer)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield Served(f"http://127.0.0.1:{port}")
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def post_stream(url: str, body: dict, *, slow: bool = False) -> socket.socket:
    """A streamed chat on a socket of its own; ``slow``: small buffers on both ends."""
    parts = urlsplit(url)
    sock = socket.socket()
    if slow:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RECEIVE_BUFFER)
    sock.connect((parts.hostname, parts.port))
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        + (f"{SMALL_BUFFER_HEADER}: 1\r\n".encode() if slow else b"")
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def read_chunks(sock: socket.socket) -> list[tuple[float, bytes]]:
    """The response's HTTP chunks (each one write of the daemon), with when each was whole."""
    data = b""
    chunks: list[tuple[float, bytes]] = []
    head = None
    while True:
        received = sock.recv(65536)
        now = time.perf_counter()
        data += received
        if head is None and b"\r\n\r\n" in data:
            head, data = data.split(b"\r\n\r\n", 1)
            assert b"transfer-encoding: chunked" in head.lower()
        while head is not None and b"\r\n" in data:
            size_line, rest = data.split(b"\r\n", 1)
            size = int(size_line, 16)
            if len(rest) < size + 2:
                break
            if size == 0:
                return chunks
            chunks.append((now, rest[:size]))
            data = rest[size + 2 :]
        if not received:
            return chunks


def frames(chunk: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in chunk.split(b"\n\n") if line.startswith(b"data: {")]


def content(chunks: list[tuple[float, bytes]]) -> str:
    return "".join(
        frame["choices"][0]["delta"].get("content") or ""
        for _, chunk in chunks
        for frame in frames(chunk)
        if frame["choices"]
    )


def body(question: str) -> dict:
    return {
        "model": "tiny:gguf",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": True,
    }


def loaded(daemon) -> None:
    """The model loaded, so that the first token's time is the generation's, not the load's."""
    with post_stream(daemon.url, {**body("Hi"), "max_tokens": 1}) as sock:
        read_chunks(sock)


def test_a_client_that_keeps_up_gets_each_token_in_its_own_write_the_first_at_once(daemon):
    loaded(daemon)
    sock = post_stream(daemon.url, body("Count to a hundred."))
    with sock:
        chunks = read_chunks(sock)
    with_content = [
        (at, chunk)
        for at, chunk in chunks
        if any(f["choices"] and f["choices"][0]["delta"].get("content") for f in frames(chunk))
    ]
    assert len(with_content) > TOKENS // 2
    # Never more than one event's message in a write: nothing held back while it keeps up.
    assert all(len(frames(chunk)) <= 2 for _, chunk in chunks)
    assert sum(len(frames(chunk)) == 2 for _, chunk in chunks) <= 1  # the role opening, once
    # The first token went out in a write of its own (a write holding it and the next would
    # have three messages), and it arrived while the rest was still being made.
    assert len(frames(with_content[0][1])) <= 2
    assert with_content[0][0] < with_content[-1][0]


def test_a_client_that_does_not_read_gets_every_token_the_late_ones_written_together(daemon):
    asked = body("Tell a long story about the sea.")
    fast = post_stream(daemon.url, asked)
    with fast:
        expected = content(read_chunks(fast))
    slow = post_stream(daemon.url, asked, slow=True)
    with slow:
        # Read nothing while the answer is generated: the daemon's socket fills up.
        started = time.perf_counter()
        slow.settimeout(SLOW_CLIENT_WAIT_S)
        time.sleep(SLOW_CLIENT_SLEEP_S)
        chunks = read_chunks(slow)
    assert time.perf_counter() - started < SLOW_CLIENT_WAIT_S
    assert content(chunks) == expected
    assert max(len(frames(chunk)) for _, chunk in chunks) > 2
