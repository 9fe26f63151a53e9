"""``pull`` and ``push``: OCI registries and the Hugging Face hub.

Like the store commands they work on the store directly, with no daemon; aiohttp and
huggingface_hub are imported only inside the command that needs them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click
from rich.progress import TaskID

from mlxctl.output import byte_progress, console, human_size, print_json, transfer_progress
from modelstore.store import ModelStore, StoredModel

if TYPE_CHECKING:
    from modelstore.registry.session import ProgressEvent

insecure_option = click.option(
    "--insecure", is_flag=True, help="Talk plain HTTP (a registry on loopback without TLS)."
)


@contextmanager
def layer_bars() -> Iterator[Callable[[ProgressEvent], None]]:
    """One rich bar per layer (speed, ETA) fed by the pull/push progress events; status lines
    without a layer print as they come. Quiet when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield lambda event: None
        return
    tasks: dict[str, TaskID] = {}
    with transfer_progress(transient=False) as progress:

        def on_event(event: ProgressEvent) -> None:
            if event.digest is None:
                progress.console.print(event.status)
                return
            if event.digest not in tasks:
                tasks[event.digest] = progress.add_task(event.status, total=event.total)
            progress.update(tasks[event.digest], completed=event.completed or 0)

        yield on_event


@click.command("pull")
@click.argument("reference")
@insecure_option
@click.option("--name", "-n", help="Store an hf:// model under this name.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull_command(reference: str, insecure: bool, name: str | None, as_json: bool) -> None:
    """Pull a model from an OCI registry or the Hugging Face hub into the store.

    \b
    Examples:
      mlxctl pull registry.example.com/team/llama:8b-q4
      mlxctl pull --insecure 127.0.0.1:5000/team/llama:8b-q4
      mlxctl pull hf://mlx-community/SmolLM2-135M-Instruct
    """
    store = ModelStore()
    if reference.startswith("hf://"):
        model = _pull_from_hub(store, reference, name)
    else:
        from modelstore.registry import pull_model

        with layer_bars() as on_event:
            model = asyncio.run(
                pull_model(store, reference, insecure=insecure, progress=on_event)
            )
    if as_json:
        print_json({"name": model.name, "digest": model.manifest_digest, "size": model.size})
    else:
        console.print(
            f"pulled [bold]{model.name}[/] ({human_size(model.size)}, {model.manifest_digest})"
        )


def _pull_from_hub(store: ModelStore, reference: str, name: str | None) -> StoredModel:
    from modelstore.hfhub import HubModel, snapshot_folder
    from modelstore.importer import import_path, source_size

    hub_model = HubModel.parse(reference)
    folder = snapshot_folder(hub_model)
    with byte_progress(f"importing {hub_model.repo_id}", source_size(folder)) as progress:
        result = import_path(store, folder, name or hub_model.store_name(), progress=progress)
    return result.models[0]


def ensure_pulled(name: str, *, insecure: bool) -> str:
    """For ``run``: pull a registry or hub model the store lacks, as ``ollama run`` does;
    returns the name to run it under."""
    store = ModelStore()
    if name.startswith("hf://"):
        from modelstore.hfhub import HubModel

        stored_name = HubModel.parse(name).store_name()
        if not store.exists(stored_name):
            _pull_from_hub(store, name, None)
        return stored_name
    from modelstore.reference import parse_reference

    if parse_reference(name).host is None or store.exists(name):
        return name
    from modelstore.registry import pull_model

    with layer_bars() as on_event:
        asyncio.run(pull_model(store, name, insecure=insecure, progress=on_event))
    return name


@click.command("push")
@click.argument("name")
@click.argument("target", required=False)
@insecure_option
@click.option("--json", "as_json", is_flag=True, help="Print what was sent as JSON.")
def push_command(name: str, target: str | None, insecure: bool, as_json: bool) -> None:
    """Push a stored model to an OCI registry (TARGET defaults to NAME, which then must
    name the registry host).

    \b
    Examples:
      mlxctl push mymodel:1 registry.example.com/team/mymodel:1
      mlxctl push --insecure smollm2:135m 127.0.0.1:5000/library/smollm2:135m
    """
    from modelstore.registry import push_model

    store = ModelStore()
    with layer_bars() as on_event:
        result = asyncio.run(
            push_model(store, name, target, insecure=insecure, progress=on_event)
        )
    if as_json:
        print_json(
            {
                "digest": result.manifest_digest,
                "uploaded": result.uploaded,
                "present": result.present,
                "mounted": result.mounted,
            }
        )
        return
    console.print(
        f"pushed [bold]{target or name}[/] ({result.manifest_digest}): "
        f"{len(result.uploaded)} blob(s) uploaded, {len(result.present)} already there, "
        f"{len(result.mounted)} mounted"
    )
