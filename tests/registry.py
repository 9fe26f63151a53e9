"""Start a real OCI registry (Debian's ``docker-registry``, distribution 2.8) on loopback."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.daemon import free_port

START_TIMEOUT_S = 30.0


def registry_binary() -> str | None:
    return shutil.which("docker-registry") or shutil.which("registry")


def write_htpasswd(path: Path, username: str, password: str) -> Path:
    import bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"{username}:{hashed}\n")
    return path


@dataclass
class Registry:
    """One registry process with its data in ``root``; ``htpasswd`` turns on Basic auth."""

    root: Path
    htpasswd: Path | None = None
    auth_config: str = ""
    """A YAML ``auth:`` section of its own (the token flow: ``tests/token_server.py``)."""
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def blob_data(self, digest: str) -> Path:
        """Where distribution's filesystem driver keeps a blob's bytes."""
        hex_digits = digest.removeprefix("sha256:")
        return (
            self.data_dir / "docker/registry/v2/blobs/sha256" / hex_digits[:2] / hex_digits / "data"
        )

    def start(self) -> Registry:
        binary = registry_binary()
        assert binary, "docker-registry is not installed"
        self.port = free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        auth = self.auth_config
        if self.htpasswd:
            auth = f"auth:\n  htpasswd:\n    realm: mlxserve-test\n    path: {self.htpasswd}\n"
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.data_dir}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n" + auth
        )
        self.process = subprocess.Popen(
            [binary, "serve", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "registry.log", "wb"),  # noqa: SIM115 - the process owns it
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError((self.root / "registry.log").read_text())
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self  # 401: up, and asking for a login
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("registry did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
