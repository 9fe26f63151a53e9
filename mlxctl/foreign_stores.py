"""``mlxctl import --from-ollama`` and ``--from-lmstudio``: models other apps already keep.

Both list what they hold (no NAME), import one (NAME) or everything (``--all``), and with
``--dry-run`` only say what they would import. Weights are hard-linked, so nothing is copied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.table import Table

from mlxctl.import_report import report_import
from mlxctl.output import byte_progress, console, human_size, print_json
from modelstore import lmstudio, ollama
from modelstore.importer import ImportResult
from modelstore.store import Check, ModelStore


def _show(rows: list[dict[str, Any]], as_json: bool, empty: str) -> None:
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print(empty)
        return
    table = Table(box=None, header_style="bold")
    for column in ("SOURCE", "SIZE", "IMPORTS AS"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["source"], human_size(row["size"]), row["name"])
    console.print(table)


def import_foreign(
    app: str,
    store: ModelStore,
    wanted: str | None,
    name: str | None,
    *,
    import_all: bool,
    dry_run: bool,
    as_json: bool,
    allow_link: bool,
    check: Check | None = None,
) -> None:
    """List, or import, what ``app`` ("ollama" or "lmstudio") keeps; ``check`` as
    ``ModelStore.commit``'s."""
    plan = _ollama if app == "ollama" else _lmstudio
    chosen, rows, empty, import_one = plan(wanted, name, as_json)
    if dry_run or (wanted is None and not import_all):
        _show(rows, as_json, empty)
        return
    for model in chosen:
        with byte_progress(f"importing {model.display_name}", model.size) as progress:
            result = import_one(
                store, model, name, allow_link=allow_link, progress=progress, check=check
            )
        report_import(result, as_json)


_Plan = tuple[list[Any], list[dict[str, Any]], str, Callable[..., ImportResult]]
"""The models chosen, their rows as listed, the line when there are none, how one imports."""


def _ollama(wanted: str | None, name: str | None, as_json: bool) -> _Plan:
    root = ollama.ollama_root()
    chosen = [ollama.find_model(wanted, root)] if wanted is not None else ollama.list_models(root)
    rows = [
        {"source": m.display_name, "name": name or m.store_name, "size": m.size, "path": str(root)}
        for m in chosen
    ]

    def import_one(store: ModelStore, model: Any, name: str | None, **options: Any) -> ImportResult:
        result, dropped = ollama.import_ollama(store, model, root, name=name, **options)
        if dropped and not as_json:
            console.print(
                "[dim]Ollama parameters with no counterpart here (or out of range): "
                f"{', '.join(dropped)}[/]"
            )
        return result

    return chosen, rows, f"Ollama's store at {root} holds no models", import_one


def _lmstudio(wanted: str | None, name: str | None, as_json: bool) -> _Plan:
    root = lmstudio.lmstudio_root()
    chosen = lmstudio.find_models(wanted, root) if wanted else lmstudio.list_models(root)
    if name is not None and len(chosen) > 1:
        from click import UsageError

        raise UsageError(f"{wanted} holds {len(chosen)} models; --name names only one")
    rows = [
        {
            "source": m.display_name,
            "name": name or m.store_name,
            "size": m.size,
            "format": m.kind,
            "path": str(m.path),
        }
        for m in chosen
    ]

    def import_one(store: ModelStore, model: Any, name: str | None, **options: Any) -> ImportResult:
        committed = store.commit(model.draft(), name or model.store_name, **options)
        return ImportResult([committed.model], committed.blobs)

    return chosen, rows, f"LM Studio's models folder {root} holds no models", import_one
