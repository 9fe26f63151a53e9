"""``mlxserve`` (and ``mlxctl serve``): start the daemon."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mlxserve.distributed.group import BACKENDS, DEFAULT_RING_PORT
from mlxserve.server.config import ConfigError, load_settings
from modelstore.errors import MlxserveError

if TYPE_CHECKING:
    from mlxserve.distributed.serve import DistributedOptions


def serve_options(function):  # type: ignore[no-untyped-def]
    for option in reversed(
        [
            click.option("--host", help="Address to bind (default 127.0.0.1)."),
            click.option("--port", type=int, help="Port (default 11500)."),
            click.option("--api-key", help="Required for any non-loopback bind."),
            click.option("--keep-alive", help="How long idle models stay loaded (e.g. 5m)."),
            click.option("--max-loaded-models", type=int),
            click.option("--num-parallel", type=int, help="Parallel slots per model."),
            click.option("--max-queue", type=int, help="Waiting requests per model before 429."),
            click.option(
                "--webui/--no-webui",
                default=None,
                help="Serve the chat and dashboard page at / to browsers (default: on).",
            ),
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
    from mlxserve.distributed.serve import DistributedOptions

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

    distributed = distributed_options(flags)
    settings = load_settings(flags)
    settings.check()
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(message)s",
        stream=sys.stderr,
    )
    if distributed is not None:
        from mlxserve.distributed import serve

        group = serve.join(settings, distributed)
        if group.rank > 0:  # the engine only: no HTTP, no port
            serve.follow(group, settings, distributed)
            return
    require_free_port(settings.host, settings.port)
    app = build_app(settings)
    if distributed is not None:
        app.cleanup_ctx.append(serve.group_context(group, settings, distributed))
    print(
        f"mlxserve listening on http://{settings.host}:{settings.port}", file=sys.stderr, flush=True
    )
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=None,
        handler_cancellation=True,
        access_log=None,
    )


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
