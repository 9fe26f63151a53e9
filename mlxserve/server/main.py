"""``mlxserve`` (and ``mlxctl serve``): start the daemon."""

from __future__ import annotations

import asyncio
import errno
import faulthandler
import logging
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mlxserve.distributed.group import BACKENDS, DEFAULT_RING_PORT
from mlxserve.server.config import (
    SETTINGS,
    ConfigError,
    flag_name,
    load_settings,
    setting_help,
    setting_kind,
)
from modelstore.errors import MlxserveError
from modelstore.store import ModelStore

if TYPE_CHECKING:
    from mlxserve.server.distributed import DistributedOptions


def setting_options() -> list[Any]:
    """One option per daemon setting, derived from its declaration (``config.Settings``): the
    help line names its environment variable and its default."""
    options = []
    for name, spec in SETTINGS.items():
        if not spec.metadata["flag"]:
            continue
        kind = setting_kind(name)
        if kind is bool:  # a switch: --webui/--no-webui, unset (None) unless given
            options.append(
                click.option(flag_name(name), name, default=None, help=setting_help(name))
            )
            continue
        options.append(
            click.option(
                flag_name(name),
                name,
                type=kind if kind in (int, float) else str,
                help=setting_help(name),
            )
        )
    return options


def serve_options(function):  # type: ignore[no-untyped-def]
    for option in reversed(
        [
            *setting_options(),
            click.option(
                "--distributed",
                "hostfile",
                type=click.Path(dir_okay=False),
                help="Serve --model sharded over the hosts of this mlx hostfile "
                "(docs/DISTRIBUTED.md); start it on every host.",
            ),
            click.option(
                "--model", "group_model", help="With --distributed: the model the group serves."
            ),
            click.option(
                "--backend",
                type=click.Choice(BACKENDS),
                help="With --distributed: mx.distributed backend (default: the "
                "hostfile's, else ring).",
            ),
            click.option(
                "--rank",
                type=int,
                help="With --distributed: this host's rank (default: MLX_RANK, else "
                "the hostfile entry naming this machine).",
            ),
            click.option(
                "--pipeline",
                is_flag=True,
                default=None,
                help="With --distributed: pipeline instead of tensor parallelism.",
            ),
            click.option(
                "--ring-port",
                type=int,
                help="With --distributed: the ring backend's first port (default "
                f"{DEFAULT_RING_PORT}, as mlx.launch).",
            ),
        ]
    ):
        function = option(function)
    return function


def distributed_options(flags: dict[str, Any]) -> DistributedOptions | None:
    """Take the ``--distributed`` flags out of ``flags`` (they are not daemon settings)."""
    from mlxserve.server.distributed import DistributedOptions

    hostfile = flags.pop("hostfile", None)
    group = {
        key: flags.pop(key, None)
        for key in ("group_model", "backend", "rank", "pipeline", "ring_port")
    }
    if hostfile is None:
        if any(value is not None for value in group.values()):
            raise ConfigError(
                "--model, --backend, --rank, --pipeline and --ring-port go with "
                "--distributed HOSTFILE"
            )
        return None
    if not group["group_model"]:
        raise ConfigError("--distributed needs --model: the model the group serves")
    return DistributedOptions(
        hostfile=Path(str(hostfile)),
        model=str(group["group_model"]),
        backend=group["backend"],
        rank=group["rank"],
        pipeline=bool(group["pipeline"]),
        ring_port=group["ring_port"] or DEFAULT_RING_PORT,
    )


def run_daemon(**flags: Any) -> None:
    from aiohttp import web

    from mlxserve.server.app import build_app

    group_options = distributed_options(flags)
    settings = load_settings(flags)
    settings.check()
    ModelStore(settings.home).check(write=True)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(message)s",
        stream=sys.stderr,
    )
    if group_options is not None:
        from mlxserve.server import distributed

        group = distributed.join(settings, group_options)
        if group.rank > 0:  # the engine only: no HTTP, no port
            distributed.follow(group, settings, group_options)
            return
    require_free_port(settings.host, settings.port)
    app = build_app(settings)
    if group_options is not None:
        app.cleanup_ctx.append(distributed.group_context(group, settings, group_options))
    print(
        f"mlxserve listening on http://{settings.host}:{settings.port}", file=sys.stderr, flush=True
    )
    app.on_shutdown.append(arm_exit_deadline)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=None,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=SHUTDOWN_GRACE_S,
    )


SHUTDOWN_GRACE_S = 2.0
"""After SIGTERM/SIGINT, how long in-flight requests may finish before they are cancelled."""
SHUTDOWN_DEADLINE_S = 4.0
"""After SIGTERM/SIGINT, the process is gone by then whatever still runs (a generation in a
native library, a model load, a thread that ignores cancellation). The store needs no
teardown: a blob or manifest appears only by an atomic rename, so a write cut short leaves at
most a file in its ``tmp/`` that the next ``gc`` removes."""


async def arm_exit_deadline(app: object) -> None:
    """``on_shutdown``: end the process at ``SHUTDOWN_DEADLINE_S`` whatever still runs.

    faulthandler's watchdog is a C thread: it fires even while a native call holds the GIL,
    where a Python timer thread would wait with everything else. What was still running is
    written to the log (every thread's stack), and the exit status is 1."""
    faulthandler.dump_traceback_later(SHUTDOWN_DEADLINE_S, exit=True, file=sys.stderr)


class AddressInUseError(MlxserveError):
    code = "address_in_use"


def require_free_port(host: str, port: int) -> None:
    """Bind once, as aiohttp will (``SO_REUSEADDR``), before saying "listening": a port in use
    is one clear line and exit 1, never a traceback after a "listening" line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot bind to {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(f"cannot bind to {host}:{port}: {exc.strerror}") from None
            raise AddressInUseError(
                f"port {port} on {host} is already in use (another mlxserve? see "
                f"`mlxctl ps`, or `lsof -i :{port}`); pick another with --port or "
                "MLXSERVE_PORT"
            ) from None


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@serve_options
def serve_command(**flags: object) -> None:
    """Start the daemon (Ollama-compatible API at /api, OpenAI-compatible at /v1).

    \b
    Examples:
      mlxctl serve --port 11500
      mlxctl serve --distributed hosts.json --model qwen3:30b   (on every host of hosts.json)
    """
    run_daemon(**flags)


def main() -> None:
    from mlxserve.platform import exit_process

    code = 0
    try:
        serve_command.main(standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except MlxserveError as exc:
        click.echo(f"Error [{exc.code}]: {exc.message}", err=True)
        code = 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        code = 0
    exit_process(code)
