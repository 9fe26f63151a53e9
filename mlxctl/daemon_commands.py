"""Daemon commands: ``serve`` (start it), ``ps`` (what it has loaded), ``stop`` (unload)."""

from __future__ import annotations

import click
from rich.table import Table

from mlxctl.client import DaemonClient
from mlxctl.output import console, human_size, print_json
from mlxserve.server.main import run_daemon, serve_options


@click.command("serve")
@serve_options
def serve_command(**flags: object) -> None:
    """Start the daemon (Ollama-compatible API at /api, OpenAI-compatible at /v1).

    \b
    Example:
      mlxctl serve --port 11500
    """
    run_daemon(**flags)


@click.command("ps")
@click.option("--json", "as_json", is_flag=True)
def ps_command(as_json: bool) -> None:
    """List the models the daemon has loaded."""
    models = DaemonClient.from_environment().get("/api/ps")["models"]
    if as_json:
        print_json({"models": models})
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "ID", "SIZE", "RUNNER", "CONTEXT", "ACTIVE", "UNTIL"):
        table.add_column(column)
    for model in models:
        table.add_row(model["name"], model["digest"][:12], human_size(model["size"]),
                      model.get("runner", ""), str(model.get("context_length", "")),
                      str(model.get("active", 0)), model["expires_at"])
    console.print(table)


@click.command("stop")
@click.argument("model")
def stop_command(model: str) -> None:
    """Unload a model from the daemon (keep_alive 0)."""
    DaemonClient.from_environment().post("/api/generate", {"model": model, "keep_alive": 0})
    console.print(f"stopped {model}")
