"""``mlxserve`` (and ``mlxctl serve``): start the daemon."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from mlxserve.server.config import load_settings
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


@click.command("serve")
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
