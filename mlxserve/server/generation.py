"""One generation as a route sees it: a slot, a stream of chunks, metrics and log fields.

Routes (native and OpenAI) differ only in how they encode chunks; everything else about
running a request lives here: admission and loading happen before any byte is sent (so a full
queue is a real 429 and a too-long prompt a real 400), the first chunk is awaited with an
optional heartbeat (SSE keep-alive comments during a long prefill), and closing the stream
(a client that went away) cancels the generation and frees the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from mlxserve.errors import InvalidRequestError
from mlxserve.inference import LoadedModel
from mlxserve.runners.base import GenerateChunk, GenerateRequest
from mlxserve.server.metrics import Metrics
from mlxserve.server.residency import ModelManager, Resident

Heartbeat = Callable[[], Awaitable[None]]


class Generation:
    def __init__(
        self,
        http_request: web.Request,
        resident: Resident,
        request: GenerateRequest,
        metrics: Metrics,
    ) -> None:
        self.http_request = http_request
        self.resident = resident
        self.request = request
        self.metrics = metrics
        self._chunks = resident.loaded.generate(request)
        self.final: GenerateChunk | None = None

    @property
    def loaded(self) -> LoadedModel:
        return self.resident.loaded

    async def first(
        self, heartbeat: Heartbeat | None = None, every_s: float = 5.0
    ) -> GenerateChunk:
        """The first chunk; raises request errors (400s) before anything was sent."""
        task = asyncio.ensure_future(anext(self._chunks))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=every_s if heartbeat else None)
                if done:
                    return self._seen(task.result())
                if heartbeat is not None:
                    await heartbeat()
        except BaseException:
            task.cancel()
            await self.close()
            raise

    async def rest(self) -> AsyncIterator[GenerateChunk]:
        async for chunk in self._chunks:
            yield self._seen(chunk)

    def _seen(self, chunk: GenerateChunk) -> GenerateChunk:
        if chunk.done:
            self.final = chunk
            self._record(chunk)
        return chunk

    def _record(self, chunk: GenerateChunk) -> None:
        stats = chunk.stats
        if stats is None:
            return
        name = self.resident.name
        self.metrics.prompt_tokens.labels(name).inc(stats.prompt_eval_count)
        self.metrics.generated_tokens.labels(name).inc(stats.eval_count)
        self.metrics.time_to_first_token.labels(name).observe(stats.time_to_first_token / 1e9)
        if stats.eval_duration > 0 and stats.eval_count > 1:
            self.metrics.tokens_per_second.labels(name).observe(
                stats.eval_count / (stats.eval_duration / 1e9)
            )
        self.http_request["log"].update(
            tokens_in=stats.prompt_eval_count,
            tokens_out=stats.eval_count,
            cached_tokens=stats.cached_prompt_tokens,
            ttft_ms=round(stats.time_to_first_token / 1e6, 1),
            done_reason=chunk.done_reason,
        )

    async def close(self) -> None:
        self.request.cancel.cancel()
        with contextlib.suppress(Exception):
            await self._chunks.aclose()


@contextlib.asynccontextmanager
async def generation(
    manager: ModelManager,
    http_request: web.Request,
    name: str,
    build: Callable[[LoadedModel], GenerateRequest],
    *,
    keep_alive: float | None,
    metrics: Metrics,
) -> AsyncIterator[Generation]:
    http_request["log"]["model"] = name
    async with manager.use(name, keep_alive=keep_alive) as resident:
        # A chat template is untrusted and may take its whole budget: render off the loop.
        request = await asyncio.to_thread(build, resident.loaded)
        running = Generation(http_request, resident, request, metrics)
        try:
            yield running
        finally:
            await running.close()


def messages_from_body(value: Any) -> list[dict[str, Any]]:
    """Chat messages, validated just enough that a template never sees garbage."""
    if not isinstance(value, list):
        raise InvalidRequestError("'messages' must be a list", param="messages")
    messages = []
    for position, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(
                f"messages[{position}] must be an object with a 'role'", param="messages"
            )
        if message.get("images"):
            raise InvalidRequestError(
                "images are not supported by the text models this server runs", param="images"
            )
        content = message.get("content")
        if isinstance(content, list):
            parts = [p.get("text", "") for p in content if isinstance(p, dict)]
            if any(isinstance(p, dict) and p.get("type") not in (None, "text") for p in content):
                raise InvalidRequestError("only text content parts are supported",
                                          param="messages")
            content = "".join(parts)
        if content is not None and not isinstance(content, str):
            raise InvalidRequestError(f"messages[{position}].content must be a string",
                                      param="messages")
        messages.append({**message, "content": content or ""})
    return messages
