"""A small client for the local daemon, for ``ps``, ``stop`` and ``run``.

The standard library's ``http.client`` keeps ``mlxctl`` start-up fast (no aiohttp import for a
one-off request); the daemon's address comes from the same settings the daemon reads.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from modelstore.errors import MlxserveError

PROBE_TIMEOUT_S = 0.3
REQUEST_TIMEOUT_S = 600.0


class DaemonUnavailableError(MlxserveError):
    code = "daemon_unavailable"


class DaemonError(MlxserveError):
    """An error the daemon answered; ``code`` is the daemon's own."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class DaemonClient:
    host: str
    port: int
    api_key: str | None = None

    @classmethod
    def from_environment(cls, address: str | None = None) -> DaemonClient:
        """The daemon the settings name (``MLXSERVE_HOST`` takes ``host:port``, as
        ``OLLAMA_HOST``), or ``address`` (``--host``) when given."""
        from mlxserve.server.config import load_settings

        settings = load_settings({"host": address} if address else None)
        host = "127.0.0.1" if settings.host in {"0.0.0.0", "::"} else settings.host
        return cls(host, settings.port, settings.api_key)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def is_up(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=PROBE_TIMEOUT_S):
                pass
        except OSError:
            return False
        try:
            return self.get("/api/health").get("status") == "ok"
        except MlxserveError:
            return False

    def _connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _send(self, method: str, path: str, body: Any = None) -> http.client.HTTPResponse:
        connection = self._connection()
        try:
            connection.request(
                method,
                path,
                body=json.dumps(body) if body is not None else None,
                headers=self._headers(),
            )
            response = connection.getresponse()
        except OSError as exc:
            raise DaemonUnavailableError(
                f"the daemon at {self.host}:{self.port} is not reachable ({exc}); "
                "start it with `mlxctl serve`"
            ) from None
        if response.status >= 400:
            payload = json.loads(response.read() or b"{}")
            raise DaemonError(
                payload.get("error", f"HTTP {response.status}"), payload.get("code", "daemon_error")
            )
        return response

    def get(self, path: str) -> Any:
        return json.loads(self._send("GET", path).read())

    def post(self, path: str, body: Any) -> Any:
        data = self._send("POST", path, {**body, "stream": False}).read()
        return json.loads(data) if data else None

    def stream(self, path: str, body: Any) -> Iterator[dict[str, Any]]:
        response = self._send("POST", path, body)
        for line in response:
            if line.strip():
                yield json.loads(line)
