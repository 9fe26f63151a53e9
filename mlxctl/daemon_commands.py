"""Daemon commands: ``serve`` (start it), ``ps`` (what it has loaded), ``stop`` (unload).

``serve`` is the ``mlxserve`` command itself, so both take the same flags.
"""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from mlxctl.client import DaemonClient
from mlxctl.output import console, human_size, print_json
from mlxserve.server.main import serve_command


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
        table.add_row(
            model["name"],
            model["digest"][:12],
            human_size(model["size"]),
            model.get("runner", ""),
            str(model.get("context_length", "")),
            str(model.get("active", 0)),
            model["expires_at"],
        )
    console.print(table)
    for model in models:
        if "distributed" in model:
            print_group(model["name"], model["distributed"])


def print_group(name: str, group: dict[str, Any]) -> None:
    """The hosts a distributed model runs on, one line per rank, and the group's health."""
    status = group.get("status", "ok")
    if group.get("error"):
        status = f"{status}: {group['error']}"
    console.print(
        f"{name}: {len(group['ranks'])} ranks, {group['backend']} backend, "
        f"{group['mode']} parallel, {status}",
        markup=False,
    )
    for rank in group["ranks"]:
        console.print(
            f"  rank {rank['rank']}  {rank['host']}  {human_size(rank['memory_bytes'])}",
            markup=False,
        )


@click.command("stop")
@click.argument("model")
def stop_command(model: str) -> None:
    """Unload a model from the daemon (keep_alive 0)."""
    DaemonClient.from_environment().post("/api/generate", {"model": model, "keep_alive": 0})
    console.print(f"stopped {model}")


__all__ = ["ps_command", "serve_command", "stop_command"]
