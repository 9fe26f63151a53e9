"""Content-addressed blob files: ``blobs/sha256/<hex>``, written atomically, verified always.

A blob becomes visible only by ``os.replace`` of a fully written, fsynced temporary file whose
sha256 matched; a crash at any point leaves at most a file in ``tmp/`` that ``gc`` removes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from modelstore.atomic import publish_file
from modelstore.errors import (
    BlobNotFoundError,
    CorruptStoreError,
    DigestMismatchError,
    DiskFullError,
)
from modelstore.reference import validate_digest

CHUNK_SIZE = 4 << 20
ProgressCallback = Callable[[int], None]
"""Called with the number of bytes just processed."""


class StoredHow(StrEnum):
    """How a blob got into the store; ``show`` reports it."""

    EXISTING = "existing"
    HARDLINK = "hardlink"
    CLONE = "clone"
    """A copy-on-write clone (APFS ``clonefile``, a Linux reflink): no second copy of the data
    on disk, yet an edit to the source leaves the blob as it was."""
    COPY = "copy"
    WRITTEN = "written"


FICLONE = 0x40049409
"""Linux's ``ioctl`` that makes ``dst`` share ``src``'s extents (btrfs, XFS, bcachefs...)."""
_NO_CLONE = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}


def clone_file(source: Path, target: Path) -> bool:
    """Make ``target`` a copy-on-write clone of ``source`` if the file system can; ``False``
    (and no ``target``) where it cannot, so the caller copies instead."""
    if sys.platform == "darwin":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.clonefile(os.fsencode(source), os.fsencode(target), 0) == 0:
            return True
        if ctypes.get_errno() in _NO_CLONE:
            return False
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(source))
    try:
        import fcntl
    except ImportError:  # Windows: no reflink API here
        return False
    with open(source, "rb") as src, open(target, "xb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        except OSError as exc:
            if exc.errno not in _NO_CLONE:
                raise
            cloned = False
        else:
            cloned = True
    if not cloned:
        target.unlink(missing_ok=True)
    return cloned


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hash_prefix(
    path: Path, length: int | None = None, progress: ProgressCallback | None = None
) -> tuple[hashlib._Hash, int]:
    """A sha256 hasher fed the first ``length`` bytes of a file (all of it for ``None``),
    and how many it read; a resumed download keeps feeding the same hasher."""
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while length is None or size < length:
            want = CHUNK_SIZE if length is None else min(CHUNK_SIZE, length - size)
            chunk = handle.read(want)
            if not chunk:
                break
            hasher.update(chunk)
            size += len(chunk)
            if progress:
                progress(len(chunk))
    return hasher, size


def hash_file(path: Path, progress: ProgressCallback | None = None) -> tuple[str, int]:
    """The digest and size of a file, read in chunks."""
    hasher, size = hash_prefix(path, None, progress)
    return "sha256:" + hasher.hexdigest(), size


@dataclass(frozen=True)
class BlobWrite:
    digest: str
    size: int
    how: StoredHow


def _disk_full(error: OSError) -> OSError | DiskFullError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError("the store's disk is full; the partial blob was removed")
    return error


class BlobWriter:
    """One blob being written: ``write`` pieces, then ``finish``; closing it before
    ``finish`` (or after a failure) removes the partial file. A full disk is a
    ``DiskFullError`` (507)."""

    def __init__(self, blobs: BlobStore, temp: Path) -> None:
        self._blobs = blobs
        self._temp = temp
        self._handle = open(temp, "wb")  # noqa: SIM115 - closed by finish or close
        self._hasher = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        try:
            self._handle.write(chunk)
        except OSError as error:
            raise _disk_full(error) from None
        self._hasher.update(chunk)
        self.size += len(chunk)

    def finish(self, expected_digest: str | None = None) -> BlobWrite:
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
        except OSError as error:
            raise _disk_full(error) from None
        digest = "sha256:" + self._hasher.hexdigest()
        if expected_digest is not None and digest != expected_digest:
            raise DigestMismatchError(
                f"content hashes to {digest}, expected {expected_digest}",
                expected=expected_digest,
                actual=digest,
            )
        if self._blobs.exists(digest):
            return BlobWrite(digest, self.size, StoredHow.EXISTING)
        self._blobs._publish(self._temp, digest)
        return BlobWrite(digest, self.size, StoredHow.WRITTEN)

    def close(self) -> None:
        """Drop whatever was not published (a no-op once ``finish`` moved it into place)."""
        with contextlib.suppress(OSError):
            self._handle.close()
        self._temp.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlobStore:
    """The ``blobs/`` half of the store; knows nothing about manifests or names."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs" / "sha256"
        self.tmp_dir = root / "tmp"

    def path(self, digest: str) -> Path:
        return self.dir / validate_digest(digest).removeprefix("sha256:")

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {digest} is not in the store", digest=digest) from None

    def link_count(self, digest: str) -> int:
        return self.path(digest).stat().st_nlink

    def digests(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted("sha256:" + p.name for p in self.dir.iterdir() if len(p.name) == 64)

    def _temp_path(self) -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"blob-{os.getpid()}-{uuid.uuid4().hex}.partial"

    def _publish(self, temp: Path, digest: str) -> None:
        publish_file(temp, self.path(digest), synced=True)

    def partial_path(self, digest: str) -> Path:
        """Where a download of ``digest`` accumulates: named by digest so a later pull resumes."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"pull-{validate_digest(digest).removeprefix('sha256:')}.partial"

    def verified_path(self, digest: str) -> Path:
        """A download whose digest was checked, waiting for the rest of its model."""
        return self.partial_path(digest).with_suffix(".verified")

    def publish_verified(self, temp: Path, digest: str) -> None:
        """Move a fully written, fsynced file whose sha256 the caller checked into place."""
        self._publish(temp, digest)

    def write_chunks(
        self,
        chunks: Iterable[bytes],
        expected_digest: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> BlobWrite:
        """Stream ``chunks`` into a blob, hashing as it writes; reject a wrong digest."""
        if expected_digest is not None and self.exists(expected_digest):
            for _ in chunks:
                pass
            return BlobWrite(expected_digest, self.size(expected_digest), StoredHow.EXISTING)
        with self.open_writer() as writer:
            for chunk in chunks:
                writer.write(chunk)
                if progress:
                    progress(len(chunk))
            return writer.finish(expected_digest)

    def open_writer(self) -> BlobWriter:
        """A blob written piece by piece (an upload feeding it from the network); each call is
        short disk work, so a caller never parks a thread waiting for the next piece."""
        return BlobWriter(self, self._temp_path())

    def write_bytes(self, data: bytes) -> BlobWrite:
        return self.write_chunks([data])

    def import_file(
        self,
        source: Path,
        *,
        allow_link: bool = True,
        allow_clone: bool = True,
        progress: ProgressCallback | None = None,
        expected_digest: str | None = None,
    ) -> BlobWrite:
        """Add a file: hard-linked when asked (``allow_link``) and on the same file system, else
        cloned copy-on-write where the file system can (``allow_clone``), else copied while
        hashing. With ``expected_digest``, content hashing to anything else is refused.

        A link or a clone is hashed *after* it is made, so what gets published is what it
        holds. A hard link shares its inode with the source: editing the source in place would
        change the blob, which ``verify`` then reports (``show`` says which blobs are links), so
        only sources that never change (the Hugging Face cache, Ollama's blobs) are linked by
        default. A clone shares only the data blocks until either side is written.
        """
        # Resolve first: os.link on Linux links a symlink itself, not its target (the HF
        # cache's snapshot folders are all symlinks, relative ones at that).
        for how, allowed in ((StoredHow.HARDLINK, allow_link), (StoredHow.CLONE, allow_clone)):
            if not allowed:
                continue
            temp: Path | None = self._temp_path()
            assert temp is not None
            try:
                if how is StoredHow.HARDLINK:
                    os.link(source.resolve(), temp)
                elif not clone_file(source.resolve(), temp):
                    temp = None
            except OSError:
                temp = None
            if temp is not None:
                try:
                    digest, size = hash_file(temp, progress)
                    if expected_digest is not None and digest != expected_digest:
                        raise DigestMismatchError(
                            f"{source} hashes to {digest}, but its source names it "
                            f"{expected_digest}; nothing was stored",
                            expected=expected_digest,
                            actual=digest,
                        )
                    if self.exists(digest):
                        return BlobWrite(digest, size, StoredHow.EXISTING)
                    self._publish(temp, digest)
                    return BlobWrite(digest, size, how)
                finally:
                    temp.unlink(missing_ok=True)

        def read_source() -> Iterable[bytes]:
            with open(source, "rb") as handle:
                while chunk := handle.read(CHUNK_SIZE):
                    yield chunk

        result = self.write_chunks(read_source(), expected_digest, progress=progress)
        how = StoredHow.COPY if result.how is StoredHow.WRITTEN else result.how
        return BlobWrite(result.digest, result.size, how)

    def read_bytes(self, digest: str, *, verify: bool = True) -> bytes:
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {digest} is not in the store", digest=digest) from None
        if verify and sha256_digest(data) != digest:
            raise DigestMismatchError(
                f"blob {digest} is corrupt (its content hashes to {sha256_digest(data)})",
                digest=digest,
            )
        return data

    def verify(self, digest: str, progress: ProgressCallback | None = None) -> bool:
        actual, _ = hash_file(self.path(digest), progress)
        return actual == digest

    def remove(self, digest: str) -> int:
        path = self.path(digest)
        size = path.stat().st_size
        path.unlink()
        return size

    def clean_temp(self) -> int:
        """Remove temporary files left by crashed writers (call with the gc lock held)."""
        removed = 0
        if self.tmp_dir.is_dir():
            for leftover in self.tmp_dir.iterdir():
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed += 1
        return removed


class DigestCache:
    """Blobs checked against their digests, remembered by (size, mtime) so that a model loaded
    again is not hashed again unless a blob changed on disk (the daemon checks every blob of a
    model before loading it)."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self._verified: dict[Path, tuple[int, int]] = {}

    def check(self, name: str, digests: list[str]) -> None:
        for digest in digests:
            path = self.blobs.path(digest)
            try:
                stat = path.stat()
            except FileNotFoundError:
                raise CorruptStoreError(
                    f"model {name}: blob {digest} is missing; run `mlxctl verify`", digest=digest
                ) from None
            key = (stat.st_size, stat.st_mtime_ns)
            if self._verified.get(path) == key:
                continue
            if not self.blobs.verify(digest):
                raise CorruptStoreError(
                    f"model {name}: blob {digest} does not match its digest; the store is "
                    "corrupt (run `mlxctl verify`, then re-import or pull the model)",
                    digest=digest,
                )
            self._verified[path] = key
