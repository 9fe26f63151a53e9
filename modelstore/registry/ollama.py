"""``ollama://[host/][namespace/]name[:tag]``: pull from Ollama's registry (or one shaped like it).

Ollama's registry speaks the OCI distribution API, but its manifests are Docker v2 ones with
Ollama's layer media types and Ollama's own config blob, so they cannot be stored as they are.
The layers are fetched by the ordinary pull machinery (resumable, verified, only what the store
lacks), then mapped exactly as ``mlxctl import --from-ollama`` maps a local Ollama store
(``modelstore.ollama.ollama_draft``) and committed as one of our manifests.
"""

from __future__ import annotations

import asyncio

from modelstore.blobs import sha256_digest
from modelstore.errors import DigestMismatchError
from modelstore.ollama import OllamaModel, ollama_draft, ollama_reference, parse_manifest
from modelstore.registry.client import repository_scope
from modelstore.registry.credentials import BasicCredentials
from modelstore.registry.pull import DEFAULT_CONCURRENCY, fetch_blobs, publish_blobs
from modelstore.registry.session import Progress, ProgressEvent, open_registry
from modelstore.store import ModelStore, StoredModel

OLLAMA_SCHEME = "ollama://"


def is_ollama_url(text: str) -> bool:
    return text.startswith(OLLAMA_SCHEME)


def local_name(url: str) -> str:
    """The name a pull of ``url`` is stored under by default."""
    ref = ollama_reference(url.removeprefix(OLLAMA_SCHEME))
    assert ref.host is not None and ref.namespace is not None
    return OllamaModel(ref.host, ref.namespace, ref.name, ref.tag, []).store_name


async def pull_ollama(
    store: ModelStore,
    url: str,
    *,
    name: str | None = None,
    insecure: bool = False,
    progress: Progress | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    credentials: BasicCredentials | None = None,
) -> StoredModel:
    """Pull ``url`` and store it as ``name`` (default: Ollama's name without its host)."""
    ref = ollama_reference(url.removeprefix(OLLAMA_SCHEME))
    assert ref.host is not None and ref.namespace is not None
    report = progress or (lambda event: None)
    async with open_registry(ref.host, insecure=insecure, credentials=credentials) as client:
        report(ProgressEvent("pulling manifest"))
        await client.authenticate([repository_scope(ref.repository, "pull")])
        raw, registry_digest = await client.get_manifest(ref.repository, ref.tag)
        actual = sha256_digest(raw)
        if registry_digest and registry_digest != actual:
            raise DigestMismatchError(
                f"manifest hashes to {actual}, but the registry says {registry_digest}",
                expected=registry_digest,
                actual=actual,
            )
        model: OllamaModel = parse_manifest(raw, ref.host, ref.namespace, ref.name, ref.tag)
        blobs = list({layer.digest: layer for layer in model.layers}.values())
        async with store.writing_async():
            await fetch_blobs(client, store, ref.repository, blobs, progress, concurrency)
            report(ProgressEvent("verifying sha256 digest"))
            publish_blobs(store, blobs)
            report(ProgressEvent("writing manifest"))
            draft, _ = ollama_draft(model, store.blobs.path)
            committed = await asyncio.to_thread(store.commit, draft, name or model.store_name)
    return committed.model
