"""Daemon commands: ``serve`` (start it), ``ps`` (what it has loaded), ``stop`` (unload).

``serve`` is the ``mlxserve`` command itself, so both take the same flags.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
from rich.table import Table

from mlxctl.client import DaemonClient
from mlxctl.output import console, human_size, print_json
from mlxserve.server.main import serve_command
from modelstore.errors import ModelNotFoundError

host_option = click.option(
    "--host",
    envvar="MLXSERVE_HOST",
    help="The daemon's address, host:port (default: MLXSERVE_HOST, else the config).",
)
FOREVER = "0001-01-01T00:00:00Z"
"""``expires_at`` of a model kept loaded forever (``keep_alive`` < 0), as Ollama sends it."""


def until(expires_at: str, now: datetime | None = None) -> str:
    """``expires_at`` as ``ollama ps`` shows it: "4 minutes from now", "Forever"."""
    if expires_at == FOREVER:
        return "Forever"
    moment = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    seconds = int((moment - (now or datetime.now(UTC))).total_seconds())
    if seconds <= 0:
        return "now"
    for unit, span in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= span:
            count = seconds // span
            return f"{count} {unit}{'s' if count != 1 else ''} from now"
    return "now"


@click.command("ps")
@click.option("--json", "as_json", is_flag=True)
@host_option
def ps_command(as_json: bool, host: str | None) -> None:
    """List the models the daemon has loaded: SIZE is the model's files, MEMORY what it holds
    loaded (weights, KV cache and its prompt cache's RAM tier)."""
    models = DaemonClient.from_environment(host).get("/api/ps")["models"]
    if as_json:
        print_json({"models": models})
        return
    table = Table(box=None, header_style="bold")
    columns = ("NAME", "ID", "SIZE", "MEMORY", "KV CACHE", "RUNNER", "CONTEXT", "ACTIVE", "UNTIL")
    for column in columns:
        table.add_column(column)
    for model in models:
        cache = model.get("kv_cache_bytes")
        memory = model.get("memory_bytes")
        table.add_row(
            model["name"],
            model["digest"][:12],
            human_size(model["size"]),
            human_size(memory) if memory else "-",
            human_size(cache) if cache else "-",
            model.get("runner", ""),
            str(model.get("context_length", "")),
            str(model.get("active", 0)),
            until(model["expires_at"]),
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
@host_option
def stop_command(model: str, host: str | None) -> None:
    """Unload a model from the daemon (keep_alive 0); a model it has not loaded is an error."""
    client = DaemonClient.from_environment(host)
    loaded = {m["name"] for m in client.get("/api/ps")["models"]}
    wanted = model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"
    if wanted not in loaded and model not in loaded:
        raise ModelNotFoundError(
            f"model '{model}' is not loaded (mlxctl ps lists what is: "
            f"{', '.join(sorted(loaded)) or 'nothing'})",
            model=model,
        )
    client.post("/api/generate", {"model": model, "keep_alive": 0})
    console.print(f"stopped {model}")


__all__ = ["ps_command", "serve_command", "stop_command"]
