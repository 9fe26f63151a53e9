"""Admission and slots for one model: a bounded queue in front of ``parallel`` slots, and the
one function every chat goes through to get a slot, run and be accounted (``serve_chat``).

A request either gets a slot, waits in a queue of at most ``max_queue``, or is refused at once
with ``QueueFullError`` (HTTP 429 + Retry-After): the queue never grows without bound, and the
number of sequences in a model's KV cache never exceeds its slots.

The daemon's routes lease from residency (``residency.ModelManager``); ``mlxctl run`` in its
own process leases the one model it loaded (``HeldModel``), through the same queue, the same
``serve_chat`` and its own accounting. This module imports no aiohttp (``.importlinter``), so
the command line may use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from mlxserve.chat.core import ChatRun, run_chat
from mlxserve.chat.events import Done
from mlxserve.chat.model import LoadedModel
from mlxserve.chat.types import ChatRequest
from mlxserve.errors import QueueFullError
from mlxserve.runners.base import LoadAsk

Account = Callable[[str, Done], None]
"""Told once per finished generation, with the leased model's name (metrics and access log in
the daemon, the ``--verbose`` table in ``mlxctl run``)."""


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


class Lease(Protocol):
    """A loaded model held for one request (``residency.Resident``, ``HeldModel``)."""

    name: str
    loaded: LoadedModel


class Leases(Protocol):
    """Where a request's model comes from: ``use`` admits, loads if needed, and holds a slot
    for the ``with`` body."""

    def use(
        self, name: str, *, keep_alive: float | None = None, load: LoadAsk | None = None
    ) -> AbstractAsyncContextManager[Lease]: ...


class HeldModel:
    """One model loaded outside residency (``mlxctl run`` in its own process), leased through
    the same queue as the daemon's models. It is the only model it serves: ``use`` ignores the
    name, keep-alive and load options, which residency alone acts on."""

    def __init__(self, loaded: LoadedModel, max_queue: int = 0) -> None:
        self.name = str(loaded.model.name)
        self.loaded = loaded
        self.queue = ModelQueue(self.name, loaded.runner.max_parallel, max_queue)

    @contextlib.asynccontextmanager
    async def use(
        self, name: str, *, keep_alive: float | None = None, load: LoadAsk | None = None
    ) -> AsyncIterator[HeldModel]:
        async with self.queue.slot():
            yield self


@contextlib.asynccontextmanager
async def serve_chat(
    leases: Leases, chat: ChatRequest, account: Account, *, load_ns: int | None = None
) -> AsyncIterator[ChatRun]:
    """Admit ``chat``, lease its model, run it through the chat core, and account for it once
    it is done; the run is closed (cancelled if unfinished) and the slot freed when the ``with``
    body leaves. Admission and loading happen before any byte is sent, so a full queue is a
    real 429 and a bad request a real 400.

    ``load_ns`` is the request's load duration when its model was loaded before it was asked
    (``mlxctl run`` loads first, as ``ollama run`` does); else it is how long the request waited
    for its lease (Ollama's ``load_duration``)."""
    asked = time.perf_counter_ns()
    async with leases.use(chat.model, keep_alive=chat.keep_alive, load=chat.load) as lease:
        ready = max(1, time.perf_counter_ns() - asked) if load_ns is None else load_ns
        async with run_chat(lease.loaded, chat, load_ns=ready) as run:
            try:
                yield run
            finally:
                if run.done is not None:
                    account(lease.name, run.done)
