"""``pull``: a model from an OCI registry into the store, resumable and verified.

Only blobs the store lacks are fetched, several at once. Each streams into
``tmp/pull-<hex>.partial`` (named by digest, so an interrupted pull resumes it with a Range
request), is hashed as it arrives, and becomes ``tmp/pull-<hex>.verified`` only if its digest
is right. When every blob of the model is verified they are renamed into ``blobs/`` and the
manifest is written last, with the registry's exact bytes: a failed pull leaves the store's
visible blobs and names as they were.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

from modelstore.atomic import publish_file
from modelstore.blobs import hash_prefix, sha256_digest
from modelstore.draft import ModelConfig
from modelstore.errors import (
    DigestMismatchError,
    InvalidDigestError,
    InvalidManifestError,
    MlxserveError,
    RegistryError,
)
from modelstore.locks import wait_for_flock
from modelstore.manifest import Descriptor, Manifest
from modelstore.registry.client import RegistryClient, repository_scope
from modelstore.registry.credentials import BasicCredentials
from modelstore.registry.session import (
    LayerProgress,
    Progress,
    ProgressEvent,
    open_registry,
    registry_reference,
)
from modelstore.store import ModelStore, StoredModel

DEFAULT_CONCURRENCY = 4
SINK_BATCH = 1 << 20
SINK_DEPTH = 4


def check_manifest(raw: bytes, registry_digest: str | None, wanted: str | None) -> Manifest:
    """Refuse manifest bytes that are not what was asked for or what the registry claims."""
    actual = sha256_digest(raw)
    for expected, whose in ((wanted, "the reference"), (registry_digest, "the registry")):
        if expected and expected != actual:
            raise DigestMismatchError(
                f"manifest hashes to {actual}, but {whose} says {expected}",
                expected=expected,
                actual=actual,
            )
    try:
        return Manifest.from_bytes(raw)
    except InvalidDigestError as exc:
        raise InvalidManifestError(f"the registry's manifest names a bad blob: {exc}") from None


@asynccontextmanager
async def _locked_partial(path: Path) -> AsyncIterator[BinaryIO]:
    """Open the partial file under an exclusive flock, waiting without blocking the loop
    (two pulls of one blob, in one daemon or two processes, must not write it together;
    no time limit: the other pull may be downloading gigabytes)."""
    handle = open(path, "a+b")  # noqa: SIM115 - closed in finally, after the lock is held
    try:
        await wait_for_flock(handle.fileno(), path, exclusive=True, timeout_s=None)
        yield handle
    finally:
        handle.close()


def _drop_if_ours_and_empty(path: Path, handle: BinaryIO) -> None:
    """Remove the empty partial file that opening it just created, when the blob turned out
    to be finished by another pull meanwhile (only if ``path`` is still that file)."""
    ours = os.fstat(handle.fileno())
    try:
        if ours.st_size == 0 and os.stat(path).st_ino == ours.st_ino:
            path.unlink()
    except FileNotFoundError:
        pass


async def fetch_blob(
    client: RegistryClient,
    store: ModelStore,
    repository: str,
    blob: Descriptor,
    tracker: LayerProgress,
) -> None:
    """Download one blob to ``tmp/pull-<hex>.verified`` (resuming a partial one), checked
    against its digest; ``publish_blobs`` moves it into the store once every blob is here."""
    verified = store.blobs.verified_path(blob.digest)
    if store.blobs.exists(blob.digest) or verified.exists():
        tracker.reset(blob.size)
        return
    partial = store.blobs.partial_path(blob.digest)
    async with _locked_partial(partial) as handle:
        if store.blobs.exists(blob.digest) or verified.exists():  # another pull finished it
            _drop_if_ours_and_empty(partial, handle)
            tracker.reset(blob.size)
            return
        offset = os.fstat(handle.fileno()).st_size
        if offset > blob.size:
            handle.truncate(0)
            offset = 0
        hasher, _ = await asyncio.to_thread(hash_prefix, partial, offset)
        tracker.reset(offset)
        received = offset
        if offset < blob.size:
            received, hasher = await _receive(
                client, repository, blob, handle, hasher, tracker, offset
            )
        if received < blob.size:
            raise RegistryError(
                f"download of {blob.digest} stopped at {received} of {blob.size} bytes; "
                "pull again to resume it"
            )
        actual = "sha256:" + hasher.hexdigest()
        if actual != blob.digest:
            partial.unlink(missing_ok=True)
            raise DigestMismatchError(
                f"registry served blob {blob.digest} with content that hashes to {actual}; "
                "nothing was stored",
                expected=blob.digest,
                actual=actual,
            )
        handle.flush()
        os.fsync(handle.fileno())
        publish_file(partial, verified, synced=True)


class _Sink:
    """Writes and hashes received bytes on a worker thread, so the event loop keeps reading
    the socket meanwhile (hashlib and file writes release the GIL). Chunks are batched to
    ``SINK_BATCH`` bytes, and at most ``SINK_DEPTH`` batches wait: memory stays bounded."""

    def __init__(self, handle: BinaryIO, hasher: hashlib._Hash) -> None:
        self.handle, self.hasher = handle, hasher
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pull-sink")
        self._pending: deque[asyncio.Future[None]] = deque()
        self._batch = bytearray()

    def _write(self, data: bytes) -> None:
        self.handle.write(data)
        self.hasher.update(data)

    async def feed(self, chunk: bytes) -> None:
        self._batch += chunk
        if len(self._batch) >= SINK_BATCH:
            await self._submit()

    async def _submit(self) -> None:
        data, self._batch = bytes(self._batch), bytearray()
        loop = asyncio.get_running_loop()
        self._pending.append(loop.run_in_executor(self._executor, self._write, data))
        while len(self._pending) > SINK_DEPTH:
            await self._pending.popleft()

    async def close(self, *, flush: bool) -> None:
        """Wait for every write (after submitting the last batch when ``flush``)."""
        try:
            if flush and self._batch:
                await self._submit()
            while self._pending:
                await self._pending.popleft()
        finally:
            self._executor.shutdown(wait=True)


async def _receive(
    client: RegistryClient,
    repository: str,
    blob: Descriptor,
    handle: BinaryIO,
    hasher: hashlib._Hash,
    tracker: LayerProgress,
    offset: int,
) -> tuple[int, hashlib._Hash]:
    """Append the blob's bytes from ``offset`` to ``handle``; returns how many it now holds,
    and the hash of them all."""
    async with client.open_blob(repository, blob.digest, offset) as (response, start):
        if start != offset:  # the registry ignored our Range: start over
            handle.truncate(0)
            hasher = hashlib.sha256()
            tracker.reset(0)
        received = start
        sink = _Sink(handle, hasher)
        completed = False
        try:
            async for chunk in response.content.iter_any():
                received += len(chunk)
                if received > blob.size:
                    raise DigestMismatchError(
                        f"registry sent more than the {blob.size} bytes of blob "
                        f"{blob.digest}; nothing was stored",
                        expected=blob.digest,
                    )
                await sink.feed(chunk)
                tracker.advance(len(chunk))
            completed = True
        finally:
            # Keep what arrived (a later pull resumes from it) unless the bytes are wrong.
            await sink.close(flush=completed or received <= blob.size)
            if received > blob.size:
                handle.truncate(0)
    return received, hasher


def _check_config(store: ModelStore, digest: str) -> None:
    path = store.blobs.path(digest)
    if not path.exists():
        path = store.blobs.verified_path(digest)
    try:
        ModelConfig.from_bytes(path.read_bytes())
    except (ValueError, TypeError) as exc:
        raise InvalidManifestError(f"config blob {digest} is not valid: {exc}") from None


def publish_blobs(store: ModelStore, blobs: list[Descriptor]) -> None:
    """Move every verified download into ``blobs/``: only now, with all of them present, does
    the pull change what the store holds."""
    for blob in blobs:
        if store.blobs.exists(blob.digest):
            continue
        try:
            store.blobs.publish_verified(store.blobs.verified_path(blob.digest), blob.digest)
        except FileNotFoundError:
            if not store.blobs.exists(blob.digest):  # not published by a concurrent pull
                raise RegistryError(f"download of {blob.digest} vanished; pull again") from None


async def fetch_blobs(
    client: RegistryClient,
    store: ModelStore,
    repository: str,
    blobs: list[Descriptor],
    progress: Progress | None,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> None:
    """Download every blob the store lacks, ``concurrency`` at a time, each verified; call
    inside ``store.writing_async()`` and ``publish_blobs`` once all are here."""
    limiter = asyncio.Semaphore(concurrency)

    async def fetch(blob: Descriptor) -> None:
        async with limiter:
            tracker = LayerProgress(progress, "pulling", blob.digest, blob.size)
            await fetch_blob(client, store, repository, blob, tracker)

    try:
        async with asyncio.TaskGroup() as group:
            for blob in blobs:
                group.create_task(fetch(blob))
    except BaseExceptionGroup as group_error:
        raise _first_error(group_error) from None


async def pull_model(
    store: ModelStore,
    name: str,
    *,
    insecure: bool = False,
    progress: Progress | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    credentials: BasicCredentials | None = None,
) -> StoredModel:
    """Pull ``host/[namespace/]name[:tag][@digest]`` and tag it under that same name."""
    ref = registry_reference(name, "pull")
    assert ref.host is not None
    report = progress or (lambda event: None)
    async with open_registry(ref.host, insecure=insecure, credentials=credentials) as client:
        report(ProgressEvent("pulling manifest"))
        await client.authenticate([repository_scope(ref.repository, "pull")])
        raw, registry_digest = await client.get_manifest(ref.repository, ref.digest or ref.tag)
        manifest = check_manifest(raw, registry_digest, ref.digest)
        blobs = list({d.digest: d for d in (manifest.config, *manifest.layers)}.values())
        async with store.writing_async():
            await fetch_blobs(client, store, ref.repository, blobs, progress, concurrency)
            report(ProgressEvent("verifying sha256 digest"))
            _check_config(store, manifest.config.digest)
            publish_blobs(store, blobs)
            report(ProgressEvent("writing manifest"))
            return store.put_manifest(ref.with_tag(ref.tag), manifest, raw=raw)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to show from a failed TaskGroup: ours first, then anything else."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    ours = [e for e in leaves if isinstance(e, MlxserveError)]
    return (ours or leaves)[0]
