"""What pulls and pushes share: the client session, progress events, the host check."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp

from modelstore.errors import InvalidReferenceError
from modelstore.reference import ModelReference, parse_reference
from modelstore.registry.client import RegistryClient
from modelstore.registry.credentials import BasicCredentials, load_credentials

TIMEOUT = aiohttp.ClientTimeout(total=None, connect=30, sock_read=300)
PROGRESS_INTERVAL_S = 0.2


@dataclass(frozen=True)
class ProgressEvent:
    """One status line, in Ollama's ``/api/pull`` shape (``None`` fields are left out)."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


Progress = Callable[[ProgressEvent], None]


def layer_status(verb: str, digest: str) -> str:
    """Ollama names a layer by the first 12 hex digits of its digest."""
    return f"{verb} {digest.removeprefix('sha256:')[:12]}"


class LayerProgress:
    """Counts a layer's bytes and reports at most every ``PROGRESS_INTERVAL_S`` (and at 100%)."""

    def __init__(self, report: Progress | None, verb: str, digest: str, total: int) -> None:
        self.report, self.digest, self.total = report, digest, total
        self.status = layer_status(verb, digest)
        self.completed = 0
        self._last = 0.0

    def reset(self, completed: int = 0) -> None:
        self.completed = completed
        self._emit()

    def advance(self, count: int) -> None:
        self.completed += count
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL_S or self.completed >= self.total:
            self._last = now
            self._emit()

    def _emit(self) -> None:
        if self.report:
            self.report(ProgressEvent(self.status, self.digest, self.total, self.completed))


def registry_reference(name: str, verb: str) -> ModelReference:
    """Parse ``name`` and insist on a registry host: there is no default registry."""
    ref = parse_reference(name)
    if ref.host is None:
        raise InvalidReferenceError(
            f"cannot {verb} {name!r}: name the registry, e.g. 127.0.0.1:5000/team/{ref.name}:"
            f"{ref.tag} (or hf://ORG/REPO for the Hugging Face hub)",
            reference=name,
        )
    return ref


@asynccontextmanager
async def open_registry(
    host: str, *, insecure: bool, credentials: BasicCredentials | None = None
) -> AsyncIterator[RegistryClient]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield RegistryClient(
            host,
            session,
            insecure=insecure,
            credentials=credentials if credentials is not None else load_credentials(host),
        )
