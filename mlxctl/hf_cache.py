"""``mlxctl import --from-hf-cache``: list the local Hugging Face cache, import from it.

Never touches the network: only snapshots already in the cache are offered. Their files are
symlinks into the cache's ``blobs/``, which the store hard-links (same file system), so an
imported model takes no second copy of its weights.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from mlxctl.import_report import report_import
from mlxctl.output import byte_progress, console, human_size, print_json
from modelstore.errors import ModelNotFoundError
from modelstore.hfhub import CachedModel, HubModel, cached_models
from modelstore.importer import ImportResult, import_path, source_size
from modelstore.store import Check, ModelStore


def find_cached(wanted: HubModel, cached: list[CachedModel]) -> CachedModel:
    """The newest snapshot of the repo, or the one whose commit or ref is the revision."""
    for model in cached:
        if model.repo_id != wanted.repo_id:
            continue
        if wanted.revision is None or wanted.revision in (model.revision, *model.refs):
            return model
    raise ModelNotFoundError(
        f"{wanted.repo_id}{'@' + wanted.revision if wanted.revision else ''} is not in the "
        "Hugging Face cache ('mlxctl import --from-hf-cache' lists what is)",
        model=wanted.repo_id,
    )


def import_snapshot(
    store: ModelStore, repo_id: str, folder: Path, name: str, check: Check | None = None
) -> ImportResult:
    """Import a snapshot folder (cache or fresh download), with a bar for large ones; its
    files are hard-linked: the cache's blobs are named by their content and never change."""
    with byte_progress(f"importing {repo_id}", source_size(folder)) as progress:
        return import_path(store, folder, name, allow_link=True, progress=progress, check=check)


def import_cached(
    store: ModelStore, model: CachedModel, name: str | None, check: Check | None
) -> ImportResult:
    target = name or model.hub_model().store_name()
    return import_snapshot(store, model.repo_id, model.folder, target, check)


def import_from_hf_cache(
    store: ModelStore,
    repo: str | None,
    name: str | None,
    *,
    import_all: bool,
    as_json: bool,
    check: Check | None = None,
) -> None:
    cached = cached_models()
    if repo is not None:
        chosen = find_cached(HubModel.parse(repo), cached)
        report_import(import_cached(store, chosen, name, check), as_json)
        return
    if import_all:
        for model in cached:
            report_import(import_cached(store, model, None, check), as_json)
        return
    if as_json:
        print_json(
            [
                {
                    "repo_id": m.repo_id,
                    "revision": m.revision,
                    "refs": list(m.refs),
                    "size": m.size,
                    "path": str(m.folder),
                    "name": m.hub_model().store_name(),
                }
                for m in cached
            ]
        )
        return
    table = Table(box=None, header_style="bold")
    for column in ("REPOSITORY", "REVISION", "SIZE", "IMPORTS AS"):
        table.add_column(column)
    for m in cached:
        hub_model = m.hub_model()
        table.add_row(
            m.repo_id, str(hub_model.revision), human_size(m.size), hub_model.store_name()
        )
    console.print(table if cached else "the Hugging Face cache holds no models")
