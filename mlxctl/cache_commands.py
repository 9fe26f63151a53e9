"""``mlxctl cache``: list and clear the prompt cache's disk tier (docs/STORE.md).

Works on the files under the store's home, daemon or not; a running daemon keeps what its
loaded models hold in RAM and writes again what they use next.
"""

from __future__ import annotations

from collections import defaultdict

import click
from rich.table import Table

from mlxctl.output import console, human_age, human_size, print_json
from mlxserve.runners.promptcache import entries, remove_entries
from modelstore.store import ModelStore

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def owners(store: ModelStore) -> dict[str, list[str]]:
    """Weights digest (hex) -> the models using those weights."""
    found: dict[str, list[str]] = defaultdict(list)
    for digest, names in store.referenced_blobs().items():
        found[digest.removeprefix("sha256:")] = sorted(set(names))
    return found


def weights_of(store: ModelStore, name: str) -> set[str]:
    model = store.resolve(name)
    return {d.removeprefix("sha256:") for d in model.manifest.blob_digests()}


@click.group("cache")
def cache_group() -> None:
    """The prompt cache on disk: prompts' KV kept across unloads and restarts.

    \b
    Examples:
      mlxctl cache list                  every entry, with its model and size
      mlxctl cache clear smollm2:135m    remove one model's entries
      mlxctl cache clear --all           remove every entry
    """


@cache_group.command("list")
@click.argument("model", required=False)
@json_option
def list_command(model: str | None, as_json: bool) -> None:
    """List cached prompts (all, or one MODEL's)."""
    store = ModelStore()
    users = owners(store)
    wanted = weights_of(store, model) if model else None
    rows = [
        {**entry, "models": users.get(entry["weights"], [])}
        for entry in entries(store.prompt_cache_dir)
        if wanted is None or entry["weights"] in wanted
    ]
    if as_json:
        print_json({"entries": rows, "bytes": sum(r["bytes"] for r in rows)})
        return
    table = Table("MODEL", "ENTRY", "SIZE", "USED")
    for row in rows:
        table.add_row(
            ", ".join(row["models"]) or "(removed model)",
            row["entry"][:12],
            human_size(row["bytes"]),
            human_age(row["modified"]),
        )
    console.print(table if rows else "the prompt cache is empty")


@cache_group.command("clear")
@click.argument("model", required=False)
@click.option("--all", "everything", is_flag=True, help="Remove every model's entries.")
@json_option
def clear_command(model: str | None, everything: bool, as_json: bool) -> None:
    """Remove the cached prompts of MODEL, or of every model with --all."""
    if bool(model) == everything:
        raise click.UsageError("name a model or pass --all")
    store = ModelStore()
    wanted = weights_of(store, model) if model else None
    files, freed = remove_entries(
        store.prompt_cache_dir, keep=lambda weights: wanted is not None and weights not in wanted
    )
    if as_json:
        print_json({"removed": files, "freed_bytes": freed})
    else:
        console.print(f"removed {files} cached prompt(s), freed {human_size(freed)}")
