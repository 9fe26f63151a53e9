"""The runner worker: one process per loaded model, holding its library and weights.

The daemon starts it (``isolated.py``) as ``python -m mlxserve.runners.worker CONTROL SYNC``
with two sockets: on CONTROL, framed pickled messages carry loads, generations (a chunk per
token), embeddings, cancellations and the unload; what the worker's loop posts in one turn goes
back as one frame (a list of messages), and a generation's chunks are written by the engine
thread itself, a batch step's as one frame (``engine.Direct``, ``FrameWriter``), so a step of
eight sequences is one pickle, one write and one read, not eight, and wakes no event loop here;
on SYNC, the calls the daemon makes without
awaiting (tokenize, detokenize, describe) are answered by a thread of their own. The worker
builds the runner the daemon would have built in-process (``select.make_runner``), so a
runner's code does not know it is isolated. A library that aborts (a llama.cpp assertion, a
Metal error) takes down this process only; the daemon sees the socket close.

Messages, daemon to worker: ``(kind, id, *args)`` with kind ``load``, ``generate``, ``embed``,
``rerank``, ``score``, ``unload`` or ``cancel``. Worker to daemon: frames each holding a list of
``("item", id, value)`` (a chunk, or a call's result), ``("progress", id, None)`` (a generation's
prefill advanced: the worker is alive though no token comes yet; at most one per
``PROGRESS_EVERY_S``) and ``("end", id, error)`` (``error`` is ``None`` or ``pack_error``'s
tuple).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any

from mlxserve import platform
from mlxserve.runners.base import CancelToken, GenerateRequest, ModelRunner
from mlxserve.runners.engine import DIRECT, Direct
from modelstore.errors import MlxserveError

HEADER = struct.Struct("!Q")
"""A frame is its length, then the pickled message."""
LOG_LEVEL_ENV = "MLXSERVE_WORKER_LOG_LEVEL"
PROGRESS_EVERY_S = 0.5
"""At most one progress frame per generation this often: the daemon's stall deadline
(``runner_stall_timeout_s``) is seconds, a prefill chunk can be milliseconds."""
log = logging.getLogger("mlxserve.worker")

PackedError = tuple[str, str, str, dict[str, Any]]


def frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class FrameProtocol(asyncio.Protocol):
    """Either end of the control socket, reading: each frame is parsed as its bytes arrive and
    its message handed to ``receive`` in the same callback, with no reader task to wake per
    frame (in the daemon, a ``StreamReader`` and its task were a third of its per-token work for
    a worker's stream: docs/PERFORMANCE.md, issue 21); ``lost`` when the socket closes."""

    def __init__(self, receive: Callable[[Any], None], lost: Callable[[], None]) -> None:
        self._buffer = bytearray()
        self._receive = receive
        self._lost = lost

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer, start)
            end = start + HEADER.size + size
            if len(buffer) < end:
                break
            self._receive(pickle.loads(buffer[start + HEADER.size : end]))
            start = end
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()


def pack_error(error: BaseException) -> PackedError:
    """An exception as plain data: an ``MlxserveError`` keeps its class (its code and status);
    anything else becomes a 500 in the daemon, as it would have in-process."""
    if isinstance(error, MlxserveError):
        kind = type(error)
        return kind.__module__, kind.__qualname__, error.message, dict(error.details)
    return "", type(error).__name__, str(error), {}


class FrameWriter:
    """Frames to the daemon from any thread: the loop's, and the engine thread's chunks
    (``engine.Direct``). Each frame is sent whole under a lock; the socket is non-blocking (the
    loop reads it), so a full buffer is waited out here. A daemon that is gone is ignored: the
    loop's reader sees it and the worker ends."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def write(self, messages: list[Any]) -> None:
        data = memoryview(frame(messages))
        with self._lock:
            try:
                while data:
                    try:
                        data = data[self._sock.send(data) :]
                    except BlockingIOError:
                        select.select([], [self._sock], [])
            except OSError:
                return


class WorkerFailure(RuntimeError):
    """An unexpected exception in the worker (a bug): the daemon's 500 with a request id."""


def unpack_error(packed: PackedError) -> Exception:
    module, name, message, details = packed
    if module:
        with contextlib.suppress(ImportError, AttributeError):
            kind = getattr(importlib.import_module(module), name)
            if isinstance(kind, type) and issubclass(kind, MlxserveError):
                error = kind.__new__(kind)
                MlxserveError.__init__(error, message, **details)
                return error
    return WorkerFailure(f"{name}: {message}")


class Worker:
    def __init__(self, control: socket.socket, sync: Connection) -> None:
        self.control = control
        self.sync = sync
        self.runner: ModelRunner | None = None
        self.cancels: dict[int, CancelToken] = {}
        self._outbox: list[tuple[str, int, Any]] = []
        self._frames = FrameWriter(control)
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: asyncio.Future[None] | None = None
        """Set when the daemon is gone or the model is unloaded: the worker's end."""

    def post(self, message: tuple[str, int, Any]) -> None:
        """Queue a message; everything posted in one turn of the loop goes in one frame."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(message)

    def _flush(self) -> None:
        messages, self._outbox = self._outbox, []
        if messages:
            self._frames.write(messages)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        # Reads through the protocol; writes, from any thread, through ``_frames``.
        await loop.create_connection(
            lambda: FrameProtocol(self._receive, self._end), sock=self.control
        )
        threading.Thread(target=self._serve_sync, name="worker-sync", daemon=True).start()
        await self._done

    def _receive(self, message: tuple[Any, ...]) -> None:
        kind, ident, *args = message
        if kind == "cancel":
            token = self.cancels.get(ident)
            if token is not None:
                token.cancel()
            return
        if kind == "generate":
            self.cancels[ident] = CancelToken()  # before a cancel for it can arrive
            args.append(ident)
        task = asyncio.create_task(self._run(ident, self._handler(kind, *args)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if kind == "unload":
            task.add_done_callback(lambda _: self._end())

    def _end(self) -> None:
        """The daemon is gone (so is the reason to live), or the model was unloaded: the
        last answer goes out before the loop and its socket close."""
        self._flush()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _handler(self, kind: str, *args: Any) -> Coroutine[Any, Any, None]:
        handlers = {
            "load": self._load,
            "generate": self._generate,
            "embed": self._embed,
            "rerank": self._rerank,
            "score": self._score,
            "unload": self._unload,
        }
        return handlers[kind](*args)

    async def _run(self, ident: int, work: Coroutine[Any, Any, Any]) -> None:
        try:
            async for value in _as_items(work):
                self.post(("item", ident, value))
        except BaseException as error:  # everything goes back to the daemon
            if not isinstance(error, MlxserveError):
                log.exception("worker request %d failed", ident)
            self.post(("end", ident, pack_error(error)))
        else:
            self.post(("end", ident, None))
        finally:
            self.cancels.pop(ident, None)

    async def _load(self, runner_name: str, model: Any, options: Any) -> Any:
        from mlxserve.runners.select import make_runner

        self.runner = make_runner(runner_name)
        info = await self.runner.load(model, options)
        return {
            "info": info,
            "max_parallel": self.runner.max_parallel,
            "chat_template": self.runner.chat_template,
            "special_tokens": self.runner.special_tokens,
            "image_marker": self.runner.image_marker,
        }

    async def _generate(self, request: GenerateRequest, ident: int) -> Any:
        assert self.runner is not None
        request.cancel = self.cancels[ident]
        request.progress = self._progress(ident)
        # In this request's task: its chunks leave from the engine thread (engine.Direct).
        DIRECT.set(Direct(self._frames.write, lambda chunk: ("item", ident, chunk)))
        return self.runner.generate(request)

    def _progress(self, ident: int) -> Any:
        """The generation's progress callback: called on the runner's engine thread, it posts
        a progress frame from the loop, throttled."""
        loop = asyncio.get_running_loop()
        last = time.monotonic()

        def report() -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                loop.call_soon_threadsafe(self.post, ("progress", ident, None))

        return report

    async def _embed(self, request: Any) -> Any:
        assert self.runner is not None
        return await self.runner.embed(request)

    async def _rerank(self, request: Any) -> Any:
        assert self.runner is not None
        return await self.runner.rerank(request)  # type: ignore[attr-defined]

    async def _score(self, request: Any) -> Any:
        assert self.runner is not None
        return await self.runner.score(request)  # type: ignore[attr-defined]

    async def _unload(self) -> None:
        if self.runner is not None:
            await self.runner.unload()

    def _serve_sync(self) -> None:
        """Tokenize, detokenize, describe: answered on their own socket, while the loop
        serves generations (the runners already allow these calls from another thread)."""
        while True:
            try:
                method, args = self.sync.recv()
            except (EOFError, OSError):
                return
            try:
                result = getattr(self.runner, method)(*args)
            except Exception as error:
                self.sync.send(("error", pack_error(error)))
            else:
                self.sync.send(("ok", result))


async def _as_items(work: Coroutine[Any, Any, Any]) -> Any:
    """A handler's result as the items to send: a generation's chunks one by one, anything
    else (a load's info, an embedding) as one item; ``None`` as none."""
    result = await work
    if hasattr(result, "__anext__"):
        async for chunk in result:
            yield chunk
    elif result is not None:
        yield result


def main() -> None:
    control_fd, sync_fd = (int(arg) for arg in sys.argv[1:3])
    platform.die_with_parent()
    # A Ctrl-C at the daemon's terminal reaches its whole process group: the daemon stops
    # its workers itself, after answering what is in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=os.environ.get(LOG_LEVEL_ENV, "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s[worker %(process)d]: %(message)s",
    )
    control = socket.socket(fileno=control_fd)
    worker = Worker(control, Connection(sync_fd))
    asyncio.run(worker.serve())
    platform.exit_process(0)


if __name__ == "__main__":
    main()
