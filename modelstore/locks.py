"""Cross-process locks on the store.

Written on ``fcntl.flock`` rather than ``filelock`` because the store needs *shared* locks:
any number of imports may run at once (each holds the ``gc`` lock shared, so a concurrent
``gc`` cannot delete the blobs they have written but not yet referenced), while ``gc`` and
manifest updates take it exclusive. flock locks die with their process, so a crash never
leaves the store locked. Works on macOS and Linux, the only platforms we support.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from modelstore.errors import StoreLockedError

DEFAULT_TIMEOUT_S = 120.0
_POLL_INTERVAL_S = 0.05


@contextlib.contextmanager
def locked(path: Path, *, exclusive: bool, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Hold a flock on ``path`` (created if missing) for the ``with`` body."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"the store is busy ({path.name} held by another process for "
                        f"{timeout_s:.0f}s)",
                        lock=str(path),
                    ) from None
                time.sleep(_POLL_INTERVAL_S)
        yield
    finally:
        os.close(fd)
