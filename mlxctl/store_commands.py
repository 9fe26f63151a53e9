"""Store commands: ``import``, ``list``, ``show``, ``rm``, ``cp``, ``verify``, ``gc``.

They work on the store directly (no daemon) and import nothing heavier than ``gguf``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from mlxctl.import_report import report_import, short_digest
from mlxctl.output import byte_progress, console, human_age, human_size, print_json
from modelstore import mediatypes
from modelstore.draft import GENERATED_LAYERS, ModelConfig
from modelstore.runtime import template_in_use
from modelstore.store import ModelStore, StoredModel
from modelstore.templates import template_warning

if TYPE_CHECKING:
    pass

EXIT_VERIFY_FAILED = 1
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.command("import")
@click.argument("path", required=False)
@click.option("--name", "-n", help="Name to store it under (an archive names itself).")
@click.option(
    "--copy", "force_copy", is_flag=True, help="Copy files even where a clone or link would do."
)
@click.option(
    "--link",
    "hard_link",
    is_flag=True,
    help="Hard-link files (no copy; editing the source then changes the stored model).",
)
@click.option(
    "--from-hf-cache",
    "from_hf_cache",
    is_flag=True,
    help="PATH is ORG/REPO[@REVISION] in the local Hugging Face cache; no PATH lists the cache.",
)
@click.option(
    "--from-ollama",
    "from_ollama",
    is_flag=True,
    help="PATH is NAME[:TAG] in Ollama's store ($OLLAMA_MODELS); no PATH lists the store.",
)
@click.option(
    "--from-lmstudio",
    "from_lmstudio",
    is_flag=True,
    help="PATH is PUBLISHER/REPO[/FILE.gguf] in LM Studio's models folder ($LMSTUDIO_MODELS).",
)
@click.option(
    "--no-trial",
    "untried",
    is_flag=True,
    help="Store a GGUF without trying to load it here (a model meant for another machine or "
    "a newer llama.cpp); by default one that cannot load is refused.",
)
@click.option("--all", "import_all", is_flag=True, help="With --from-*: import every model.")
@click.option("--dry-run", is_flag=True, help="With --from-*: list what would be imported.")
@json_option
def import_command(
    path: str | None,
    name: str | None,
    force_copy: bool,
    hard_link: bool,
    from_hf_cache: bool,
    from_ollama: bool,
    from_lmstudio: bool,
    untried: bool,
    import_all: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Add a model to the store: an HF-style folder, a .gguf file or a packed archive.

    Files are cloned copy-on-write where the file system can (APFS, btrfs, XFS), else copied;
    --link hard-links them instead. The output says which each file got.

    \b
    Examples:
      mlxctl import ./Qwen2.5-0.5B-Instruct --name qwen2.5:0.5b
      mlxctl import ./model.Q4_0.gguf --name mymodel:q4
      mlxctl import smollm2.tar
      mlxctl import --from-hf-cache                       what the HF cache holds
      mlxctl import --from-hf-cache mlx-community/SmolLM2-135M-Instruct
      mlxctl import --from-ollama                         what Ollama holds
      mlxctl import --from-ollama llama3.2:1b
      mlxctl import --from-ollama --all --dry-run --json
      mlxctl import --from-lmstudio lmstudio-community/Qwen3-4B-GGUF
    """
    from mlxserve.runners.trial import loads_check
    from modelstore.importer import import_path, source_size

    store = ModelStore()
    check = None if untried else loads_check(store)
    if from_ollama or from_lmstudio:
        from mlxctl.foreign_stores import import_foreign

        import_foreign(
            "ollama" if from_ollama else "lmstudio",
            store,
            path,
            name,
            import_all=import_all,
            dry_run=dry_run,
            as_json=as_json,
            allow_link=not force_copy,
            check=check,
        )
        return
    if from_hf_cache:
        from mlxctl.hf_cache import import_from_hf_cache

        import_from_hf_cache(store, path, name, import_all=import_all, as_json=as_json, check=check)
        return
    if path is None:
        raise click.UsageError("give a PATH to import (or --from-hf-cache)")
    source = Path(path)
    with byte_progress(f"importing {source.name}", source_size(source)) as progress:
        result = import_path(
            store,
            source,
            name,
            allow_link=hard_link and not force_copy,
            allow_clone=not force_copy,
            progress=progress,
            check=check,
        )
    report_import(result, as_json)


def _summary(
    store: ModelStore, model: StoredModel, config: ModelConfig | None = None
) -> dict[str, Any]:
    config = config or store.config(model)
    return {
        "name": model.name,
        "digest": model.manifest_digest,
        "size": model.size,
        "format": config.format,
        "architecture": config.architecture,
        "quantization": config.quantization,
        "modified_at": model.modified,
    }


@click.command("list")
@json_option
def list_command(as_json: bool) -> None:
    """List the models in the store."""
    store = ModelStore()
    rows = [_summary(store, model) for model in store.list()]
    if as_json:
        print_json({"models": rows})
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "ID", "SIZE", "FORMAT", "QUANT", "MODIFIED"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"],
            short_digest(row["digest"]),
            human_size(row["size"]),
            row["format"],
            row["quantization"] or "",
            human_age(row["modified_at"]),
        )
    console.print(table)
    if not rows:
        click.echo(
            f"The store {store.root} holds no models yet (mlxctl pull NAME or mlxctl import PATH).",
            err=True,
        )


def _show_data(store: ModelStore, model: StoredModel) -> dict[str, Any]:
    import json

    config = store.config(model)
    data = _summary(store, model, config)
    data.update(
        context_length=config.context_length,
        parameter_count=config.parameter_count,
        description=config.description,
        license=config.license,
        source=config.source,
        draft_model=config.draft_model,
    )
    params = store.text_layer(model, mediatypes.PARAMS)
    data["parameters"] = json.loads(params) if params else {}
    data["system"] = store.text_layer(model, mediatypes.SYSTEM_PROMPT)
    data["template"] = template_in_use(store, model, config)
    data["template_source"] = config.template_source
    warning = template_warning(config.template_source)
    data["warnings"] = [warning] if warning else []
    layers = []
    for layer in model.manifest.layers:
        path = store.blobs.path(layer.digest)
        links = path.stat().st_nlink if path.exists() else 0
        layers.append(
            {
                "title": layer.title,
                "media_type": layer.media_type,
                "digest": layer.digest,
                "size": layer.size,
                "storage": "hardlink" if links > 1 else ("missing" if links == 0 else "copy"),
            }
        )
    data["layers"] = layers
    return data


@click.command("show")
@click.argument("name")
@json_option
def show_command(name: str, as_json: bool) -> None:
    """Show a model's details, parameters and files (and whether each is a hard link)."""
    store = ModelStore()
    data = _show_data(store, store.resolve(name))
    if as_json:
        print_json(data)
        return
    facts = Table(box=None, show_header=False)
    facts.add_column(style="bold")
    facts.add_column()
    for key in (
        "name",
        "digest",
        "format",
        "architecture",
        "quantization",
        "parameter_count",
        "context_length",
        "draft_model",
        "license",
        "description",
    ):
        if data.get(key) is not None:
            facts.add_row(key.replace("_", " "), str(data[key]))
    facts.add_row("size", human_size(data["size"]))
    console.print(facts)
    if data["parameters"]:
        console.print("\n[bold]parameters[/]")
        for key, value in data["parameters"].items():
            console.print(f"  {key:<20} {value}")
    if data["system"]:
        console.print(f"\n[bold]system[/]\n  {data['system']}")
    for warning in data["warnings"]:
        console.print(f"\n[yellow]warning:[/] {warning}")
    if data["template_source"] and data["template"]:
        console.print("\n[bold]template (inferred)[/]")
        console.print(data["template"], markup=False, highlight=False)
    files = Table(box=None, header_style="bold", title="files", title_justify="left")
    for column in ("FILE", "TYPE", "SIZE", "STORED AS", "DIGEST"):
        files.add_column(column)
    generated = set(GENERATED_LAYERS.values())
    for layer in data["layers"]:
        kind = layer["media_type"].removeprefix("application/vnd.mlxserve.model.")
        origin = (
            "inferred" if data["template_source"] and kind.startswith("template") else "from spec"
        )
        title = layer["title"] + (f" ({origin})" if layer["title"] in generated else "")
        files.add_row(
            title, kind, human_size(layer["size"]), layer["storage"], short_digest(layer["digest"])
        )
    console.print()
    console.print(files)


@click.command("rm")
@click.argument("names", nargs=-1, required=True)
def rm_command(names: tuple[str, ...]) -> None:
    """Remove models (their blobs stay until `mlxctl gc` if nothing else uses them)."""
    store = ModelStore()
    for name in names:
        model = store.remove(name)
        console.print(f"deleted '{model.name}'")


@click.command("cp")
@click.argument("source")
@click.argument("target")
def cp_command(source: str, target: str) -> None:
    """Give a model another name (no blob is copied)."""
    model = ModelStore().copy(source, target)
    console.print(f"copied '{source}' to '{model.name}'")


@click.command("verify")
@json_option
def verify_command(as_json: bool) -> None:
    """Re-hash every blob; exit 1 and name each bad blob and the models it breaks."""
    store = ModelStore()
    total = sum(store.blobs.size(d) for d in store.referenced_blobs() if store.blobs.exists(d))
    with byte_progress("verifying", total) as progress:
        problems = store.verify((lambda _d, n: progress(n)) if progress else None)
    if as_json:
        print_json({"ok": not problems, "problems": [p.__dict__ for p in problems]})
    elif problems:
        for problem in problems:
            click.echo(bad_blob_line(store, problem), err=True)
    else:
        console.print(f"ok: every blob matches its digest ({human_size(total)} checked)")
    if problems:
        sys.exit(EXIT_VERIFY_FAILED)


def bad_blob_line(store: ModelStore, problem: Any) -> str:
    """One bad blob: its file, which file of which model it is, and how to get a good copy."""
    titles = sorted(
        {
            layer.title or layer.media_type
            for name in problem.models
            for layer in store.resolve(name).manifest.layers
            if layer.digest == problem.digest
        }
    )
    path = store.blobs.path(problem.digest)
    linked = path.is_file() and path.stat().st_nlink > 1
    cause = " (hard-linked: its source was edited in place)" if linked else ""
    models = ", ".join(problem.models)
    return (
        f"BAD {problem.digest} ({path}): {problem.problem}{cause}; it is "
        f"{', '.join(titles) or 'a blob'} of "
        f"{models}. Fix: mlxctl rm {models}, then import or pull it again, then mlxctl gc"
    )


@click.command("gc")
@json_option
def gc_command(as_json: bool) -> None:
    """Remove blobs no model uses, and leftovers of interrupted writes."""
    result = ModelStore().gc()
    if as_json:
        print_json({"removed": result.removed_blobs, "freed_bytes": result.freed_bytes})
    else:
        console.print(
            f"removed {len(result.removed_blobs)} blob(s), freed {human_size(result.freed_bytes)}"
        )
