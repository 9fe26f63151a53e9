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

from mlxctl.output import console, human_size, print_json, transfer_progress
from modelstore.hfhub import HF_SCHEME, HubModel, snapshot_source
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
@click.option("--name", "-n", help="Store an hf:// or ollama:// model under this name.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull_command(reference: str, insecure: bool, name: str | None, as_json: bool) -> None:
    """Pull a model from an OCI registry, Ollama's library or the Hugging Face hub.

    A bare name (llama3.2, qwen3:0.6b) comes from Ollama's library, ORG/REPO from the Hugging
    Face hub (then Ollama's library), HOST/... from that registry.

    \b
    Examples:
      mlxctl pull qwen3:0.6b
      mlxctl pull mlx-community/Qwen3-0.6B-4bit
      mlxctl pull registry.example.com/team/llama:8b-q4
      mlxctl pull --insecure 127.0.0.1:5000/team/llama:8b-q4
      mlxctl pull hf://mlx-community/SmolLM2-135M-Instruct
      mlxctl pull ollama://qwen3:0.6b
    """
    from mlxctl.names import fetch_first

    store = ModelStore()
    pulled: list[StoredModel] = []
    fetch_first(
        store,
        reference,
        lambda target, ref: pulled.append(pull_any(target, ref, name=name, insecure=insecure)),
        reuse_stored=False,
    )
    model = pulled[0]
    if as_json:
        print_json({"name": model.name, "digest": model.manifest_digest, "size": model.size})
    else:
        console.print(
            f"pulled [bold]{model.name}[/] ({human_size(model.size)}, {model.manifest_digest})"
        )


def pull_any(
    store: ModelStore, reference: str, *, name: str | None = None, insecure: bool = False
) -> StoredModel:
    """``hf://ORG/REPO[@REV]`` through the hub (cache first; MLX weights on Apple Silicon, one
    GGUF elsewhere, when the repo has both), ``ollama://`` from Ollama's registry, anything else
    from its registry."""
    if reference.startswith(HF_SCHEME):
        from mlxctl.hf_cache import import_snapshot
        from mlxserve.platform import is_apple_silicon

        hub_model = HubModel.parse(reference)
        source = snapshot_source(hub_model, prefer_gguf=not is_apple_silicon())
        target = name or hub_model.store_name()
        return import_snapshot(store, hub_model.repo_id, source, target).models[0]
    from modelstore.registry import pull_model
    from modelstore.registry.ollama import is_ollama_url, pull_ollama

    with layer_bars() as on_event:
        if is_ollama_url(reference):
            return asyncio.run(
                pull_ollama(store, reference, name=name, insecure=insecure, progress=on_event)
            )
        return asyncio.run(pull_model(store, reference, insecure=insecure, progress=on_event))


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
        result = asyncio.run(push_model(store, name, target, insecure=insecure, progress=on_event))
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
