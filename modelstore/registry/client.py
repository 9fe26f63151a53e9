"""A small client for the OCI distribution API, on aiohttp.

Why by hand: ``oras`` (PyPI) is synchronous (``requests``), downloads straight to the target
path and has neither Range resume nor hashing while the bytes stream; the store needs all three
(a partial blob must never become visible, an interrupted pull must resume) and the daemon
needs pulls that do not block its event loop. The API surface we use is small: ``/v2/``,
blob HEAD/GET, upload POST/PATCH/PUT (with ``mount``), manifest GET/PUT and the token flow.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from modelstore import mediatypes
from modelstore.errors import ModelNotFoundError, RegistryAuthError, RegistryError
from modelstore.registry.credentials import BasicCredentials, auth_file

MANIFEST_ACCEPT = ", ".join(
    [mediatypes.OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"]
)
MAX_MANIFEST_BYTES = 4 << 20
UPLOAD_READ_SIZE = 1 << 20
_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^\s,]+))')


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header: ``Bearer realm="...",service="...",scope="..."``."""

    scheme: str
    params: dict[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge:
        scheme, _, rest = header.strip().partition(" ")
        params = {m[1].lower(): m[2] or m[3] for m in _CHALLENGE_PARAM.finditer(rest)}
        return cls(scheme.lower(), params)


def repository_scope(repository: str, actions: str) -> str:
    return f"repository:{repository}:{actions}"


def _error_text(status: int, body: bytes) -> str:
    """The registry's own words, from its ``{"errors": [{"code", "message"}]}`` body."""
    try:
        errors = json.loads(body).get("errors") or []
        words = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    except (ValueError, AttributeError):
        words = body[:200].decode(errors="replace")
    return f"HTTP {status}" + (f" ({words})" if words else "")


class RegistryClient:
    """One registry host; authenticates once per set of scopes and sends the answer after."""

    def __init__(
        self,
        host: str,
        session: aiohttp.ClientSession,
        *,
        insecure: bool = False,
        credentials: BasicCredentials | None = None,
    ) -> None:
        self.host = host
        self.base = URL(f"{'http' if insecure else 'https'}://{host}")
        self.session = session
        self.credentials = credentials
        self.insecure = insecure
        self._authorization: str | None = None

    # -- transport ---------------------------------------------------------------------------

    def _url(self, path_or_url: str | URL) -> URL:
        url = URL(path_or_url)
        return url if url.is_absolute() else self.base.join(url)

    @asynccontextmanager
    async def request(
        self,
        method: str,
        path_or_url: str | URL,
        *,
        headers: dict[str, str] | None = None,
        challenge_ok: bool = False,
        **kwargs: Any,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request with our authorization; turn transport failures into our errors."""
        all_headers = dict(headers or {})
        if self._authorization:
            all_headers["Authorization"] = self._authorization
        try:
            async with self.session.request(
                method, self._url(path_or_url), headers=all_headers, **kwargs
            ) as response:
                if response.status == 401 and not challenge_ok:
                    raise RegistryAuthError(
                        f"registry {self.host} refused our credentials for {method} "
                        f"{URL(path_or_url).path}",
                        host=self.host,
                    )
                yield response
        except aiohttp.ClientConnectionError as exc:
            hint = "" if self.insecure else " (for a plain-HTTP registry use --insecure)"
            raise RegistryError(
                f"cannot talk to registry {self.base}: {exc}{hint}", host=self.host
            ) from None
        except (aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise RegistryError(
                f"registry {self.host} stopped answering {method} {URL(path_or_url).path}: "
                f"{exc or 'timed out'}",
                host=self.host,
            ) from None

    async def _fail(self, response: aiohttp.ClientResponse, what: str) -> RegistryError:
        body = await response.read()
        return RegistryError(
            f"registry {self.host} refused to {what}: {_error_text(response.status, body)}",
            host=self.host,
            status=response.status,
        )

    # -- authentication ----------------------------------------------------------------------

    async def authenticate(self, scopes: list[str]) -> None:
        """Answer the ``/v2/`` challenge: Basic from the login file, or the Bearer token flow."""
        self._authorization = None
        async with self.request("GET", "/v2/", challenge_ok=True) as response:
            if response.status == 200:
                return
            challenge_header = response.headers.get("WWW-Authenticate")
            status = response.status
        if status != 401 and not challenge_header:
            raise RegistryError(f"{self.base}/v2/ answered HTTP {status}: not an OCI registry")
        challenge = Challenge.parse(challenge_header or "")
        if challenge.scheme == "basic":
            if self.credentials is None:
                raise self._needs_login()
            self._authorization = self.credentials.header()
            async with self.request("GET", "/v2/"):
                pass  # a wrong password surfaces here as RegistryAuthError
        elif challenge.scheme == "bearer":
            self._authorization = "Bearer " + await self._fetch_token(challenge, scopes)
        else:
            raise RegistryError(f"registry {self.host} asks for unknown auth {challenge.scheme!r}")

    def _needs_login(self) -> RegistryAuthError:
        return RegistryAuthError(
            f"registry {self.host} needs a login: add it to {auth_file()} "
            "(e.g. with 'docker login' or 'oras login')",
            host=self.host,
        )

    async def _fetch_token(self, challenge: Challenge, scopes: list[str]) -> str:
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryError(f"registry {self.host} sent a Bearer challenge without a realm")
        query: list[tuple[str, str]] = []
        if service := challenge.params.get("service"):
            query.append(("service", service))
        query.extend(("scope", scope) for scope in scopes)
        headers = {"Authorization": self.credentials.header()} if self.credentials else {}
        try:
            async with self.session.get(URL(realm).with_query(query), headers=headers) as answer:
                body = await answer.read()
                status = answer.status
        except aiohttp.ClientConnectionError as exc:
            raise RegistryError(f"cannot reach the token service {realm}: {exc}") from None
        if status in (401, 403):
            if self.credentials is None:
                raise self._needs_login()
            raise RegistryAuthError(
                f"registry {self.host} refused the login of {self.credentials.username!r}",
                host=self.host,
            )
        if status != 200:
            raise RegistryError(f"token service {realm}: {_error_text(status, body)}")
        try:
            data = json.loads(body)
            return str(data.get("token") or data["access_token"])
        except (ValueError, KeyError, AttributeError):
            raise RegistryError(f"token service {realm} answered without a token") from None

    # -- manifests ---------------------------------------------------------------------------

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str | None]:
        """The manifest's exact bytes and the digest the registry says they have."""
        path = f"/v2/{repository}/manifests/{reference}"
        async with self.request("GET", path, headers={"Accept": MANIFEST_ACCEPT}) as response:
            if response.status == 404:
                raise ModelNotFoundError(
                    f"'{repository}:{reference}' is not in registry {self.host}",
                    model=f"{self.host}/{repository}:{reference}",
                )
            if response.status != 200:
                raise await self._fail(response, f"give manifest {repository}:{reference}")
            body = await response.content.read(MAX_MANIFEST_BYTES + 1)
            if len(body) > MAX_MANIFEST_BYTES:
                raise RegistryError(f"manifest {repository}:{reference} is over 4 MiB")
            return body, response.headers.get("Docker-Content-Digest")

    async def put_manifest(self, repository: str, tag: str, data: bytes) -> str | None:
        path = f"/v2/{repository}/manifests/{tag}"
        headers = {"Content-Type": mediatypes.OCI_MANIFEST}
        async with self.request("PUT", path, data=data, headers=headers) as response:
            if response.status != 201:
                raise await self._fail(response, f"take manifest {repository}:{tag}")
            return response.headers.get("Docker-Content-Digest")

    # -- blobs -------------------------------------------------------------------------------

    async def blob_exists(self, repository: str, digest: str) -> bool:
        async with self.request("HEAD", f"/v2/{repository}/blobs/{digest}") as response:
            if response.status in (200, 404):
                return response.status == 200
            raise await self._fail(response, f"say whether it has blob {digest}")

    @asynccontextmanager
    async def open_blob(
        self, repository: str, digest: str, offset: int
    ) -> AsyncIterator[tuple[aiohttp.ClientResponse, int]]:
        """GET a blob from ``offset`` (a Range request); yields the response and where its
        body starts (0 when the registry ignored the Range and sends everything)."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        async with self.request("GET", f"/v2/{repository}/blobs/{digest}", headers=headers) as r:
            if r.status == 206:
                start = _content_range_start(r.headers.get("Content-Range", ""))
                if start != offset:
                    raise RegistryError(f"registry {self.host} answered a Range it was not asked")
                yield r, start
            elif r.status == 200:
                yield r, 0
            elif r.status == 404:
                raise RegistryError(f"registry {self.host} lists blob {digest} but lacks it")
            else:
                raise await self._fail(r, f"send blob {digest}")

    async def start_upload(
        self, repository: str, *, mount: str | None = None, mount_from: str | None = None
    ) -> URL | None:
        """Open an upload session; ``None`` when the registry mounted ``mount`` instead."""
        query = {"mount": mount, "from": mount_from} if mount and mount_from else {}
        path = f"/v2/{repository}/blobs/uploads/"
        async with self.request("POST", path, params=query) as response:
            if response.status == 201 and query:
                return None
            if response.status != 202:
                raise await self._fail(response, f"start an upload to {repository}")
            return self._url(response.headers["Location"])

    async def upload(
        self,
        location: URL,
        path: Path,
        digest: str,
        size: int,
        *,
        chunk_size: int,
        progress: Callable[[int], None],
    ) -> None:
        """Upload a file: one PUT when it fits ``chunk_size``, else PATCH chunks then PUT."""
        if size <= chunk_size:
            body = _read_file(path, 0, size, progress)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            url = location.update_query(digest=digest)
            async with self.request("PUT", url, data=body, headers=headers) as response:
                if response.status != 201:
                    raise await self._fail(response, f"take blob {digest}")
            return
        for start in range(0, size, chunk_size):
            length = min(chunk_size, size - start)
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(length),
                "Content-Range": f"{start}-{start + length - 1}",
            }
            body = _read_file(path, start, length, progress)
            async with self.request("PATCH", location, data=body, headers=headers) as response:
                if response.status != 202:
                    raise await self._fail(response, f"take a chunk of blob {digest}")
                location = self._url(response.headers["Location"])
        url = location.update_query(digest=digest)
        headers = {"Content-Length": "0"}
        async with self.request("PUT", url, headers=headers) as response:
            if response.status != 201:
                raise await self._fail(response, f"close the upload of blob {digest}")


def _content_range_start(header: str) -> int:
    match = re.match(r"bytes (\d+)-", header)
    return int(match.group(1)) if match else -1


async def _read_file(
    path: Path, start: int, length: int, progress: Callable[[int], None]
) -> AsyncIterator[bytes]:
    """Stream ``length`` bytes of ``path`` from ``start`` as an upload body."""
    with open(path, "rb") as handle:
        handle.seek(start)
        left = length
        while left:
            chunk = handle.read(min(UPLOAD_READ_SIZE, left))
            if not chunk:
                raise RegistryError(f"{path} shrank while it was uploaded")
            left -= len(chunk)
            progress(len(chunk))
            yield chunk
