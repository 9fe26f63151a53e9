"""Which models are in memory: load on demand, keep for ``keep_alive``, evict the LRU idle one.

Before a model is loaded its blobs are checked against their digests (a corrupt store is a
clear error, never garbage output); results are cached per blob and redone when the file's
size or mtime changes.

Each model runs in its own worker process (``runners/isolated.py``) unless
``isolate_runners`` is off. A worker that crashes is forgotten at once (the next request starts
a new one) and its crash counted; a model whose workers crash ``CRASH_LOOP_LIMIT`` times in a
row without serving anything is refused with the last reason until it is created again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from mlxserve.chat.model import LoadedModel
from mlxserve.errors import ModelCrashedError, ModelCrashLoopError, QueueFullError
from mlxserve.runners.base import LoadAsk, ModelRunner, RunnerOptions
from mlxserve.runners.isolated import WorkerRunner
from mlxserve.runners.kvcache import kv_cache_type
from mlxserve.runners.loading import MEMORY_HEADROOM, load_options, memory_budget, memory_needed
from mlxserve.runners.loading import context_length as check_context
from mlxserve.runners.promptcache import default_disk_bytes
from mlxserve.runners.select import make_runner
from mlxserve.server.config import Settings
from mlxserve.server.metrics import Metrics
from mlxserve.server.scheduler import ModelQueue
from modelstore.blobs import DigestCache
from modelstore.model import LocalModel
from modelstore.reference import parse_reference
from modelstore.runtime import open_model
from modelstore.store import ModelStore

REAP_INTERVAL_S = 0.25
CRASH_LOOP_LIMIT = 2
"""Crashes in a row, with nothing served in between, after which a model is refused."""
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


@dataclass
class CrashRecord:
    """The crashes in a row of one model's workers, for the manifest they ran."""

    manifest_digest: str
    count: int
    reason: str


class ModelManager:
    def __init__(self, store: ModelStore, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.residents: dict[str, Resident] = {}
        self._queues: dict[str, ModelQueue] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._pending: dict[str, int] = {}
        """Admitted requests per model not yet in its queue (waiting for a load)."""
        self._digests = DigestCache(store.blobs)
        self._reaper: asyncio.Task[None] | None = None
        self._crashes: dict[str, CrashRecord] = {}

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap())

    async def close(self) -> None:
        if self._reaper:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        # At once: each worker gets its bounded unload, so shutdown is as long as the slowest.
        await asyncio.gather(*(self._unload(name) for name in list(self.residents)))

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
        self._admit(name)
        self._pending[name] = self._pending.get(name, 0) + 1
        try:
            resident = await self.ensure_loaded(
                name, runner=runner, keep_alive=keep_alive, load=load
            )
        finally:
            self._pending[name] -= 1
        async with resident.queue.slot():
            resident.touch(keep_alive)
            try:
                yield resident
            finally:
                resident.touch(keep_alive)
        if resident.keep_alive == 0 and not resident.queue.busy:
            await self._unload(name)

    def _admit(self, name: str) -> None:
        """Every request counts against its model's queue from the moment it arrives, also
        while it waits for a load or a reload (a request with another ``num_ctx`` waits for
        the running ones to finish): otherwise a burst spread over many ``num_ctx`` values
        would pass admission and wait without bound."""
        pending = self._pending.get(name, 0)
        queue = self._queues.get(name)
        if queue is not None:
            queue.admit(pending)
        elif pending >= (self.settings.num_parallel or 1) + self.settings.max_queue:
            raise QueueFullError(
                f"model {name} is busy: {pending} requests wait for it to load; retry shortly",
                queued=pending,
            )

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
        pinned = name in self.residents and self.residents[name].pinned
        if load.context_length is not None and not pinned:
            # A num_ctx beyond the trained context or the memory is the context the runner
            # will clamp it to: asked again, it must not reload the model it already has. (A
            # pinned model, sharded over machines, is never reloaded: nothing to plan.)
            resident = self.residents.get(name)
            known = resident.loaded.model if resident is not None else None
            options, _ = await self._checked_options(name, load, known)
            load = dataclasses.replace(load, context_length=options.context_length)
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

    async def _checked_options(
        self, name: str, load: LoadAsk, known: LocalModel | None = None
    ) -> tuple[RunnerOptions, int]:
        """The load options, once the context's bounds and the memory for weights and KV cache
        are checked: before anything is evicted or unloaded for a model that cannot load. A
        requested context comes back as the runner will load it (clamped to the trained
        context and the memory budget by the same ``loading.context_length`` the runner calls
        with these options). With them, what loading the model adds to memory: its weights and
        the KV cache of that context. ``known``: the model as loaded, planned against without
        reading the store again (a request's ``num_ctx`` for a model already loaded)."""
        options = RunnerOptions(
            context_length=load.context_length,
            kv_cache_type=load.kv_cache_type,
            max_parallel=self.settings.num_parallel,
            prompt_cache_bytes=self.settings.prompt_cache_bytes,
            memory_budget_bytes=self.settings.memory_budget_bytes,
            **self._disk_tier(),
        )
        local = known or await asyncio.to_thread(open_model, self.store, name)
        filled = load_options(local, options)
        context = check_context(local, filled)
        if options.context_length is not None:
            options.context_length = context
        cache = kv_cache_type(filled.kv_cache_type)
        return options, memory_needed(local, context, filled.max_parallel or 1, cache)

    def _held_bytes(self) -> int:
        """What the loaded models hold: weights, KV caches, and their prompt caches' RAM
        tiers (``promptcache.py``), which grow after load."""
        held = 0
        for resident in self.residents.values():
            held += resident.loaded.info.memory_bytes
            with contextlib.suppress(Exception):  # a worker that just died holds nothing
                details = resident.loaded.runner.describe().details
                held += int(details.get("prompt_cache_ram_bytes") or 0)
        return held

    async def _make_room(self, name: str, needed: int, available: int) -> None:
        """Memory admission over every loaded model: when what they hold and ``needed`` pass
        the machine's budget, their prompt caches' RAM tiers go first (on disk, if on, their
        entries stay), then idle models, least recently used first; when busy models alone
        hold too much, the load waits for another try (a 503 to retry). ``available`` is the
        memory budget (``loading.memory_budget``)."""
        budget = available / MEMORY_HEADROOM
        if not budget or await asyncio.to_thread(self._held_bytes) + needed <= budget:
            return
        for resident in list(self.residents.values()):
            release = getattr(resident.loaded.runner, "release_prompt_cache", None)
            if release is not None:
                with contextlib.suppress(Exception):  # a runner without a prompt cache
                    freed = await asyncio.to_thread(release)
                    log.info(
                        "freed %d bytes of %s's prompt cache for %s", freed, resident.name, name
                    )
        while await asyncio.to_thread(self._held_bytes) + needed > budget:
            idle = [r for r in self.residents.values() if not r.queue.busy and not r.pinned]
            if not idle:
                raise QueueFullError(
                    f"not enough memory for {name} beside the busy models; retry shortly"
                )
            victim = min(idle, key=lambda r: r.last_used)
            log.info("evicting %s to make room for %s", victim.name, name)
            await self._unload(victim.name)

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
        options, needed = await self._checked_options(name, load)
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
        await self._make_room(name, needed, memory_budget(options))
        self._refuse_crash_loop(name, model.manifest_digest)
        loaded = await LoadedModel.load(
            self.store, name, runner, options, make=self._runner_maker(name, model.manifest_digest)
        )
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

    def _runner_maker(self, name: str, digest: str) -> Callable[[str], ModelRunner]:
        if not self.settings.isolate_runners:
            return make_runner

        def make(runner: str) -> ModelRunner:
            return WorkerRunner(
                runner,
                stall_timeout_s=self.settings.runner_stall_timeout_s,
                load_timeout_s=self.settings.runner_load_timeout_s,
                memory_limit_bytes=self.settings.runner_memory_limit_bytes,
                on_exit=lambda worker, error: self._worker_crashed(name, digest, worker, error),
            )

        return make

    def _worker_crashed(
        self, name: str, digest: str, worker: WorkerRunner, error: ModelCrashedError
    ) -> None:
        """Forget the model now (its requests already have their error; the next one starts a
        new worker) and count the crash."""
        resident = self.residents.get(name)
        if resident is not None and resident.loaded.runner is worker:
            del self.residents[name]
            self.metrics.loaded_models.set(len(self.residents))
            self.metrics.model_memory.remove(name)
            self.metrics.slots.remove(name)
        record = self._crashes.get(name)
        if record is None or record.manifest_digest != digest or worker.served:
            record = self._crashes[name] = CrashRecord(digest, 0, "")
        record.count += 1
        record.reason = str(error.details.get("reason") or error.message)

    def _refuse_crash_loop(self, name: str, digest: str) -> None:
        record = self._crashes.get(name)
        if record and record.manifest_digest == digest and record.count >= CRASH_LOOP_LIMIT:
            raise ModelCrashLoopError(
                f"{name} crashed {record.count} times in a row without serving a request (last: "
                f"{record.reason}); it is refused until it is created again",
                model=name,
                reason=record.reason,
            )

    def forget_crashes(self, name: str) -> None:
        """The model was created again: its workers get a fresh start."""
        self._crashes.pop(self.canonical(name), None)

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
