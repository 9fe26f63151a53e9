"""The one thread that owns a runner's MLX state, interleaving calls with batch steps.

MLX arrays, streams and caches must not be touched from several threads at once, yet the
daemon needs to start new requests while others are mid-generation. So every MLX call (load,
a request joining the batch, embeddings) is a job on this thread's inbox, and between jobs the
thread advances the batch by one step. Idle, it blocks on the inbox and costs nothing.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class EngineThread:
    def __init__(self, name: str, step: Callable[[], bool]) -> None:
        """``step`` advances the batch once and says whether work remains."""
        self._step = step
        self._inbox: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._inbox.put((function, future))
        return future

    async def call(self, function: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.submit(function))

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                job = self._inbox.get(block=not self._busy)
            except queue.Empty:
                job = ...
            while job is not ...:
                if job is None:
                    return
                function, future = job
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(function())
                    except BaseException as exc:  # handed to the caller
                        future.set_exception(exc)
                try:
                    job = self._inbox.get_nowait()
                except queue.Empty:
                    job = ...
            self._busy = self._step()
