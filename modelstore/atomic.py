"""The store's one way to make a file or folder appear: whole or not at all.

Everything the store publishes (blobs, tags, pulled layers, packed layouts, runtime folders,
converted models, adapter folders) is written under a temporary name beside its final place,
made durable (the file's data fsynced), then renamed over its final name with ``os.replace``
(atomic on POSIX within one file system), and the rename itself made durable by fsyncing the
folder that holds it. A crash at any point leaves either the old state or the new one, never a
half-written file under a real name; leftovers carry a ``.partial`` name that ``gc`` removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PARTIAL_SUFFIX = ".partial"


def fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def temp_beside(final: Path) -> Path:
    """A temporary name in ``final``'s folder, unique to this process and call."""
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")


def publish_file(temp: Path, final: Path, *, synced: bool = False) -> None:
    """Rename the fully written ``temp`` over ``final`` durably (``synced``: its data already
    is). ``temp`` and ``final`` must be on one file system."""
    if not synced:
        fsync_file(temp)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def write_atomically(final: Path) -> Iterator[BinaryIO]:
    """A file handle whose content replaces ``final`` only if the block ends without error."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_beside(final)
    try:
        with open(temp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        publish_file(temp, final, synced=True)
    finally:
        temp.unlink(missing_ok=True)


def publish_folder(building: Path, final: Path) -> bool:
    """Rename the built folder ``building`` to ``final``. False, with ``building`` removed, when
    another process published ``final`` first (its copy is as good as ours)."""
    try:
        os.replace(building, final)
    except OSError:
        shutil.rmtree(building, ignore_errors=True)
        return False
    fsync_dir(final.parent)
    return True
