"""A thread that owns a runner's library state, interleaving calls with batch steps.

One is shared by every MLX model in the process (``shared_engine``); each llama.cpp model has
its own (``llamacpp/runner.py``, ``llamacpp/embed.py``), closed when the model is unloaded.
``stream`` is the one bridge from a job's output back to the event loop: the job emits chunks,
the caller iterates them; closing the iterator (a client that went away) sets the request's
cancel token, which the engine's steps poll every token. What the thread emits during a job, or
during one batch's step, is handed to each event loop in one call when that job or step ends:
a step over eight sequences wakes the loop once, not eight times; a stream whose consumer set a
``Direct`` (a worker process's generations) has its chunks written by the thread instead.

MLX arrays, streams and caches must not be touched from several threads at once, yet the
daemon needs to start new requests while others are mid-generation. So every MLX call (load,
a request joining a batch, embeddings) is a job on this thread's inbox, and between jobs the
thread advances every registered batch by one step. Idle, it blocks on the inbox.

The thread lives as long as the process: a thread that ran MLX must never exit, because
MLX's thread-local compile cache calls back into Python from the thread's exit handlers, which
aborts the process if the interpreter is shutting down (seen as "terminate called without an
active exception" at exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from mlxserve.errors import ModelNotLoadedError
from mlxserve.runners.base import CancelToken

T = TypeVar("T")
END = object()
"""Emitted after a stream's last chunk."""
Emit = Callable[[object], None]
"""Hands a chunk, an exception (raised in the consumer) or ``END`` to a stream's consumer; safe
to call from any thread."""
Delivery = tuple[Callable[[Any], None], object]
"""A stream's queue's ``put_nowait`` and the item for it."""
_CLOSE: Any = object()
"""Put on the inbox by ``close``: the thread ends after the jobs before it."""


@dataclasses.dataclass(frozen=True)
class Direct:
    """Where a stream's chunks go from the engine thread itself, bypassing the event loop:
    ``tag`` makes each chunk a message and ``write`` sends a step's messages at once (thread
    safe). A runner's worker process sets one per generation (``worker.py``), so a token
    crosses to the daemon without waking the worker's loop: that wakeup, and the loop taking
    the interpreter lock from the engine thread between two decodes, cost ~0.2 ms of CPU per
    token (docs/PERFORMANCE.md, issue 21)."""

    write: Callable[[list[Any]], None]
    tag: Callable[[object], Any]


DIRECT: contextvars.ContextVar[Direct | None] = contextvars.ContextVar("direct", default=None)
"""Set in the task that iterates ``EngineThread.stream``: its chunks go to the ``Direct``, and
the iterator yields none, only ends (or raises). A runner's ``generate`` passes the stream's
chunks on unchanged, so the caller receives the same chunks either way."""
GATHER_S = 0.025
"""How long the next step may wait, at most, for requests a joining one said were on their
way (``arrived``). A burst of clients reaches the engine spread over a few milliseconds (8-17 ms
for eight on this project's 2-core machines, each request rendered, tokenized and looked up in
the prompt cache first): without the wait, the first one's prefill starts alone and the others
wait that whole step before their own prefill, while the first one's stream stalls for theirs.
Measured with ``bench.load --isolation`` and ``bench.ceiling --phases peers`` (docs/
PERFORMANCE.md, issue 26): on MLX with oneMKL, the median time to first token of eight clients
0.65 -> 0.53 s and of four 0.56 -> 0.45 s, tokens/s +3-11 %; on llama.cpp, the streams already
started no longer stall (their decode window's share 0.66 -> 0.90 at four clients), time to first
token the same. A lone request waits for nothing."""


class EngineThread:
    def __init__(self, name: str) -> None:
        self._steppers: list[Callable[[], bool]] = []
        self._inbox: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._busy = False
        self._closed = False
        self._lock = threading.Lock()
        self._burst = (0, 0)
        """The burst being gathered (``arrived``): how many of it joined, and its size."""
        self._gather_until = 0.0
        self._held: dict[asyncio.AbstractEventLoop, list[Delivery]] = {}
        """What the jobs or the step running now emitted, per event loop (``_hand_over``)."""
        self._direct: dict[Callable[[list[Any]], None], list[Any]] = {}
        """The chunks of streams with a ``Direct``, per writer, for the same hand-over (the
        worker's streams share one writer: its bound ``write``s are equal keys)."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                future.set_exception(ModelNotLoadedError("the model was unloaded"))
            else:
                self._inbox.put((function, future))
        return future

    async def call(self, function: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.submit(function))

    async def stream(
        self, start: Callable[[Emit], object], cancel: CancelToken
    ) -> AsyncIterator[Any]:
        """Run ``start(emit)`` on this thread and yield what it (or the steps it registers)
        emits, up to ``END``; an exception emitted, or raised by ``start``, or a job refused
        because the model was unloaded meanwhile, is raised here. Closing the iterator cancels:
        a runner's ``generate`` holds it in ``contextlib.aclosing``, so that closing the
        runner's stream closes this one at once rather than when it is collected."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[object] = asyncio.Queue()
        direct = DIRECT.get()

        def emit(item: object) -> None:
            if direct is not None and item is not END and not isinstance(item, BaseException):
                if threading.current_thread() is self._thread:
                    self._direct.setdefault(direct.write, []).append(direct.tag(item))
                else:
                    direct.write([direct.tag(item)])
            elif threading.current_thread() is self._thread:
                self._held.setdefault(loop, []).append((chunks.put_nowait, item))
            else:
                loop.call_soon_threadsafe(chunks.put_nowait, item)

        def report(started: Future[object]) -> None:
            if started.exception() is not None:
                emit(started.exception())

        self.submit(lambda: start(emit)).add_done_callback(report)
        try:
            while True:
                item = await chunks.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.cancel()

    def close(self) -> None:
        """End the thread once the jobs submitted before this call have run. Only for
        threads that never ran MLX (the llama.cpp runner's): see the module docstring. A job
        submitted later fails with ``ModelNotLoadedError`` instead of waiting forever."""
        with self._lock:
            self._closed = True
            self._inbox.put(_CLOSE)

    def arrived(self, others: int) -> None:
        """Call from a job that adds a request to a batch, with how many other requests for
        the same model were on their way when it was sent (``GenerateRequest.arriving``): the
        next step waits for them, up to ``GATHER_S`` after the first of a burst, so that they
        are prefilled together. A lone request (``others`` 0) waits for nothing."""
        joined, size = self._burst
        if size == 0 and others == 0:
            return
        if size == 0:
            self._gather_until = time.monotonic() + GATHER_S
        # The first of a burst to be rendered counts all the others, the last none; they join
        # in whatever order their work before the join ends (a prompt-cache lookup in a
        # thread), so the burst's size is one more than the most any of them counted.
        self._burst = (joined + 1, max(size, 1 + others))

    def register(self, step: Callable[[], bool]) -> None:
        """Call from a job. ``step`` advances one batch once and says whether work is left."""
        self._steppers.append(step)

    def unregister(self, step: Callable[[], bool]) -> None:
        """Call from a job."""
        self._steppers.remove(step)

    def _run(self) -> None:
        while True:
            try:
                job = self._inbox.get(block=not self._busy)
            except queue.Empty:
                job = ...
            while job is not ...:
                if job is _CLOSE:
                    return
                function, future = job
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(function())
                    except BaseException as exc:  # handed to the caller
                        future.set_exception(exc)
                self._hand_over()
                try:
                    job = self._inbox.get_nowait()
                except queue.Empty:
                    job = self._gathered()
            busy = False
            for step in list(self._steppers):
                busy = step() or busy
                self._hand_over()
            self._busy = busy

    def _gathered(self) -> Any:
        """The next job, if requests are awaited (``arrived``) and the wait has time left;
        else ``...``, and the step goes ahead."""
        joined, size = self._burst
        left = self._gather_until - time.monotonic()
        if joined < size and left > 0:
            try:
                return self._inbox.get(timeout=left)
            except queue.Empty:
                pass
        self._burst = (0, 0)
        return ...

    def _hand_over(self) -> None:
        """One call per event loop for what the last job or step emitted; a loop already closed
        (its requests gone with it) is skipped. Direct chunks are written first, so a stream's
        end reaches its consumer after its last chunk has left."""
        if self._direct:
            direct, self._direct = self._direct, {}
            for write, messages in direct.items():
                write(messages)
        if not self._held:
            return
        held, self._held = self._held, {}
        for loop, items in held.items():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[Delivery]) -> None:
    for put, item in items:
        put(item)


_shared: EngineThread | None = None
_shared_lock = threading.Lock()


def shared_engine() -> EngineThread:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = EngineThread("mlx-engine")
        return _shared
