"""Admission and slots for one model: a bounded queue in front of ``parallel`` slots.

A request either gets a slot, waits in a queue of at most ``max_queue``, or is refused at once
with ``QueueFullError`` (HTTP 429 + Retry-After): the queue never grows without bound, and the
number of sequences in a model's KV cache never exceeds its slots.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from mlxserve.errors import QueueFullError


class ModelQueue:
    def __init__(
        self,
        name: str,
        parallel: int,
        max_queue: int,
        on_change: Callable[[ModelQueue], None] | None = None,
    ) -> None:
        self.name = name
        self.parallel = parallel
        self.max_queue = max_queue
        self._slots = asyncio.Semaphore(parallel)
        self.waiting = 0
        self.active = 0
        self._on_change = on_change
        """Told after every change of ``waiting`` / ``active`` (the metrics' gauges), in
        ``finally`` paths too: a client that goes away while waiting or generating counts."""

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)

    @property
    def busy(self) -> bool:
        return self.active > 0 or self.waiting > 0

    def admit(self, pending: int = 0) -> None:
        """Refuse now, before any waiting, if the queue is full; ``pending`` counts requests
        admitted earlier that wait to reach the queue (behind a reload with their ``num_ctx``)."""
        queued = self.waiting + pending
        if self.active + queued >= self.parallel + self.max_queue:
            raise QueueFullError(
                f"model {self.name} is busy: {self.active} running, {queued} queued "
                f"(limit {self.max_queue}); retry shortly",
                running=self.active,
                queued=queued,
            )

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.admit()
        self.waiting += 1
        self._changed()
        try:
            await self._slots.acquire()
        except BaseException:
            self.waiting -= 1
            self._changed()
            raise
        self.waiting -= 1
        self.active += 1
        self._changed()
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()
            self._changed()
