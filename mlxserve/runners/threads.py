"""Run a runner's blocking generation loop on its own thread and stream into asyncio.

MLX and llama.cpp calls block and are not safe to interleave from several threads, so each
runner owns one worker thread; chunks cross back to the event loop through a queue. Closing
the async iterator (a client that went away) sets the request's cancel token, which the
worker polls every token, so the slot is freed within one token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from mlxserve.runners.base import CancelToken

T = TypeVar("T")
END = object()
"""Put on a queue after a producer's last item."""


async def drain(queue: asyncio.Queue[object]) -> AsyncIterator[Any]:
    """The items a producer thread puts on ``queue`` up to ``END``; an exception it puts there
    is raised here, in the consumer."""
    while True:
        item = await queue.get()
        if item is END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


class WorkerThread:
    """One thread that runs every library call of a runner, in order."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def stream(
        self, produce: Callable[[], Iterator[T]], cancel: CancelToken
    ) -> AsyncIterator[T]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def pump() -> None:
            try:
                for item in produce():
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as exc:  # handed to the consumer, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, END)

        future = loop.run_in_executor(self._executor, pump)
        try:
            async for item in drain(queue):
                yield item
        finally:
            cancel.cancel()
            with contextlib.suppress(Exception):
                await asyncio.shield(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
