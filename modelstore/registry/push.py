"""``push``: a stored model to an OCI registry.

Each blob is first asked for with HEAD (the registry already has it: nothing is sent), then
mounted from another repository of the same registry that a stored model came from (no bytes
sent either), and only then uploaded: in one PUT up to ``chunk_size``, in PATCH chunks above
it. The manifest goes last, as the exact bytes the store holds, so its digest is the same on
both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelstore.errors import RegistryError
from modelstore.reference import ModelReference
from modelstore.registry.client import repository_scope
from modelstore.registry.credentials import BasicCredentials
from modelstore.registry.session import (
    LayerProgress,
    Progress,
    ProgressEvent,
    open_registry,
    registry_reference,
)
from modelstore.store import ModelStore

DEFAULT_CHUNK_SIZE = 64 << 20
"""Blobs up to this size go in one PUT; bigger ones in PATCH chunks of this size, so a proxy
with a body limit in front of the registry still takes multi-GB weights."""


@dataclass
class PushResult:
    manifest_digest: str
    uploaded: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)


def mount_sources(store: ModelStore, target: ModelReference) -> dict[str, str]:
    """digest -> another repository on ``target``'s registry that holds it (from pulls and
    pushes this store remembers by name)."""
    sources: dict[str, str] = {}
    for model in store.list():
        ref = model.reference
        if ref.host != target.host or ref.repository == target.repository:
            continue
        for digest in model.manifest.blob_digests():
            sources.setdefault(digest, ref.repository)
    return sources


async def push_model(
    store: ModelStore,
    name: str,
    target: str | None = None,
    *,
    insecure: bool = False,
    progress: Progress | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    credentials: BasicCredentials | None = None,
) -> PushResult:
    """Push stored model ``name`` to ``target`` (default: ``name``, which must name a host)."""
    model = store.resolve(name)
    ref = registry_reference(target or name, "push")
    assert ref.host is not None
    report = progress or (lambda event: None)
    raw = store.blobs.read_bytes(model.manifest_digest)
    result = PushResult(model.manifest_digest)
    sources = mount_sources(store, ref)
    scopes = [repository_scope(ref.repository, "pull,push")]
    scopes += [repository_scope(repo, "pull") for repo in sorted(set(sources.values()))]
    async with open_registry(ref.host, insecure=insecure, credentials=credentials) as client:
        report(ProgressEvent("retrieving manifest"))
        await client.authenticate(scopes)
        blobs = {d.digest: d for d in (*model.manifest.layers, model.manifest.config)}
        for blob in blobs.values():
            tracker = LayerProgress(progress, "pushing", blob.digest, blob.size)
            tracker.reset(0)
            if await client.blob_exists(ref.repository, blob.digest):
                result.present.append(blob.digest)
                tracker.reset(blob.size)
                continue
            location = await client.start_upload(
                ref.repository, mount=blob.digest, mount_from=sources.get(blob.digest)
            )
            if location is None:
                result.mounted.append(blob.digest)
                tracker.reset(blob.size)
                continue
            await client.upload(
                location,
                store.blobs.path(blob.digest),
                blob.digest,
                blob.size,
                chunk_size=chunk_size,
                progress=tracker.advance,
            )
            result.uploaded.append(blob.digest)
        report(ProgressEvent("pushing manifest"))
        answered = await client.put_manifest(ref.repository, ref.tag, raw)
        if answered and answered != model.manifest_digest:
            raise RegistryError(
                f"registry stored the manifest as {answered}, not {model.manifest_digest}"
            )
    return result
