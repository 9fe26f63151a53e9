"""Registry logins, read from a Docker-style ``config.json``.

The file is ``$MLXSERVE_REGISTRY_AUTH_FILE`` if set, else ``$DOCKER_CONFIG/config.json``, else
``~/.docker/config.json``: teams already log in with ``docker login`` / ``oras login``, and
reusing that file means no second place to keep passwords. Credential helpers
(``credsStore``) are not run; a host that needs one gets a clear "needs a login" error.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from modelstore.errors import RegistryAuthError

AUTH_FILE_ENV = "MLXSERVE_REGISTRY_AUTH_FILE"


@dataclass(frozen=True)
class BasicCredentials:
    username: str
    password: str

    def header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"


def auth_file() -> Path:
    if explicit := os.environ.get(AUTH_FILE_ENV):
        return Path(explicit).expanduser()
    docker_dir = os.environ.get("DOCKER_CONFIG")
    return Path(docker_dir or Path.home() / ".docker") / "config.json"


def _decode_entry(host: str, entry: object) -> BasicCredentials | None:
    if not isinstance(entry, dict):
        return None
    if entry.get("username") and entry.get("password"):
        return BasicCredentials(str(entry["username"]), str(entry["password"]))
    encoded = entry.get("auth")
    if not isinstance(encoded, str) or not encoded:
        return None
    try:
        username, sep, password = base64.b64decode(encoded).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise RegistryAuthError(f"the login for {host} in {auth_file()} is not base64") from None
    return BasicCredentials(username, password) if sep else None


def load_credentials(host: str) -> BasicCredentials | None:
    """The login stored for ``host`` (``host``, ``http://host`` or ``https://host`` keys)."""
    path = auth_file()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryAuthError(f"cannot read registry logins from {path}: {exc}") from None
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        return None
    for key in (host, f"https://{host}", f"http://{host}"):
        if key in auths:
            return _decode_entry(host, auths[key])
    return None
