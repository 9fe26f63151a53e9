"""``mlxserve`` (and ``mlxctl serve``): start the daemon."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys

import click

from mlxserve.server.config import ConfigError, load_settings
from modelstore.errors import MlxserveError


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
        ]
    ):
        function = option(function)
    return function


def run_daemon(**flags: object) -> None:
    from aiohttp import web

    from mlxserve.server.app import build_app

    settings = load_settings(flags)
    settings.check()
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(message)s",
        stream=sys.stderr,
    )
    require_free_port(settings.host, settings.port)
    app = build_app(settings)
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
    Example:
      mlxctl serve --port 11500
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
