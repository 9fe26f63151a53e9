"""Cross-process locks on the store.

Written on ``fcntl.flock`` rather than ``filelock`` because the store needs *shared* locks:
any number of imports may run at once (each holds the ``gc`` lock shared, so a concurrent
``gc`` cannot delete the blobs they have written but not yet referenced), while ``gc`` and
manifest updates take it exclusive. flock locks die with their process, so a crash never
leaves the store locked. Works on macOS and Linux, the only platforms we support.

Waiting polls a non-blocking flock: ``locked`` sleeps between tries (CLI, worker threads),
``locked_async``/``wait_for_flock`` await between tries, so a daemon waiting on a lock keeps
serving everything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from modelstore.errors import StoreLockedError

DEFAULT_TIMEOUT_S = 120.0
_POLL_INTERVAL_S = 0.05


def _try_flock(fd: int, exclusive: bool) -> bool:
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _busy(path: Path, timeout_s: float) -> StoreLockedError:
    return StoreLockedError(
        f"the store is busy ({path.name} held by another process for {timeout_s:.0f}s)",
        lock=str(path),
    )


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextlib.contextmanager
def locked(path: Path, *, exclusive: bool, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Hold a flock on ``path`` (created if missing) for the ``with`` body."""
    fd = _open(path)
    try:
        deadline = time.monotonic() + timeout_s
        while not _try_flock(fd, exclusive):
            if time.monotonic() >= deadline:
                raise _busy(path, timeout_s)
            time.sleep(_POLL_INTERVAL_S)
        yield
    finally:
        os.close(fd)


async def wait_for_flock(
    fd: int, path: Path, *, exclusive: bool, timeout_s: float | None = DEFAULT_TIMEOUT_S
) -> None:
    """Take a flock on an open file without blocking the event loop (``None``: no limit)."""
    import asyncio  # here, not above: store commands never start an event loop

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not _try_flock(fd, exclusive):
        if deadline is not None and time.monotonic() >= deadline:
            raise _busy(path, timeout_s or 0)
        await asyncio.sleep(_POLL_INTERVAL_S)


@contextlib.asynccontextmanager
async def locked_async(
    path: Path, *, exclusive: bool, timeout_s: float = DEFAULT_TIMEOUT_S
) -> AsyncIterator[None]:
    """``locked`` for coroutines."""
    fd = _open(path)
    try:
        await wait_for_flock(fd, path, exclusive=exclusive, timeout_s=timeout_s)
        yield
    finally:
        os.close(fd)
