"""Start or join an ``mx.distributed`` group from mlx's own hostfile.

The hostfile is the JSON that ``mlx.distributed_config`` writes and ``mlx.launch --hostfile``
reads (parsed here by mlx's own ``Hostfile``): ``{"backend": ..., "envs": [...], "hosts":
[{"ssh": ..., "ips": [...], "rdma": [...]}, ...]}``, one host per rank, in rank order.

``mlx.launch`` starts every rank over ssh and hands each its wiring in environment variables;
``mlxserve --distributed`` is instead started on each machine by hand (or by launchd/systemd),
so this module derives the same variables from the hostfile, the way ``mlx.launch`` does, and
then calls ``mx.distributed.init``. A rank started by ``mlx.launch`` keeps the variables it was
given. No transport of our own: everything after ``init`` is mlx's collectives.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxserve import platform
from mlxserve.errors import DistributedError

BACKENDS = ("ring", "jaccl", "mpi", "any")
JACCL_RING = "jaccl-ring"
"""A hostfile's backend for JACCL over a ring of cables (``mlx.distributed_config`` writes it):
mlx's ``jaccl`` backend with ``MLX_JACCL_RING=1``, as ``mlx.launch`` starts it."""
DEFAULT_RING_PORT = 32323
"""``mlx.launch``'s ``--starting-port``: rank r listens on the next port per IP after rank r-1."""


@dataclass(frozen=True)
class GroupPlan:
    """Who is who in the group, before it starts."""

    hosts: list[str]
    """Each rank's host name (the hostfile's ``ssh``), for messages and ``/api/ps``."""
    rank: int
    backend: str


@dataclass
class Group:
    """A started group: mlx's ``Group`` plus the names of its hosts."""

    group: Any
    plan: GroupPlan

    @property
    def rank(self) -> int:
        return int(self.group.rank())

    @property
    def size(self) -> int:
        return int(self.group.size())

    def host(self, rank: int) -> str:
        return self.plan.hosts[rank]

    def sever(self) -> int:
        """Shut down this rank's ring sockets, so that a collective waiting on a hung peer
        fails ("connection to a peer was lost") instead of waiting forever; returns how many.

        mlx has no way to cancel a collective or close a group, and one left pending holds the
        group's engine thread (other models never wait on it: ``platform.hold_mlx_cache``).
        The ring's sockets are the ones bound to, or connected to, the addresses in
        ``MLX_HOSTFILE``; other backends have none to find here (0).
        """
        ring = os.environ.get("MLX_HOSTFILE")
        if not ring:
            return 0
        try:
            nodes = json.loads(Path(ring).read_text())
        except (OSError, ValueError):
            return 0
        addresses = set()
        for node in nodes:
            for address in node:
                host, _, port = address.rpartition(":")
                addresses.add((host, int(port)))
        severed = 0
        for fd in os.listdir("/proc/self/fd") if Path("/proc/self/fd").is_dir() else ():
            severed += _shut_down_if_ring(int(fd), addresses)
        return severed


def _shut_down_if_ring(fd: int, addresses: set[tuple[str, int]]) -> int:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return 0
    with sock:
        try:
            if sock.family != socket.AF_INET:
                return 0
            ends = {sock.getsockname()}
            with contextlib.suppress(OSError):
                ends.add(sock.getpeername())
            if not ends & addresses:
                return 0
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return 0
    return 1


def read_hostfile(path: Path) -> Any:
    """mlx's parser for its own format.

    Kept rather than parsing the JSON ourselves: the format is mlx's (``mlx.distributed_config``
    writes it, ``mlx.launch`` reads it with this class), so mlx's own reader follows any change
    to it, where a copy of ours would drift. It is a private module (mlx exposes no public
    parser), hence the guarded import: if it moves, a clear error instead of a crash.
    """
    try:
        from mlx._distributed_utils.common import Hostfile
    except ImportError as exc:
        raise DistributedError(
            f"this mlx has no hostfile parser at mlx._distributed_utils.common ({exc}); "
            "install the mlx version pinned by mlxserve"
        ) from None

    try:
        hostfile = Hostfile.from_file(str(path))
    except ValueError as exc:
        raise DistributedError(str(exc)) from None
    if len(hostfile.hosts) < 2:
        raise DistributedError(f"{path}: a group needs at least two hosts")
    return hostfile


def local_rank(hostfile: Any, rank: int | None) -> int:
    """``--rank``, else ``MLX_RANK`` (set by ``mlx.launch``), else the one host entry that
    names this machine."""
    if rank is None and os.environ.get("MLX_RANK"):
        rank = int(os.environ["MLX_RANK"])
    if rank is None:
        names = {socket.gethostname(), socket.getfqdn()}
        matches = [h.rank for h in hostfile.hosts if h.ssh_hostname in names]
        if len(matches) != 1:
            raise DistributedError(
                f"cannot tell which host of the hostfile this machine is ({socket.gethostname()}"
                f" matches {len(matches)} entries): pass --rank"
            )
        rank = matches[0]
    if not 0 <= rank < len(hostfile.hosts):
        raise DistributedError(f"rank {rank} is not in the hostfile (0..{len(hostfile.hosts) - 1})")
    return rank


def _write_temp(content: str) -> str:
    handle, path = tempfile.mkstemp(prefix="mlxserve-group-", suffix=".json")
    with os.fdopen(handle, "w") as file:
        file.write(content)
    return path


def wire_environment(hostfile: Any, rank: int, backend: str, ring_port: int) -> dict[str, str]:
    """The variables ``mlx.launch`` would give this rank (``launch_ring``/``launch_jaccl``);
    written out here because mlx sets them only inside its ssh launcher."""
    env = dict(e.split("=", 1) for e in hostfile.envs if "=" in e)
    env["MLX_RANK"] = str(rank)
    hosts = hostfile.hosts
    if backend == "ring":
        if any(not h.ips for h in hosts):
            raise DistributedError("the ring backend needs every host's IPs in the hostfile")
        port, ring = ring_port, []
        for host in hosts:
            ring.append([f"{ip}:{port + i}" for i, ip in enumerate(host.ips)])
            port += len(host.ips)
        env["MLX_HOSTFILE"] = _write_temp(json.dumps(ring))
    elif backend == "jaccl":
        if not hosts[0].ips:
            raise DistributedError("the jaccl backend needs rank 0's IP in the hostfile")
        env["MLX_JACCL_COORDINATOR"] = f"{hosts[0].ips[0]}:{ring_port}"
        env["MLX_IBV_DEVICES"] = _write_temp(json.dumps([h.rdma for h in hosts]))
    return env


def start_group(
    hostfile_path: Path, backend: str | None, rank: int | None, ring_port: int = DEFAULT_RING_PORT
) -> Group:
    """Join the group this machine belongs to; returns once every rank has joined."""
    import mlx.core as mx

    hostfile = read_hostfile(hostfile_path)
    backend = backend or hostfile.backend or "ring"
    if backend == JACCL_RING:
        backend = "jaccl"
        os.environ.setdefault("MLX_JACCL_RING", "1")
    if backend not in BACKENDS:
        raise DistributedError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    rank = local_rank(hostfile, rank)
    launched = "MLX_HOSTFILE" in os.environ or "MLX_JACCL_COORDINATOR" in os.environ
    if backend != "mpi" and not launched:
        wiring = wire_environment(
            hostfile, rank, "ring" if backend == "any" else backend, ring_port
        )
        os.environ.update(wiring)
    plan = GroupPlan([h.ssh_hostname for h in hostfile.hosts], rank, backend)
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as exc:
        raise DistributedError(f"cannot start the {backend} group: {exc}") from None
    platform.hold_mlx_cache(mx)
    if group.size() != len(hostfile.hosts) or group.rank() != rank:
        raise DistributedError(
            f"the {backend} group has {group.size()} ranks (this is rank {group.rank()}); the "
            f"hostfile lists {len(hostfile.hosts)} hosts and this machine as rank {rank}"
        )
    return Group(group, plan)
