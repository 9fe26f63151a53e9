"""A runner in its own process: ``WorkerRunner`` implements ``ModelRunner`` by talking to a
worker (``worker.py``) that runs the real runner.

The daemon builds one per loaded model (``mlxserve/server/residency.py``), so a library that
aborts, hangs or runs out of memory takes down one worker, never the daemon: the requests that
worker was serving end with ``ModelCrashedError`` (``model_crashed``) and ``on_exit`` tells the
residency manager, which forgets the model (the next request starts a new worker) and counts the
crash. The worker is killed when it owes an answer and sends nothing for ``stall_timeout_s``
(a hung library: a deadlock, two threads asserting at once; a prefill sends progress frames
between its chunks, so the deadline measures silence, not a long prompt), when its load
takes longer than ``load_timeout_s``, or when its resident memory passes
``memory_limit_bytes``. Weights are loaded by the worker only: the daemon never maps them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from typing import Any

from mlxserve import platform
from mlxserve.errors import ModelCrashedError, UnsupportedFeatureError
from mlxserve.runners.base import (
    EmbedRequest,
    EmbedResult,
    GenerateChunk,
    GenerateRequest,
    LoadedModelInfo,
    RunnerOptions,
)
from mlxserve.runners.worker import LOG_LEVEL_ENV, FrameProtocol, frame, unpack_error
from modelstore.model import LocalModel

DEFAULT_STALL_TIMEOUT_S = 300.0
DEFAULT_LOAD_TIMEOUT_S = 600.0
WATCH_INTERVAL_S = 0.25
UNLOAD_TIMEOUT_S = 10.0
"""An unload that takes longer (a hung library) ends with the worker killed."""
EXIT_WAIT_S = 2.0
"""How long a worker that closed its socket gets to exit before it is killed."""

SERVING_KINDS = frozenset({"generate", "embed", "rerank", "score"})
"""Requests that, ended well, show the model serves (so a later crash starts a new count)."""
log = logging.getLogger("mlxserve.residency")


@dataclasses.dataclass
class _End:
    error: Exception | None


@dataclasses.dataclass
class _Pending:
    kind: str
    items: asyncio.Queue[Any] = dataclasses.field(default_factory=asyncio.Queue)


class WorkerRunner:
    """The ``name`` runner, run in a worker process the proxy starts at ``load``."""

    def __init__(
        self,
        name: str,
        *,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
        memory_limit_bytes: int = 0,
        on_exit: Callable[[WorkerRunner, ModelCrashedError], None] | None = None,
    ) -> None:
        self.name = name
        self.stall_timeout_s = stall_timeout_s
        self.load_timeout_s = load_timeout_s
        self.memory_limit_bytes = memory_limit_bytes
        self.on_exit = on_exit
        self.served = 0
        """Generations and embeddings that ended well: a crash after some is not a crash loop."""
        self.failure: ModelCrashedError | None = None
        self._model = "the model"
        self._process: subprocess.Popen[bytes] | None = None
        self._transport: asyncio.Transport | None = None
        self._sync: Connection | None = None
        self._sync_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count()
        self._progress = time.monotonic()
        self._kill_reason: str | None = None
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._statics: dict[str, Any] = {}

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def max_parallel(self) -> int:
        return int(self._statics.get("max_parallel", 1))

    @property
    def chat_template(self) -> str | None:
        return self._statics.get("chat_template")

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._statics.get("special_tokens") or {})

    @property
    def image_marker(self) -> str | None:
        return self._statics.get("image_marker")

    async def load(self, model: LocalModel, options: RunnerOptions) -> LoadedModelInfo:
        self._model = model.name
        control, control_child = socket.socketpair()
        sync, sync_child = socket.socketpair()
        level = logging.getLevelName(logging.getLogger("mlxserve").getEffectiveLevel())
        fds = (control_child.fileno(), sync_child.fileno())
        self._process = subprocess.Popen(
            [sys.executable, "-m", "mlxserve.runners.worker", *map(str, fds)],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            env=platform.worker_environment({**os.environ, LOG_LEVEL_ENV: str(level)}),
        )
        control_child.close()
        sync_child.close()
        log.info("started worker %d for %s (%s runner)", self._process.pid, model.name, self.name)
        self._transport, _ = await asyncio.get_running_loop().create_connection(
            lambda: FrameProtocol(self._frames, self._closed), sock=control
        )
        self._sync = Connection(sync.detach())
        self._tasks = [asyncio.create_task(self._watch())]
        try:
            self._statics = await self._call("load", self.name, model, options)
        except BaseException:
            await self.unload()
            raise
        return self._statics["info"]

    async def unload(self) -> None:
        if self._process is None:
            return
        self._stopping = True
        if self.failure is None and self._process.poll() is None:
            try:
                await asyncio.wait_for(self._call("unload"), UNLOAD_TIMEOUT_S)
            except TimeoutError:
                log.warning("worker %d did not unload %s in time", self.pid, self._model)
            except Exception:
                log.exception("worker %d failed to unload %s", self.pid, self._model)
        await self._reap()
        for task in self._tasks:
            task.cancel()
        if self._transport is not None:
            self._transport.close()
        if self._sync is not None:
            self._sync.close()

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        return self._generate(request)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        if request.logits_processors:
            raise UnsupportedFeatureError(
                "logits processors (Python callables) cannot reach a runner in its own process",
                param="logits_processors",
            )
        plain = dataclasses.replace(request, cancel=None, logits_processors=[], progress=None)
        async for chunk in self._exchange("generate", plain, cancel=request.cancel):
            yield chunk

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        return await self._call("embed", request)

    async def rerank(self, request: Any) -> Any:
        """For the embedding runners that score pairs (``routes_rerank.py``)."""
        return await self._call("rerank", request)

    async def score(self, request: Any) -> Any:
        """For the chat runners, whose models may be causal rerankers (``chat/rerank.py``)."""
        return await self._call("score", request)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._sync_call("tokenize", text, add_special_tokens)

    def detokenize(self, token_ids: list[int]) -> str:
        return self._sync_call("detokenize", token_ids)

    def describe(self) -> LoadedModelInfo:
        return self._sync_call("describe")

    def release_prompt_cache(self) -> int:
        """The runner's RAM tier of prompts, freed (``residency.py``'s memory admission)."""
        return self._sync_call("release_prompt_cache")

    def kill(self, reason: str) -> None:
        """Kill the worker now; its requests end with ``reason`` in their crash error."""
        if self._kill_reason is None and self._process is not None and self._process.poll() is None:
            log.error("killing worker %d of %s: %s", self._process.pid, self._model, reason)
            self._kill_reason = reason
            self._process.kill()

    async def _call(self, kind: str, *args: Any) -> Any:
        result = None
        async for item in self._exchange(kind, *args):
            result = item
        return result

    async def _exchange(self, kind: str, *args: Any, cancel: Any = None) -> AsyncIterator[Any]:
        """Send one request; yield what comes back for it until its end."""
        if self.failure is not None:
            raise self.failure
        ident = next(self._ids)
        pending = _Pending(kind)
        if not self._pending:
            self._progress = time.monotonic()  # the stall clock runs while something is owed
        self._pending[ident] = pending
        self._send((kind, ident, *args))
        ended = cancelled = False
        try:
            while True:
                item = await pending.items.get()
                if isinstance(item, _End):
                    ended = True
                    if item.error is not None:
                        raise item.error
                    return
                yield item
                if cancel is not None and cancel.cancelled and not cancelled:
                    cancelled = True
                    self._send(("cancel", ident))
        finally:
            if not ended and not cancelled:
                self._send(("cancel", ident))

    def _send(self, message: Any) -> None:
        transport = self._transport
        if transport is not None and self.failure is None and not transport.is_closing():
            transport.write(frame(message))

    def _frames(self, messages: list[tuple[str, int, Any]]) -> None:
        self._progress = time.monotonic()
        for kind, ident, value in messages:
            self._receive(kind, ident, value)

    def _closed(self) -> None:
        """The worker's socket closed: see ``_exited``."""
        self._tasks.append(asyncio.create_task(self._exited()))

    def _receive(self, kind: str, ident: int, value: Any) -> None:
        if kind == "progress":  # a prefill went on: the worker is alive
            return
        if kind == "item":
            if ident in self._pending:
                self._pending[ident].items.put_nowait(value)
            return
        pending = self._pending.pop(ident, None)
        if pending is None:
            return
        if value is None and pending.kind in SERVING_KINDS:
            self.served += 1
        pending.items.put_nowait(_End(unpack_error(value) if value else None))

    async def _exited(self) -> None:
        """The worker closed its socket: an unload's end, or a crash to report."""
        code = await self._reap()
        if self._stopping and self._kill_reason is None:
            return
        if self._kill_reason is not None:
            why = self._kill_reason
        elif code is not None and code < 0:
            why = f"its process was killed by {signal.Signals(-code).name}"
        else:
            why = f"its process exited with status {code}"
        self.failure = ModelCrashedError(
            f"{self._model} crashed ({self.name} runner): {why}", model=self._model, reason=why
        )
        log.error("%s", self.failure.message)
        for pending in self._pending.values():
            pending.items.put_nowait(_End(self.failure))
        self._pending.clear()
        if self.on_exit is not None and not self._stopping:
            self.on_exit(self, self.failure)

    async def _reap(self) -> int | None:
        """Wait (without a thread) for the worker to exit; kill it if it lingers."""
        process = self._process
        if process is None:
            return None
        deadline = time.monotonic() + EXIT_WAIT_S
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if process.poll() is None:
            process.kill()
            while process.poll() is None:
                await asyncio.sleep(0.02)
        return process.returncode

    async def _watch(self) -> None:
        while self._process is not None and self._process.poll() is None:
            await asyncio.sleep(WATCH_INTERVAL_S)
            loading = any(pending.kind == "load" for pending in self._pending.values())
            deadline = self.load_timeout_s if loading else self.stall_timeout_s
            if self._pending and time.monotonic() - self._progress > deadline:
                self.kill(
                    f"it did not load in {deadline:g} s"
                    if loading
                    else f"it made no progress for {deadline:g} s"
                )
            if self.memory_limit_bytes and self.pid is not None:
                used = platform.process_memory_bytes(self.pid)
                if used is not None and used > self.memory_limit_bytes:
                    self.kill(f"it used {used} bytes of memory, over its limit")

    def _sync_call(self, method: str, *args: Any) -> Any:
        """A call the daemon makes without awaiting (tokenize before a generation), answered
        by the worker's sync thread; a worker that does not answer in time is killed."""
        if self.failure is not None:
            raise self.failure
        assert self._sync is not None, "the runner is not loaded"
        with self._sync_lock:
            try:
                self._sync.send((method, args))
                if not self._sync.poll(self.stall_timeout_s):
                    self.kill(f"no answer to {method} in {self.stall_timeout_s:g} s")
                    raise ModelCrashedError(
                        f"{self._model} crashed ({self.name} runner): no answer to {method}",
                        model=self._model,
                    )
                status, value = self._sync.recv()
            except (EOFError, OSError):
                raise ModelCrashedError(
                    f"{self._model} crashed ({self.name} runner): its process is gone",
                    model=self._model,
                ) from None
        if status == "error":
            raise unpack_error(value)
        return value
