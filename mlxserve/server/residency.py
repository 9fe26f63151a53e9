"""Which models are in memory: load on demand, keep for ``keep_alive``, evict the LRU idle one.

Before a model is loaded its blobs are checked against their digests (a corrupt store is a
clear error, never garbage output); results are cached per blob and redone when the file's
size or mtime changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxserve.errors import QueueFullError
from mlxserve.inference import LoadedModel
from mlxserve.runners.base import LoadAsk, RunnerOptions
from mlxserve.runners.loading import clamped_context, load_options
from mlxserve.runners.loading import context_length as check_context
from mlxserve.runners.promptcache import default_disk_bytes
from mlxserve.server.config import Settings
from mlxserve.server.metrics import Metrics
from mlxserve.server.scheduler import ModelQueue
from modelstore.errors import CorruptStoreError
from modelstore.reference import parse_reference
from modelstore.runtime import open_model
from modelstore.store import ModelStore

REAP_INTERVAL_S = 0.25
log = logging.getLogger("mlxserve.residency")


@dataclass
class Resident:
    name: str
    loaded: LoadedModel
    queue: ModelQueue
    keep_alive: float
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None
    pinned: bool = False
    """Loaded at start-up for the daemon's lifetime (a distributed group's model): never
    evicted, never unloaded by ``keep_alive``."""

    def touch(self, keep_alive: float | None) -> None:
        if keep_alive is not None and not self.pinned:
            self.keep_alive = keep_alive
        self.last_used = time.monotonic()
        self.expires_at = None if self.keep_alive < 0 else self.last_used + self.keep_alive


class DigestCache:
    """Blob path -> (size, mtime) at which it last hashed right."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self._verified: dict[Path, tuple[int, int]] = {}

    def check(self, name: str, digests: list[str]) -> None:
        for digest in digests:
            path = self.store.blobs.path(digest)
            try:
                stat = path.stat()
            except FileNotFoundError:
                raise CorruptStoreError(
                    f"model {name}: blob {digest} is missing; run `mlxctl verify`", digest=digest
                ) from None
            key = (stat.st_size, stat.st_mtime_ns)
            if self._verified.get(path) == key:
                continue
            if not self.store.blobs.verify(digest):
                raise CorruptStoreError(
                    f"model {name}: blob {digest} does not match its digest; the store is "
                    "corrupt (run `mlxctl verify`, then re-import or pull the model)",
                    digest=digest,
                )
            self._verified[path] = key


class ModelManager:
    def __init__(self, store: ModelStore, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.residents: dict[str, Resident] = {}
        self._queues: dict[str, ModelQueue] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._digests = DigestCache(store)
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap())

    async def close(self) -> None:
        if self._reaper:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for name in list(self.residents):
            await self._unload(name)

    @staticmethod
    def canonical(name: str) -> str:
        return str(parse_reference(name))

    def _queue(self, name: str, parallel: int) -> ModelQueue:
        queue = self._queues.get(name)
        if queue is None or (queue.parallel != parallel and not queue.busy):
            queue = ModelQueue(name, parallel, self.settings.max_queue, self._gauges)
            self._queues[name] = queue
        return queue

    def _gauges(self, queue: ModelQueue) -> None:
        self.metrics.queue_depth.labels(queue.name).set(queue.waiting)
        self.metrics.active.labels(queue.name).set(queue.active)

    def pin(self, loaded: LoadedModel) -> None:
        """Serve a model loaded outside the manager (a distributed group's, started with the
        daemon) until the daemon stops."""
        name = self.canonical(str(loaded.model.name))
        queue = self._queue(name, loaded.runner.max_parallel)
        self.residents[name] = Resident(name, loaded, queue, keep_alive=-1, pinned=True)
        self.residents[name].touch(None)
        self.metrics.loaded_models.set(len(self.residents))
        self.metrics.model_memory.labels(name).set(loaded.info.memory_bytes)

    @contextlib.asynccontextmanager
    async def use(
        self,
        name: str,
        *,
        runner: str | None = None,
        keep_alive: float | None = None,
        load: LoadAsk | None = None,
    ) -> AsyncIterator[Resident]:
        """A loaded model with a slot held for the ``with`` body; ``load`` (a request's
        ``num_ctx`` and ``kv_cache_type``) reloads it so when it was loaded otherwise."""
        name = self.canonical(name)
        waiting = self._queues.get(name)
        if waiting is not None:
            waiting.admit()
        resident = await self.ensure_loaded(name, runner=runner, keep_alive=keep_alive, load=load)
        async with resident.queue.slot():
            resident.touch(keep_alive)
            try:
                yield resident
            finally:
                resident.touch(keep_alive)
        if resident.keep_alive == 0 and not resident.queue.busy:
            await self._unload(name)

    async def ensure_loaded(
        self,
        name: str,
        *,
        runner: str | None = None,
        keep_alive: float | None = None,
        load: LoadAsk | None = None,
    ) -> Resident:
        name = self.canonical(name)
        load = load or LoadAsk()
        if load.context_length is not None:
            # A num_ctx beyond the trained context is the trained context: asked again, it
            # must not reload the model it already has.
            local = await asyncio.to_thread(open_model, self.store, name)
            load = dataclasses.replace(
                load, context_length=clamped_context(local, load.context_length)
            )
        lock = self._load_locks.setdefault(name, asyncio.Lock())
        async with lock:
            resident = self.residents.get(name)
            if resident is not None and resident.pinned:
                return resident
            if resident is not None and runner not in (None, resident.loaded.info.runner):
                if resident.queue.busy:
                    raise QueueFullError(f"{name} is busy on another runner; retry shortly")
                await self._unload(name)
                resident = None
            if resident is not None and load.unmet(resident.loaded.info):
                # As Ollama: the model is reloaded as asked once its running requests finish
                # (new ones wait on this lock meanwhile).
                await self._checked_options(name, load)  # a refusal keeps it loaded
                while resident.queue.busy:
                    await asyncio.sleep(REAP_INTERVAL_S)
                log.info("reloading %s as asked: %s", name, load)
                runner = runner or resident.loaded.info.runner
                await self._unload(name)
                resident = None
            if resident is None:
                resident = await self._load(name, runner, keep_alive, load)
            resident.touch(keep_alive)
            return resident

    async def _checked_options(self, name: str, load: LoadAsk) -> RunnerOptions:
        """The load options, once the context's bounds and the memory for weights and KV cache
        are checked: before anything is evicted or unloaded for a model that cannot load (the
        runner checks again with its own slot count)."""
        options = RunnerOptions(
            context_length=load.context_length,
            kv_cache_type=load.kv_cache_type,
            max_parallel=self.settings.num_parallel,
            prompt_cache_bytes=self.settings.prompt_cache_bytes,
            **self._disk_tier(),
        )
        local = await asyncio.to_thread(open_model, self.store, name)
        check_context(local, load_options(local, options), options.max_parallel or 1)
        return options

    def _disk_tier(self) -> dict[str, Any]:
        """Where and how much of the disk the runners' prompt caches may use."""
        budget = self.settings.prompt_cache_disk_bytes
        root = self.store.prompt_cache_dir
        if budget is None:
            budget = default_disk_bytes(root)
        if budget <= 0:
            return {}
        return {"prompt_cache_dir": str(root), "prompt_cache_disk_bytes": budget}

    async def _load(
        self, name: str, runner: str | None, keep_alive: float | None, load: LoadAsk
    ) -> Resident:
        model = self.store.resolve(name)
        options = await self._checked_options(name, load)
        await asyncio.to_thread(
            self._digests.check, name, [model.manifest_digest, *model.manifest.blob_digests()]
        )
        while sum(not r.pinned for r in self.residents.values()) >= self.settings.max_loaded_models:
            idle = [r for r in self.residents.values() if not r.queue.busy and not r.pinned]
            if not idle:
                raise QueueFullError(
                    f"{len(self.residents)} models are loaded and busy "
                    f"(max_loaded_models={self.settings.max_loaded_models}); retry shortly"
                )
            victim = min(idle, key=lambda r: r.last_used)
            log.info("evicting %s (least recently used)", victim.name)
            await self._unload(victim.name)
        loaded = await LoadedModel.load(self.store, name, runner, options)
        parallel = min(
            self.settings.num_parallel or loaded.runner.max_parallel, loaded.runner.max_parallel
        )
        resident = Resident(
            name,
            loaded,
            self._queue(name, parallel),
            self.settings.keep_alive if keep_alive is None else keep_alive,
        )
        self.residents[name] = resident
        self.metrics.loaded_models.set(len(self.residents))
        self.metrics.model_memory.labels(name).set(loaded.info.memory_bytes)
        self.metrics.slots.labels(name).set(parallel)
        return resident

    async def unload(self, name: str) -> bool:
        """``keep_alive: 0``: unload now if idle, else as soon as its requests finish."""
        name = self.canonical(name)
        resident = self.residents.get(name)
        if resident is None or resident.pinned:
            return False
        resident.keep_alive = 0
        resident.expires_at = time.monotonic()
        if not resident.queue.busy:
            await self._unload(name)
        return True

    async def _unload(self, name: str) -> None:
        resident = self.residents.pop(name, None)
        if resident is None:
            return
        await resident.loaded.unload()
        self.metrics.loaded_models.set(len(self.residents))
        self.metrics.model_memory.remove(name)
        self.metrics.slots.remove(name)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            now = time.monotonic()
            for name, resident in list(self.residents.items()):
                expired = resident.expires_at is not None and now >= resident.expires_at
                if expired and not resident.queue.busy:
                    log.info("keep_alive expired for %s", name)
                    await self._unload(name)
