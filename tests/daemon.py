"""Start the real daemon (``mlxserve``) on a free loopback port, for tests and benches."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

MLXSERVE = str(Path(sys.executable).with_name("mlxserve"))
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RING_PORTS = range(20000, 32000, 2)
"""Below Linux's ephemeral range (32768+): a port there is not handed out to some client
connection between our check and the ring's bind."""


def free_ring_port(ranks: int = 2) -> int:
    """A first port for ``--ring-port`` with the next ``ranks - 1`` free too (mlx's ring binds
    one port per rank, consecutively)."""
    for base in random.sample(RING_PORTS, len(RING_PORTS)):
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + ranks):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ring ports")


@dataclass
class Daemon:
    home: Path
    flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Daemon:
        self.port = free_port()
        self.log_path = self.home.parent / f"daemon-{self.port}.log"
        env = {**os.environ, "MLXSERVE_HOME": str(self.home), **self.env}
        self.process = subprocess.Popen(
            [MLXSERVE, "--port", str(self.port), *self.flags],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_path, "wb"),  # noqa: SIM115 - the process owns it
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/health", timeout=1) as response:
                    if json.loads(response.read())["status"] == "ok":
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"daemon did not start: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
