"""One model served by a group: rank 0 decides, every other rank follows step by step.

Rank 0 runs the ordinary MLX runner (``runners/mlx/runner.py``) on a model loaded with
``mlx_lm.utils.sharded_load``; every batch change it makes (a sequence joins with its prompt
tokens, a sequence ends) is journalled, and before each ``BatchGenerator`` step the journal is
broadcast. A follower replays the same inserts and ends on its own ``BatchGenerator`` and then
steps too, so the model's collectives (``shard_linear``'s all-sums) line up on every rank. The
sampled token is rank 0's, shared inside the step (``collectives.shared_sampler``), so
sampling, seeds, grammars and stop strings need to run on rank 0 only.

A rank that dies breaks the ring: mlx usually raises "connection to a peer was lost" on rank 0
within the step. A rank that hangs blocks the step forever, so a watchdog bounds every step,
and idle heartbeats find a dead rank before a request does. Either way the requests in flight
get ``ModelUnavailableError`` (503 with ``Retry-After``), the model shows as unavailable, and
rank 0 shuts down the ring's sockets so that no collective stays pending in mlx (one that did
would block MLX for the daemon's other models). The group's engine thread is its own, never
the shared one, so the other models keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mlxserve.distributed.collectives import (
    broadcast_json,
    follower_sampler,
    gather_json,
    shared_sampler,
)
from mlxserve.distributed.group import Group
from mlxserve.errors import (
    DistributedError,
    MlxserveError,
    ModelUnavailableError,
    UnsupportedFeatureError,
)
from mlxserve.runners.base import GenerateChunk, GenerateRequest, LoadedModelInfo, RunnerOptions
from mlxserve.runners.engine import EngineThread
from mlxserve.runners.kvcache import kv_cache_type
from mlxserve.runners.loading import load_options
from mlxserve.runners.mlx.runner import MlxRunner
from modelstore.blobs import DigestCache
from modelstore.model import LocalModel
from modelstore.runtime import open_model
from modelstore.store import ModelStore

UNSTICK_WAIT_S = 5.0
"""How long a severed ring may take to fail the step that hung."""
HEARTBEAT_S = 2.0
"""How often an idle rank 0 checks that every rank still answers."""
log = logging.getLogger("mlxserve.distributed")


def refuse_solo_features(model: LocalModel, options: RunnerOptions) -> None:
    """A group runs every request in the batch every rank follows. The MLX runner runs a request
    on a draft model, or on a quantized KV cache, "solo" on mlx-lm's own generation loop in one
    process, which the other ranks would never join: refused at start, on every rank, instead of
    a step that hangs until the watchdog fails the model."""
    filled = load_options(model, options)
    if model.draft is not None:
        raise UnsupportedFeatureError(
            f"{model.name} has a draft model; a distributed group cannot run speculative decoding"
        )
    if kv_cache_type(filled.kv_cache_type).quantized:
        raise UnsupportedFeatureError(
            f"{model.name} asks for a {filled.kv_cache_type} KV cache; a distributed group runs "
            "f16 caches only",
            param="kv_cache_type",
        )


def memory_report(group: Group) -> dict[str, Any]:
    import mlx.core as mx

    return {
        "rank": group.rank,
        "host": group.host(group.rank),
        "memory_bytes": int(mx.get_active_memory()),
    }


def verify_model(
    group: Group, store: ModelStore, name: str | None, options: RunnerOptions
) -> tuple[LocalModel, RunnerOptions]:
    """Every rank resolves the model rank 0 names to rank 0's manifest digest and checks its
    blobs; any rank that cannot is named in the error every rank raises, before loading.
    Rank 0's load options win everywhere: a batch size or prompt-cache bound that differed
    between ranks would make their batches diverge."""
    wanted = None
    if group.rank == 0:
        stored = store.resolve(name or "")
        wanted = {
            "name": str(stored.name),
            "digest": stored.manifest_digest,
            "options": dataclasses.asdict(options),
        }
    wanted = broadcast_json(group.group, wanted)
    error = None
    try:
        stored = store.resolve(wanted["name"])
        if stored.manifest_digest != wanted["digest"]:
            error = (
                f"its store has {wanted['name']} as {stored.manifest_digest}, rank 0 has "
                f"{wanted['digest']}; run `mlxctl pull {wanted['name']}` there"
            )
        else:
            DigestCache(store.blobs).check(
                wanted["name"], [stored.manifest_digest, *stored.manifest.blob_digests()]
            )
    except MlxserveError as exc:
        error = exc.message
    reports = gather_json(group.group, {"host": group.host(group.rank), "error": error})
    failed = [
        f"rank {r} ({report['host']}): {report['error']}"
        for r, report in enumerate(reports)
        if report["error"]
    ]
    if failed:
        raise DistributedError(f"the group cannot serve {wanted['name']}: " + "; ".join(failed))
    return open_model(store, wanted["name"]), RunnerOptions(**wanted["options"])


class _ShardedRunner(MlxRunner):
    """The MLX runner on this rank's shard, with its own engine thread."""

    def __init__(self, group: Group, pipeline: bool) -> None:
        super().__init__(EngineThread(f"mlx-group-rank{group.rank}"))
        self.group = group
        self.pipeline = pipeline

    def _load_weights(self, folder: Path) -> tuple[Any, Any]:
        from mlx_lm.utils import sharded_load

        group = self.group.group
        if not self.pipeline:
            return sharded_load(str(folder), tensor_group=group)
        try:
            return sharded_load(str(folder), pipeline_group=group)
        except FileNotFoundError as exc:  # pipelining reads the weights' index to split files
            raise DistributedError(f"--pipeline needs a sharded checkpoint: {exc}") from None
        except ValueError as exc:  # mlx-lm: the architecture has no ``model.pipeline``
            raise DistributedError(
                f"--pipeline is not supported for this model's architecture ({exc}); "
                "serve it tensor parallel (without --pipeline)"
            ) from None

    async def run(self, function: Any) -> Any:
        """Run on this runner's engine thread (where every collective of the group runs)."""
        return await self._engine.call(function)

    async def load_group(self, model: LocalModel, options: RunnerOptions) -> LoadedModelInfo:
        """Load this rank's part; every rank's memory is then known to every rank."""
        refuse_solo_features(model, options)
        info = await self.load(model, options)
        ranks = await self.run(lambda: gather_json(self.group.group, memory_report(self.group)))
        info.memory_bytes = sum(r["memory_bytes"] for r in ranks)
        info.details["distributed"] = {
            "backend": self.group.plan.backend,
            "mode": "pipeline" if self.pipeline else "tensor",
            "ranks": ranks,
            "status": "ok",
        }
        return info


class GroupRunner(_ShardedRunner):
    """Rank 0: an MLX runner whose batch changes and steps every other rank follows."""

    def __init__(self, group: Group, pipeline: bool, step_timeout: float) -> None:
        super().__init__(group, pipeline)
        self._journal: list[dict[str, Any]] = []
        self._step_timeout = step_timeout
        self._busy_since: float | None = None
        self._failure: ModelUnavailableError | None = None
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        self._lock = threading.Lock()
        self._watchdog: threading.Thread | None = None
        self._unloaded = False

    async def load_group(self, model: LocalModel, options: RunnerOptions) -> LoadedModelInfo:
        info = await super().load_group(model, options)
        self._watchdog = threading.Thread(
            target=self._watch, name="mlx-group-watchdog", daemon=True
        )
        self._watchdog.start()
        return info

    # -- hooks on the engine thread ---------------------------------------------------------

    def _sampler(self, sampler: Any) -> Any:
        return shared_sampler(self.group.group, sampler)

    def _batch_changed(self, change: dict[str, Any]) -> None:
        self._journal.append(change)

    def _send(self, step: bool) -> None:
        """Broadcast the batch changes since the last message, and whether a step follows."""
        journal, self._journal = self._journal, []
        broadcast_json(self.group.group, {"ops": journal, "step": step})

    def _next(self) -> Any:
        def step() -> Any:
            self._send(step=True)
            return self._batch.next()

        return self._collective(step)

    def _collective(self, run: Any) -> Any:
        """Run a step that every rank must join, under the watchdog's clock."""
        if self._failure is not None:
            raise self._failure
        self._busy_since = time.monotonic()
        try:
            return run()
        except Exception as exc:
            raise self._fail(f"a rank of the group failed: {exc}") from None
        finally:
            self._busy_since = None

    def _heartbeat(self) -> None:
        if self._failure is None and not self._active:
            self._collective(lambda: self._send(step=False))

    # -- failure ------------------------------------------------------------------------------

    @property
    def stuck(self) -> bool:
        """A step that never returned: its engine thread is blocked in mlx for good."""
        return self._failure is not None and self._busy_since is not None

    @property
    def broken(self) -> bool:
        """The group failed (not merely unloaded): mlx may hold collectives pending forever
        (harmless to other models: ``platform.hold_mlx_cache``)."""
        return self._failure is not None and not self._unloaded

    def _watch(self) -> None:
        last_beat = time.monotonic()
        while self._failure is None:
            time.sleep(0.1)
            since = self._busy_since
            now = time.monotonic()
            if since is not None and now - since > self._step_timeout:
                self._fail(f"a rank of the group did not answer within {self._step_timeout:g} s")
                self._wait_unstuck()
            elif since is None and now - last_beat > HEARTBEAT_S:
                last_beat = now
                self._engine.submit(self._heartbeat)

    def _wait_unstuck(self) -> None:
        """After a hang: give the severed ring time to fail the step that hung."""
        deadline = time.monotonic() + UNSTICK_WAIT_S
        while self._busy_since is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._busy_since is not None:
            log.error("the step that hung stays pending")

    def _fail(self, reason: str) -> ModelUnavailableError:
        """Mark the model unavailable, wake every request waiting on it, and sever the ring
        (any thread). Severing fails a hung step's collective, so the group's engine thread
        is usually freed. Collectives that ``BatchGenerator`` had already dispatched for the
        next step may still stay pending in mlx; the process never waits on them, since
        ``mx.clear_cache`` is a no-op in a group's process (``platform.hold_mlx_cache``)."""
        with self._lock:
            if self._failure is None:
                self.group.sever()
                log.error("distributed model unavailable: %s", reason)
                self._failure = ModelUnavailableError(
                    f"the distributed model is unavailable: {reason}; restart the group"
                )
                group = self._info.details.get("distributed") if self._info else None
                if group is not None:
                    group.update(status="unavailable", error=reason)
                for loop, waiter in self._waiters:
                    loop.call_soon_threadsafe(_settle, waiter)
            return self._failure

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """The MLX runner's stream, cut short with 503 the moment the group fails (a hung step
        never returns, so the stream cannot wait for it)."""
        if self._failure is not None:
            raise self._failure
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()
        entry = (loop, failed)
        with self._lock:
            self._waiters.add(entry)
            if self._failure is not None:
                failed.set_result(None)
        stream = super().generate(request)
        try:
            while True:
                step = asyncio.ensure_future(anext(stream))
                await asyncio.wait({step, failed}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()
                    raise self._failure or ModelUnavailableError("the group failed")
                try:
                    chunk = step.result()
                except StopAsyncIteration:
                    return
                except MlxserveError:
                    if self._failure is not None:
                        raise self._failure from None
                    raise
                yield chunk
        finally:
            with self._lock:
                self._waiters.discard(entry)
            request.cancel.cancel()
            with contextlib.suppress(BaseException):
                await stream.aclose()

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Refused: a forward pass outside the batch would leave the followers behind."""
        raise UnsupportedFeatureError("embeddings from a distributed model are not supported")

    async def score(self, request: Any) -> Any:
        """Refused for the same reason: reranking runs forward passes outside the batch."""
        raise UnsupportedFeatureError("reranking with a distributed model is not supported")

    async def unload(self) -> None:
        """Tell the followers to stop, then release (a failed group has nobody to tell, and a
        stuck one has no engine thread left to release on)."""

        def stop() -> None:
            self._collective(lambda: broadcast_json(self.group.group, {"stop": True}))
            self._unloaded = True
            self._failure = ModelUnavailableError("the distributed model was unloaded")

        if self._failure is None:
            with contextlib.suppress(MlxserveError, TimeoutError):
                await asyncio.wait_for(self.run(stop), self._step_timeout + 1)
        if not self.stuck:
            await super().unload()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Follower(_ShardedRunner):
    """A rank > 0: no HTTP, no requests; replays rank 0's batch changes and steps with it."""

    def _sampler(self, sampler: Any) -> Any:
        return shared_sampler(self.group.group, follower_sampler)

    def follow(self) -> None:
        """Until rank 0 says stop (or the group breaks, which raises). Engine thread only."""
        finished: dict[int, tuple[Any, Any]] = {}
        while True:
            message = broadcast_json(self.group.group)
            if message.get("stop"):
                return
            for change in message["ops"]:
                self._replay(change, finished)
            finished.clear()
            if message["step"]:
                _, responses = self._batch.next()
                for response in responses:
                    if response.finish_reason is not None:
                        finished[response.uid] = (response.prompt_cache, response.all_tokens)

    def _replay(self, change: dict[str, Any], finished: dict[int, tuple[Any, Any]]) -> None:
        if change["op"] == "join":
            uid, cached = self._insert(
                change["prompt"], change["max_tokens"], self._sampler(follower_sampler), []
            )
            if (uid, cached) != (change["uid"], change["cached"]):
                raise DistributedError(
                    f"rank {self.group.rank} diverged from rank 0: sequence {uid} with {cached} "
                    f"cached tokens, rank 0 has {change['uid']} with {change['cached']}"
                )
        elif change["finished"]:
            self._remember(*finished.pop(change["uid"], (None, None)))
        else:
            cache_and_tokens = self._batch.remove([change["uid"]], return_prompt_caches=True)
            self._remember(*cache_and_tokens.get(change["uid"], (None, None)))
