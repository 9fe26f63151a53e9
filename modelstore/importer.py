"""``mlxctl import``: one entry point for every kind of source a user can point at."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from modelstore.blobs import ProgressCallback, StoredHow
from modelstore.errors import ImportSourceError
from modelstore.ocilayout import import_archive, is_archive
from modelstore.sources import draft_from_path
from modelstore.store import ModelStore, StoredModel
from modelstore.templates import template_warning


@dataclass(frozen=True)
class ImportResult:
    models: list[StoredModel]
    files: dict[str, StoredHow] = field(default_factory=dict)
    """File name -> how it got in (hard link, copy, already stored); empty for archives."""
    warnings: list[str] = field(default_factory=list)
    """What the user should know about the model (an inferred chat template, or none)."""


def source_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size if path.exists() else 0


def import_path(
    store: ModelStore,
    path: Path,
    name: str | None = None,
    *,
    allow_link: bool = True,
    progress: ProgressCallback | None = None,
) -> ImportResult:
    """Import an HF-style folder, a ``.gguf`` file or a packed archive (which names itself)."""
    if not path.exists():
        raise ImportSourceError(f"{path}: no such file or folder", path=str(path))
    if path.is_file() and path.suffix != ".gguf" and is_archive(path):
        return ImportResult(import_archive(store, path, name, progress))
    if name is None:
        raise ImportSourceError(f"importing {path} needs a name: add --name NAME", path=str(path))
    draft = draft_from_path(path)
    result = store.commit(draft, name, allow_link=allow_link, progress=progress)
    warning = template_warning(draft.config.template_source)
    return ImportResult([result.model], result.blobs, [warning] if warning else [])
